"""Seeded sampling from a base pipeline with a delta installed, saved as an image grid."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .apply import apply
from .delta import ConceptDelta
from .errors import MergeError
from .fileio import atomic_path


def load_pipeline(reference: str | os.PathLike[str], *, device: torch.device, dtype: torch.dtype = torch.float32):
    """A diffusers pipeline from a local folder or a hub repo id (through the hub cache)."""
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(str(reference), torch_dtype=dtype)
    except (OSError, ValueError, EnvironmentError) as error:
        raise MergeError(f"Cannot load the pipeline {reference}: {str(error).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def sample(pipe, prompts: Sequence[str], *, num_images: int = 4, seed: int = 0, steps: int = 50,
           guidance_scale: float = 6.0, height: int | None = None, width: int | None = None,
           progress: bool = False) -> list:
    """``num_images`` PIL images per prompt; image j of every prompt uses seed ``seed + j``."""
    from tqdm.auto import tqdm

    images = []
    jobs = [(prompt, j) for prompt in prompts for j in range(num_images)]
    for prompt, j in tqdm(jobs, desc="sampling", disable=not progress):
        generator = torch.Generator(device="cpu").manual_seed(seed + j)
        result = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=height,
                      width=width, generator=generator, output_type="pil")
        images.append(result.images[0])
    return images


def image_grid(images: Sequence, columns: int):
    """Paste equally sized images into rows of ``columns``."""
    from PIL import Image

    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


def sample_grid(base: str | os.PathLike[str], delta: ConceptDelta | str | os.PathLike[str] | None,
                prompts: Sequence[str], output: str | os.PathLike[str], *, num_images: int = 4,
                seed: int = 0, steps: int = 50, guidance_scale: float = 6.0, device: torch.device | str = "cpu",
                height: int | None = None, width: int | None = None, force: bool = False,
                check_base: bool = True, progress: bool = False) -> Path:
    """Load ``base``, install ``delta``, sample every prompt and write one grid image (atomically)."""
    if not prompts:
        raise MergeError("Give at least one prompt.")
    pipe = load_pipeline(base, device=torch.device(device))
    if delta is not None:
        apply(pipe, delta, check_base=check_base)
    images = sample(pipe, prompts, num_images=num_images, seed=seed, steps=steps,
                    guidance_scale=guidance_scale, height=height, width=width, progress=progress)
    output = Path(output)
    with atomic_path(output, force=force) as temporary:
        image_grid(images, num_images).save(temporary, format=(output.suffix.lstrip(".") or "png").upper()
                                            .replace("JPG", "JPEG"))
    return output
