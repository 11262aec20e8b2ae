"""cd-train: Custom Diffusion training (Kumari et al. 2023) for SD1.x, SD2.x and SDXL.

The result is a concept delta that ``cd-merge`` composes with others (``--base`` is all it
needs): ``OUT/delta.safetensors`` (native, with metadata) and ``OUT/diffusers/`` (the layout
diffusers' training script writes). Modules: :mod:`.config` (options, defaults = the paper's
recipe), :mod:`.data` (images, augmentation, loss mask), :mod:`.priors` (class images),
:mod:`.embeddings` (trainable new token rows), :mod:`.attention` (start-token detach),
:mod:`.state` (what a run holds), :mod:`.setup` (models, data and caches, resume), :mod:`.step`
(one step's loss), :mod:`.loop` (the accelerate loop, checkpoints), :mod:`.output` (files written).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import MergeError
from .config import ConceptSpec, TrainingConfig, parse_concepts, read_concepts_file
from .loop import StepCallback, TrainingInterrupted, TrainingResult, run

__all__ = ["ConceptSpec", "TrainingConfig", "TrainingInterrupted", "TrainingResult", "train"]

PathLike = str | os.PathLike[str]


def train(base: PathLike, instance_dir: PathLike | None = None, class_word: str | None = None,
          output: PathLike | None = None, *, token: str | None = None, init_token: str | None = None,
          instance_prompt: str | None = None, reg_dir: PathLike | None = None, class_prompt: str | None = None,
          concepts: PathLike | Sequence[ConceptSpec | dict] | None = None,
          on_step: StepCallback | None = None, return_pipeline: bool = False,
          **options: Any) -> TrainingResult:
    """Learn one concept (or several jointly) on ``base`` and write ``output/`` (see :mod:`.output`).

    One concept: ``instance_dir`` (its images), ``class_word`` (e.g. ``"cat"``), ``token``
    (``"<new1>"``), ``init_token`` (default ``"ktn"``), ``instance_prompt`` (template, default
    ``"photo of a {token} {class_word}"``), ``reg_dir`` (real class images; default: generate
    ``num_class_images`` from ``class_prompt``, ``"photo of a {class_word}"``). Several:
    ``concepts``, a JSON file or a list of :class:`ConceptSpec` or dicts with those fields
    (checked as a concepts file is, see :func:`.config.parse_concepts`); the one-concept
    arguments are then refused, each concept's settings go in its entry.

    Options (keyword, defaults = the paper's recipe): ``steps`` (250; 500 for several
    concepts), ``batch_size`` (8), ``learning_rate`` (1e-5), ``scale_lr`` (True: times batch
    size and processes), ``resolution`` (the model's own), ``train`` (("k", "v"); add "q",
    "out"), ``augment`` (True), ``hflip`` (False), ``prior`` (True), ``prior_loss_weight`` (1),
    ``snr_gamma`` (None: every timestep weighs the same; 5: min-SNR weights), ``num_class_images`` (200), ``class_sampling_steps`` (50), ``class_guidance_scale`` (6),
    ``class_cache_dir``, ``mixed_precision`` ("no", "fp16", "bf16"), ``gradient_checkpointing``,
    ``seed`` (0), ``resume`` (a checkpoint folder, a run's output folder or "latest"),
    ``checkpoint_every`` (50), ``keep_checkpoints`` (1), ``validation_prompts``,
    ``validation_every``, ``num_validation_images`` (2), ``validation_sampling_steps`` (50),
    ``weight_decay`` (1e-2), ``max_grad_norm`` (1.0), ``device`` (None: accelerate's choice;
    "cpu", "cuda" or "cuda:N", read as the other commands' ``--device``: one this machine
    lacks is an error), ``force`` (replace an earlier run's output), ``progress`` (True).

    ``on_step(step, loss)`` is called after every step; returning True stops the run as Ctrl-C
    does: a checkpoint is saved and :class:`TrainingInterrupted` raised. Returns a
    :class:`TrainingResult` (the delta, paths, losses, speed; the trained pipeline with
    ``return_pipeline=True``). Every user error is a :class:`~mergekit_cd.MergeError`.
    """
    if output is None:
        raise MergeError("Give the output folder (output=..., -o OUT).")
    specs = _concepts(instance_dir, class_word, token, init_token, instance_prompt, reg_dir, class_prompt,
                      concepts)
    known = {f.name for f in fields(TrainingConfig)} - {"base", "concepts", "output"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"train() got unknown option {unknown[0]!r}")
    for key in ("class_cache_dir", "resume"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    for key in ("train", "validation_prompts", "adam_betas"):
        if key in options and options[key] is not None:
            value = options[key]
            options[key] = tuple(value.split(",")) if isinstance(value, str) and key == "train" else (
                (value,) if isinstance(value, str) else tuple(value))
    config = TrainingConfig(base=str(base), concepts=tuple(specs), output=Path(output), **options)
    return run(config, on_step=on_step, return_pipeline=return_pipeline)


def _concepts(instance_dir: PathLike | None, class_word: str | None, token: str | None, init_token: str | None,
              instance_prompt: str | None, reg_dir: PathLike | None, class_prompt: str | None,
              concepts: PathLike | Sequence[ConceptSpec | dict] | None) -> list[ConceptSpec]:
    """The run's concepts, from the one-concept arguments or ``concepts``, all checked by
    :func:`.config.parse_concepts`."""
    single = {"instance_dir": instance_dir, "class_word": class_word, "token": token, "init_token": init_token,
              "instance_prompt": instance_prompt, "reg_dir": reg_dir, "class_prompt": class_prompt}
    if concepts is not None:
        given = [name for name, value in single.items() if value is not None]
        if given:
            options = ", ".join(f"--{name.replace('_', '-')}" for name in given)
            raise MergeError(f"{options}: with --concepts every concept's settings go in its entry of the "
                             f"concepts JSON (fields {', '.join(given)}), not on the command line; give "
                             f"either one concept's options or --concepts.")
        if isinstance(concepts, (str, os.PathLike)):
            return read_concepts_file(concepts)
        return parse_concepts(concepts, where="The concepts list")
    if instance_dir is None or not class_word:
        raise MergeError("Give the concept's images and class: --instance-dir DIR --class-word WORD "
                         "(or --concepts FILE for several).")
    return parse_concepts([single], where="The concept")
