"""Training images: reading folders, the paper's resize augmentation with its loss mask, batches.

Randomness is counter-based: which images a step uses and how they are augmented depend only
on (seed, process, step, slot), never on a generator that advanced through earlier steps. So
a resumed run draws exactly what an uninterrupted one would, with no sampler state to save.

The augmentation (Kumari et al. 2023; the authors' and diffusers' scripts): with probability
0.66 the image is shrunk to a random size in [size/3, size] and pasted at a random place on a
blank (mid-grey) canvas, and the prompt gets "a far away " or "very small " in front when it
is smaller than 0.6 x size; otherwise it is enlarged to 1.2-1.4 x size and a random crop is
kept ("zoomed in " or "close up "). The loss counts only latent pixels inside the pasted box,
less a border of one latent pixel (an image left at full size counts whole; the public scripts
drop that border from it too, although the image covers it). At small resolutions that
border can leave nothing (the public scripts then divide by zero and the loss is NaN); here
the box falls back to the latent pixels the image covers, so the mask is never empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import MergeError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: Probability of the shrink-and-paste branch (the public scripts' 0.66).
SHRINK_PROBABILITY = 0.66
SMALL_PREFIXES = ("a far away ", "very small ")
LARGE_PREFIXES = ("zoomed in ", "close up ")
#: Stream numbers keeping the counter-based random streams apart.
INSTANCE_ORDER, CLASS_ORDER, AUGMENT, NOISE = 1, 2, 3, 4


def list_images(folder: Path, what: str) -> list[Path]:
    """The image files (png, jpg, jpeg, webp) directly in ``folder``, sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise MergeError(f"{what} {folder} does not exist.")
    if not folder.is_dir():
        raise MergeError(f"{what} {folder} is not a folder; give the folder that holds the images.")
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as error:
        raise MergeError(f"Cannot read {what.lower()} {folder}: {error.strerror or error}.") from None
    if not files:
        raise MergeError(f"{what} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return files


def load_image(path: Path):
    """The image at ``path`` as RGB, transparency composited on white; an unreadable file (or
    one larger than PIL's decompression-bomb limit) is one MergeError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info) \
                    or (image.mode in ("RGB", "L") and "transparency" in image.info):
                rgba = image.convert("RGBA")
                return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)),
                                             rgba).convert("RGB")
            return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise MergeError(f"Cannot read image {path}: {str(error).strip().rstrip('.')} (PIL's "
                         f"Image.MAX_IMAGE_PIXELS). Shrink it or remove it; training resizes images to "
                         f"the model's 512-1024 px anyway.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else first_line(error)
        raise MergeError(f"Cannot read image {path}: {reason}. Remove it or replace it with a "
                         f"readable png/jpg/webp.") from None


def square(image, size: int):
    """Centre-crop to a square, then resize to ``size`` x ``size`` (no distortion)."""
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)


def to_uint8(image) -> Tensor:
    """(3, H, W) uint8 tensor of an RGB PIL image."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_unit_range(pixels: Tensor) -> Tensor:
    """uint8 (..., 3, H, W) -> float32 in [-1, 1], as the VAE expects."""
    return pixels.float() / 127.5 - 1.0


def stream(seed: int, process: int, kind: int, *counters: int) -> np.random.Generator:
    """An independent generator for one (seed, process, kind, counters...) combination."""
    return np.random.default_rng([seed, process, kind, *counters])


def torch_generator(seed: int, process: int, step: int) -> torch.Generator:
    """The CPU torch generator of one step (noise, timesteps, latent samples)."""
    value = int(stream(seed, process, NOISE, step).integers(0, 2**63 - 1))
    return torch.Generator(device="cpu").manual_seed(value)


def shuffled_indices(seed: int, process: int, kind: int, step: int, batch_size: int, count: int) -> list[int]:
    """Items of step ``step``: consecutive slots of an endless list of shuffled epochs.

    Every item appears once per epoch, as with a shuffling data loader, but the epoch's order
    is a function of its number alone.
    """
    items = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, within = divmod(position, count)
        items.append(int(stream(seed, process, kind, epoch).permutation(count)[within]))
    return items


@dataclass
class Augmented:
    """One training example: pixels in [-1, 1] (3, size, size), latent mask (1, h, w), prompt."""

    pixels: Tensor
    mask: Tensor
    prompt: str


def augment(image, prompt: str, size: int, factor: int, rng: np.random.Generator, *,
            enabled: bool = True, hflip: bool = False) -> Augmented:
    """The paper's resize augmentation of a square RGB PIL image, with its latent loss mask.

    ``factor``: pixels per latent pixel (the VAE's scale factor).
    """
    from PIL import Image

    if hflip and rng.uniform() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = size
    if enabled:
        if rng.uniform() < SHRINK_PROBABILITY:
            scale = int(rng.integers(size // 3, size + 1))
        else:
            scale = int(rng.integers(int(1.2 * size), int(1.4 * size)))
    scale = max(scale, 1)
    latent = size // factor
    resized = np.asarray(image.resize((scale, scale), Image.Resampling.LANCZOS), dtype=np.float32) / 127.5 - 1.0
    if scale >= size:  # enlarged and cropped, or left as it is: the whole image counts
        top, left = (int(v) for v in rng.integers(0, scale - size + 1, size=2))
        pixels = resized[top:top + size, left:left + size]
        mask = np.ones((latent, latent), dtype=np.float32)
    else:
        top, left = (int(v) for v in rng.integers(0, size - scale + 1, size=2))
        pixels = np.zeros((size, size, 3), dtype=np.float32)
        pixels[top:top + scale, left:left + scale] = resized
        mask = np.zeros((latent, latent), dtype=np.float32)
        rows, columns = _box(top, scale, factor, latent), _box(left, scale, factor, latent)
        mask[rows, columns] = 1.0
    if scale < 0.6 * size:
        prompt = SMALL_PREFIXES[int(rng.integers(2))] + prompt
    elif scale > size:
        prompt = LARGE_PREFIXES[int(rng.integers(2))] + prompt
    return Augmented(torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1),
                     torch.from_numpy(mask)[None], prompt)


def _box(start: int, length: int, factor: int, latent: int) -> slice:
    """Latent pixels inside a pasted span, less one at each side; never empty.

    Falls back to the latent pixels the span covers fully, then to those it touches.
    """
    end = start + length
    for low, high in ((start // factor + 1, end // factor - 1),
                      (-(-start // factor), end // factor),
                      (start // factor, -(-end // factor))):
        low, high = max(low, 0), min(high, latent)
        if high > low:
            return slice(low, high)
    return slice(min(start // factor, latent - 1), min(start // factor, latent - 1) + 1)


@dataclass
class InstanceBatch:
    """The instance half of a step: pixels (B, 3, H, W), masks (B, 1, h, w), prompts."""

    pixels: Tensor
    masks: Tensor
    prompts: list[str]


@dataclass
class InstanceSet:
    """Every concept's instance images (square, at the training size) and training prompts."""

    images: list  # PIL images, already square at the training size
    prompts: list[str]  # each image's instance prompt (its concept's)

    def batch(self, *, seed: int, process: int, step: int, batch_size: int, size: int, factor: int,
              augment_images: bool, hflip: bool) -> InstanceBatch:
        indices = shuffled_indices(seed, process, INSTANCE_ORDER, step, batch_size, len(self.images))
        examples = [augment(self.images[index], self.prompts[index], size, factor,
                            stream(seed, process, AUGMENT, step, slot), enabled=augment_images, hflip=hflip)
                    for slot, index in enumerate(indices)]
        return InstanceBatch(torch.stack([e.pixels for e in examples]), torch.stack([e.mask for e in examples]),
                             [e.prompt for e in examples])


def read_instance_images(folders: Sequence[Path]) -> list[list]:
    """Every concept's instance images (all must be readable), before any model is loaded."""
    return [[load_image(path) for path in list_images(folder, "Instance image folder")] for folder in folders]


def instance_set(images: Sequence[Sequence], prompts: Sequence[str], size: int) -> InstanceSet:
    """Per-concept images and prompts, squared to the training size, as one set."""
    squared, image_prompts = [], []
    for concept_images, prompt in zip(images, prompts):
        squared.extend(square(image, size) for image in concept_images)
        image_prompts.extend([prompt] * len(concept_images))
    return InstanceSet(squared, image_prompts)
