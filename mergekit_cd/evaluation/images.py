"""Images in and out of a pipeline: instance folders, VAE latents, sampled latents and pixels."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import MergeError

#: Extensions read from an instance-image folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_images(folder: str | os.PathLike[str]) -> list[Any]:
    """Every image in ``folder`` (not recursive, sorted by name) as an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(folder)
    if not path.exists():
        raise MergeError(f"Instance image folder {path} does not exist.")
    if not path.is_dir():
        raise MergeError(f"Instance images: {path} is not a folder; give one folder of images per concept.")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MergeError(f"Instance image folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as error:
            raise MergeError(f"Cannot read instance image {file}: {error}") from None
    return images


def image_size(pipe) -> int:
    """The pipeline's default image side in pixels (UNet sample size times the VAE factor)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def to_pixels(images: Sequence[Any], size: int) -> Tensor:
    """Centre-crop each image to a square, resize to ``size``: (n, 3, size, size) in [-1, 1]."""
    import numpy as np
    from PIL import Image

    arrays = []
    for image in images:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        square = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(square, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@contextmanager
def _vae_precision(vae) -> Iterator[None]:
    """Run a VAE that asks for it (``force_upcast``, e.g. SDXL's, which overflows in float16) in
    float32, as the diffusers pipelines do, and put it back afterwards."""
    dtype = vae.dtype
    upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(dtype)


def encode_images(pipe, images: Sequence[Any], *, batch_size: int = 8) -> Tensor:
    """VAE latents (mean of the posterior, times the scaling factor) of ``images``, float32 CPU."""
    pixels = to_pixels(images, image_size(pipe))
    vae = pipe.vae
    latents = []
    with torch.no_grad(), _vae_precision(vae):
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start:start + batch_size].to(vae.device, vae.dtype)
            latents.append(vae.encode(batch).latent_dist.mean.float().cpu())
    return torch.cat(latents) * float(vae.config.scaling_factor)


def decode_latents(pipe, latents: Tensor) -> list[Any]:
    """PIL images of VAE latents (as a pipeline's ``output_type="latent"`` returns them)."""
    vae = pipe.vae
    images = []
    with torch.no_grad(), _vae_precision(vae):
        for latent in latents:
            scaled = latent[None].to(vae.device, vae.dtype) / float(vae.config.scaling_factor)
            decoded = vae.decode(scaled).sample
            images.extend(pipe.image_processor.postprocess(decoded.float(), output_type="pil"))
    return images


def sample_latents(pipe, prompts: Sequence[str], *, num_images: int, seed: int, steps: int,
                   guidance_scale: float, bar: tqdm) -> Tensor:
    """Final latents of ``num_images`` samples per prompt (image j of each prompt: seed + j);
    ``bar`` (a tqdm) advances by one per denoising step."""
    outputs = _generate(pipe, prompts, num_images=num_images, seed=seed, steps=steps,
                        guidance_scale=guidance_scale, output_type="latent", bar=bar)
    return torch.cat([latents.float().cpu() for latents in outputs])


def sample_images(pipe, prompts: Sequence[str], *, num_images: int, seed: int, steps: int,
                  guidance_scale: float, bar: tqdm) -> list[Any]:
    """PIL images of ``num_images`` samples per prompt, the ones :func:`mergekit_cd.sampling.sample`
    makes (image j of each prompt: seed + j); ``bar`` (a tqdm) advances by one per denoising step."""
    outputs = _generate(pipe, prompts, num_images=num_images, seed=seed, steps=steps,
                        guidance_scale=guidance_scale, output_type="pil", bar=bar)
    return [image for images in outputs for image in images]


def _generate(pipe, prompts: Sequence[str], *, num_images: int, seed: int, steps: int, guidance_scale: float,
              output_type: str, bar: tqdm) -> list[Any]:
    """The pipeline's ``images`` output of each sample, one sample per prompt and seed."""
    outputs = []
    for prompt in prompts:
        for j in range(num_images):
            generator = torch.Generator(device="cpu").manual_seed(seed + j)
            progress = _StepProgress(bar, steps)
            result = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                          output_type=output_type, callback_on_step_end=progress)
            progress.move(steps)
            outputs.append(result.images)
    return outputs


class _StepProgress:
    """A pipeline's ``callback_on_step_end`` that advances a tqdm by ``steps`` over one sample,
    in step with the denoising loop (which runs more iterations than steps for some schedulers)."""

    def __init__(self, bar: tqdm, steps: int) -> None:
        self.bar = bar
        self.steps = steps
        self.shown = 0

    def __call__(self, pipe, index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        self.move(self.steps * (index + 1) // max(int(pipe.num_timesteps), 1))
        return callback_kwargs

    def move(self, done: int) -> None:
        """Advance the bar to ``done`` of this sample's steps (never backwards)."""
        if done > self.shown:
            self.bar.update(done - self.shown)
            self.shown = done
