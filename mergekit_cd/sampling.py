"""Seeded sampling from a base pipeline with a delta installed, saved as an image grid."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from . import hub
from .apply import apply
from .builtin import builtin_folder
from .delta import ConceptDelta
from .errors import MergeError, first_line
from .fileio import atomic_path, check_destination, check_not_an_input


#: torch's generators take seeds from 0 to 2**64 - 1.
MAX_SEED = 2**64 - 1


def check_seed(seed: int, images: int = 1, *, option: str = "--seed") -> None:
    """One MergeError unless ``seed + j`` is a seed torch takes for every image j < ``images``
    (image j of a prompt is sampled with seed + j; a larger seed fails inside torch)."""
    last = MAX_SEED - max(images, 1) + 1
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= last:
        raise MergeError(f"{option} must be a whole number from 0 to {last} (image j is sampled with seed + j, "
                         f"and torch's seeds end at 2**64 - 1), got {seed!r}.")


def load_pipeline(reference: str | os.PathLike[str], *, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32):
    """A diffusers pipeline from a local folder or a hub repo id (through the hub cache).

    A repo id is read from the cache alone when the hub cannot be reached (or HF_HUB_OFFLINE
    is set), so an offline machine never waits on the network.
    """
    from diffusers import DiffusionPipeline

    local = builtin_folder(str(reference)) or Path(reference).expanduser()
    options = {} if dtype == torch.float32 else {_dtype_keyword(): dtype}  # float32 is the default
    if local.is_dir():
        check_components(local)
    elif not local.exists():
        # one clear error for a path that is not there, or a repo not in the cache while offline
        hub.resolve(str(reference), allow_patterns=["model_index.json"])
        options["local_files_only"] = not hub.hub_reachable()
    try:
        pipe = DiffusionPipeline.from_pretrained(str(local) if local.exists() else str(reference), **options)
    except (OSError, ValueError) as error:
        raise MergeError(f"Cannot load the pipeline {reference}: {first_line(error)}") from None
    if getattr(pipe, "unet", None) is None:
        raise MergeError(f"{reference} is a {type(pipe).__name__}, not a Stable Diffusion pipeline "
                         f"with a UNet.")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.device(device))


def check_components(folder: Path) -> None:
    """A local pipeline folder has every component its ``model_index.json`` lists, with weights.

    diffusers would report a missing one as some file missing from the pipeline folder itself
    (or fail deep inside a tokenizer); this names the component.
    """
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise MergeError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json.")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as error:
        raise MergeError(f"{index_file}: not a readable model index ({error}).") from None
    listed = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
              and len(value) == 2 and value[0] is not None]
    for name in listed:
        component = folder / name
        if not component.is_dir() or not any(component.iterdir()):
            raise MergeError(f"{folder} lacks the {name} component that its model_index.json lists "
                             f"(no {name}/ folder, or an empty one).")
        has_weights = any(file.suffix in (".safetensors", ".bin") for file in component.iterdir())
        if (component / "config.json").is_file() and not has_weights:
            raise MergeError(f"{folder}: the {name} component has a config.json but no weights "
                             f"(.safetensors or .bin) in {component}.")


def _dtype_keyword() -> str:
    """``dtype``, or ``torch_dtype`` for diffusers before the rename (0.42 warns on the old name)."""
    from diffusers.pipelines import pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"


def sample(pipe, prompts: Sequence[str], *, num_images: int = 4, seed: int = 0, steps: int = 50,
           guidance_scale: float = 6.0, height: int | None = None, width: int | None = None,
           progress: bool = False) -> list:
    """``num_images`` PIL images per prompt; image j of every prompt uses seed ``seed + j``.

    The noise is drawn on the CPU, so a seed gives the same starting noise on any device.
    """
    from tqdm.auto import tqdm

    _check_counts(num_images, steps)
    if (height is None) != (width is None):
        # diffusers ignores a lone height or width (it falls back to the default for both)
        default = pipe.unet.config.sample_size * pipe.vae_scale_factor
        height, width = height or default, width or default
    images = []
    jobs = [(prompt, j) for prompt in prompts for j in range(num_images)]
    for prompt, j in tqdm(jobs, desc="sampling", unit="image", disable=not progress):
        generator = torch.Generator(device="cpu").manual_seed(seed + j)
        try:
            result = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=height,
                          width=width, generator=generator, output_type="pil")
        except ValueError as error:  # the pipeline's own input checks (sizes, prompt)
            raise MergeError(f"Cannot sample {prompt!r}: {str(error).strip().splitlines()[0]}") from None
        images.append(result.images[0])
    return images


def _check_counts(num_images: int, steps: int) -> None:
    if num_images < 1:
        raise MergeError(f"The number of images per prompt must be at least 1, got {num_images}.")
    if steps < 1:
        raise MergeError(f"The number of denoising steps must be at least 1, got {steps}.")


def image_grid(images: Sequence, columns: int):
    """The images of :func:`sample` (each prompt's ``columns`` images in turn), one row per prompt:
    diffusers' ``make_image_grid``."""
    from diffusers.utils import make_image_grid

    return make_image_grid(list(images), rows=len(images) // columns, cols=columns)


def _image_format(output: Path) -> str:
    """PIL's format name for the output's extension (no extension: PNG)."""
    from PIL import Image

    if not output.suffix:
        return "PNG"
    found = Image.registered_extensions().get(output.suffix.lower())
    if found is None or found not in Image.SAVE:
        raise MergeError(f"Cannot write {output}: {output.suffix} is not an image format PIL writes "
                         f"(use .png, .jpg or .webp).")
    return found


def sample_grid(base: str | os.PathLike[str], delta: ConceptDelta | str | os.PathLike[str] | None,
                prompts: Sequence[str], output: str | os.PathLike[str], *, num_images: int = 4,
                seed: int = 0, steps: int = 50, guidance_scale: float = 6.0,
                device: torch.device | str = "cpu", height: int | None = None, width: int | None = None,
                force: bool = False, check_base: bool = True, other_layers: str = "refuse",
                progress: bool = False) -> Path:
    """Load ``base``, install ``delta`` (:func:`~mergekit_cd.apply.apply`, with ``check_base`` and
    ``other_layers``), sample every prompt and write one grid image (atomically).

    The grid has one row per prompt and ``num_images`` images in each row. The output is
    checked (exists without ``force``, missing folder, unknown extension) before any work.
    """
    if not prompts:
        raise MergeError("Give at least one prompt.")
    _check_counts(num_images, steps)
    output = Path(output)
    image_format = _image_format(output)
    check_destination(output, force=force)
    check_not_an_input(output, [base] if delta is None or isinstance(delta, ConceptDelta) else [base, delta])
    pipe = load_pipeline(base, device=device)
    if delta is not None:
        apply(pipe, delta, check_base=check_base, other_layers=other_layers)
    images = sample(pipe, prompts, num_images=num_images, seed=seed, steps=steps,
                    guidance_scale=guidance_scale, height=height, width=width, progress=progress)
    with atomic_path(output, force=force) as temporary:
        image_grid(images, num_images).save(temporary, format=image_format)
    return output
