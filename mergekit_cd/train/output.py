"""The output folder of a run, and the trained delta written into it.

``OUT/`` holds:

- ``delta.safetensors``: the native file (K/V differences against the base, the token
  embeddings, and metadata: base name and fingerprint, architecture, each concept's token,
  class word and target prompts, and the training recipe). ``cd-merge OUT --base BASE``
  reads it (a folder holding one delta file stands for that file).
  It is renamed into place last, so a folder holding it holds a finished run.
- ``diffusers/``: the diffusers training-script layout (full weights
  ``pytorch_custom_diffusion_weights.safetensors`` plus ``<token>.safetensors`` per token), the
  same metadata in its headers. With ``--train q,k,v,out`` it also holds the trained q and out
  projections under diffusers' key names; the native file has K/V only, which is all a merge uses.
- ``checkpoints/step-NNNNNN/`` while training, and ``validation/step-NNNNNN.png`` when asked for.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from ..base import BaseModel
from ..delta import Concept, ConceptDelta, LayerDelta
from ..errors import MergeError
from ..fileio import (atomic_outputs, atomic_path, check_destination, check_not_an_input, load_safetensors,
                      save_safetensors)
from ..formats import diffusers_layout
from ..formats import native as native_format
from ..formats.token_files import token_file_names
from ..loading import save
from ..prompts import target_prompts
from .config import PROJECTION_MODULES, TrainingConfig
from .state import Progress, TrainingState

NATIVE_NAME = "delta.safetensors"
DIFFUSERS_NAME = "diffusers"
TRAINER = "cd-train"


def check(config: TrainingConfig) -> None:
    """Fail before any work when the output folder cannot be used or its files could not be written."""
    out = Path(config.output)
    check_not_an_input(out, [config.base, *(folder for concept in config.concepts
                                            for folder in (concept.instance_dir, concept.reg_dir) if folder)])
    # each token names a file in OUT/diffusers/
    token_file_names([concept.token for concept in config.concepts], out / DIFFUSERS_NAME, diffusers_layout.NAME,
                     reserved=diffusers_layout.WEIGHTS_NAMES)
    if out.suffix == ".safetensors":
        raise MergeError(f"-o {out}: cd-train writes a folder (with {NATIVE_NAME}, {DIFFUSERS_NAME}/ and "
                         f"checkpoints/); give a folder name, e.g. -o {out.with_suffix('')}.")
    if out.exists() and not out.is_dir():
        raise MergeError(f"-o {out} is a file; cd-train writes a folder.")
    if not out.parent.is_dir():
        raise MergeError(f"Cannot write {out}: folder {out.parent} does not exist.")
    if out.is_dir() and any(out.iterdir()) and config.resume is None and not config.force:
        if (out / NATIVE_NAME).exists():
            raise MergeError(f"{out} holds a finished run ({NATIVE_NAME}); choose another folder, or pass "
                             f"--force to train again into it.")
        raise MergeError(f"{out} exists and is not empty (an interrupted run?); pass --resume {out} to "
                         f"continue from its latest checkpoint, or --force to start over.")
    if (out / NATIVE_NAME).is_dir() and not (out / NATIVE_NAME).is_symlink():
        raise MergeError(f"{out / NATIVE_NAME} is a folder; cd-train writes its delta file there. Move it away "
                         f"or choose another output folder.")
    if (out / DIFFUSERS_NAME).is_dir():  # an earlier run's is replaced, a folder holding other things is not
        check_destination(out / DIFFUSERS_NAME, force=True, foreign_entries=diffusers_layout.foreign_entries)


def prepare(config: TrainingConfig) -> None:
    """Create the output folder; with --force and no --resume, drop an earlier run's checkpoints."""
    out = Path(config.output)
    out.mkdir(exist_ok=True)
    if config.force and config.resume is None and (out / "checkpoints").is_dir():
        shutil.rmtree(out / "checkpoints")


def build_delta(state: TrainingState, progress: Progress) -> ConceptDelta:
    """The trained K/V differences and token embeddings, float32 on the CPU, with metadata."""
    config, weights = state.config, state.weights
    trained = {name: parameter.detach().to("cpu", copy=True).float() for name, parameter in weights.named}
    layers = {}
    for layer in weights.layers:
        key, value = f"{layer}.to_k.weight", f"{layer}.to_v.weight"
        layers[layer] = LayerDelta(trained[key] - weights.base_weights[key],
                                   trained[value] - weights.base_weights[value])
    tokens = {concept.token: tuple(wrapper.rows.detach()[index].to("cpu", copy=True).float()
                                   for wrapper in weights.wrappers)
              for index, concept in enumerate(config.concepts)}
    concepts = tuple(Concept(c.token, c.class_word, tuple(target_prompts(c.token, c.class_word)))
                     for c in config.concepts)
    recipe = {"method": "custom-diffusion", "trainer": TRAINER, **config.recipe(),
              "resolution": state.resolution, "learning_rate": state.learning_rate,
              "num_processes": state.accelerator.num_processes,
              "mixed_precision": state.accelerator.mixed_precision,
              "detach_start_token": True, "noise_scheduler": "DDPM",
              "prediction_type": state.models.noise_scheduler.config.prediction_type,
              "steps_done": progress.step, "final_loss": progress.losses[-1] if progress.losses else None,
              "stored": "K/V differences" if set(config.train) == {"k", "v"}
              else "K/V differences (native); q/out full weights in the diffusers layout"}
    if state.prior is not None:
        recipe["num_class_images"] = [len(s.paths) for s in state.prior.sets]
    return ConceptDelta(layers, tokens, base=str(config.base), base_fingerprint=state.base.fingerprint,
                        architecture=state.base.architecture.name, concepts=concepts, metadata={"recipe": recipe})


def write(out: Path, delta: ConceptDelta, *, base: BaseModel,
          trainables: Sequence[tuple[str, Tensor]]) -> tuple[Path, Path]:
    """``out/diffusers/`` (plus the q/out weights among ``trainables``, when they trained) and
    ``out/delta.safetensors``; the diffusers layout is written against ``base``.

    Both are written under hidden names in OUT first, then put in place together
    (:func:`~mergekit_cd.fileio.atomic_outputs`), the native file last (it marks a finished run):
    a write that fails (a full disk, say) leaves an earlier run's files as they were, and a
    folder holding the native file holds the same run's diffusers layout. OUT was checked
    before training.
    """
    out = Path(out)
    beyond_kv = tuple(f".{PROJECTION_MODULES[part]}." for part in ("q", "out"))
    extra = {name: parameter for name, parameter in trainables if any(module in name for module in beyond_kv)}
    folder, native = out / DIFFUSERS_NAME, out / NATIVE_NAME
    with atomic_outputs([folder, native], force=True, check=False) as (staged_folder, staged_native):
        save(delta, staged_folder, format=diffusers_layout.NAME, base=base)
        if extra:
            _add_projections(staged_folder, extra)
        save(delta, staged_native, format=native_format.NAME)
    return native, folder


def _add_projections(folder: Path, extra: dict) -> None:
    """Add trained q/out weights to the diffusers weights file, under diffusers' key names."""
    file = folder / diffusers_layout.WEIGHTS_NAMES[0]
    tensors, header = load_safetensors(file)
    for name, parameter in extra.items():
        layer, rest = name.split(".to_", 1)  # "<layer>.attn2" + "q.weight" / "out.0.weight"
        projection, parameter_name = rest.split(".", 1)
        key = f"{layer}.processor.to_{projection}_custom_diffusion.{parameter_name}"
        tensors[key] = parameter.detach().to("cpu", copy=True).float().contiguous()
    with atomic_path(file, force=True) as temporary:
        save_safetensors(tensors, temporary, metadata=header)
