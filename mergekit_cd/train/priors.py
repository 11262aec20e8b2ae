"""Class images for prior preservation: real ones from a folder, or generated once and cached.

A folder of real class images may carry captions in either of two layouts: the authors'
retrieval output (``images.txt`` listing image paths and ``caption.txt`` with one caption per
line, in the same order; the images may sit in ``images/``), or one ``<image name>.txt`` beside
each image. Images without a caption get the class prompt.

Generated class images are sampled from the base pipeline (the paper's "photo of a {class}",
guidance 6) with seed i for image i, and kept in a cache folder keyed by the base fingerprint,
the prompt, the resolution and the sampler settings. A later run, or one that asks for more
images, reuses what is there and only samples what is missing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import MergeError
from ..fileio import atomic_path
from .data import IMAGE_SUFFIXES, list_images, load_image

#: Part of the cache key; change it when the way class images are sampled changes.
GENERATOR_VERSION = "1"


@dataclass
class ClassImages:
    """Class image files and their captions, for one concept."""

    paths: list[Path]
    captions: list[str]


def read_reg_dir(folder: Path, class_prompt: str, limit: int) -> ClassImages:
    """Up to ``limit`` real class images from ``folder`` with their captions (see module doc),
    each checked readable: a bad folder is found before any model is loaded."""
    folder = Path(folder).expanduser()
    listing, captions_file = folder / "images.txt", folder / "caption.txt"
    if listing.is_file() and captions_file.is_file():
        names = _lines(listing)
        captions = _lines(captions_file)
        if len(names) != len(captions):
            raise MergeError(f"{listing} lists {len(names)} images but {captions_file} has {len(captions)} "
                             f"captions; they must match line by line.")
        paths = [_locate(folder, name) for name in names]
    else:
        source = folder / "images" if (folder / "images").is_dir() and not _has_images(folder) else folder
        paths = list_images(source, "Class image folder")
        captions = [_sidecar_caption(path) or class_prompt for path in paths]
    if limit:
        paths, captions = paths[:limit], captions[:limit]
    if not paths:
        raise MergeError(f"Class image folder {folder} holds no images.")
    for path in paths:
        load_image(path)
    return ClassImages(paths, [caption or class_prompt for caption in captions])


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def _lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise MergeError(f"Cannot read {path}: {error}.") from None


def _locate(folder: Path, name: str) -> Path:
    """An image named in images.txt: as written, relative to the folder, or in images/."""
    candidates = [Path(name), folder / name, folder / "images" / Path(name).name]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise MergeError(f"{folder / 'images.txt'} names {name}, which is not in {folder} or {folder / 'images'}.")
    return found


def _sidecar_caption(path: Path) -> str | None:
    caption = path.with_suffix(".txt")
    if caption.is_file():
        text = " ".join(caption.read_text(encoding="utf-8", errors="replace").split())
        return text or None
    return None


def cache_folder(root: Path, fingerprint: str, prompt: str, resolution: int, steps: int,
                 guidance_scale: float) -> Path:
    """Where the generated class images of one (base, prompt, sampler settings) live."""
    key = json.dumps({"version": GENERATOR_VERSION, "base": fingerprint, "prompt": prompt,
                      "resolution": resolution, "steps": steps, "guidance_scale": guidance_scale},
                     sort_keys=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in prompt.lower())[:40].strip("-")
    return Path(root) / "class-images" / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def generate_class_images(pipe, prompt: str, count: int, folder: Path, *, resolution: int, steps: int,
                          guidance_scale: float, autocast, progress: bool = False) -> None:
    """Fill ``folder`` with ``count`` images of ``prompt`` (image i sampled with seed i); only the
    missing ones are sampled. Read them with :func:`generated_class_images`."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "prompt.txt", force=True) as temporary:
        temporary.write_text(prompt + "\n", encoding="utf-8")
    paths = _generated_paths(folder, count)
    missing = [index for index, path in enumerate(paths) if not path.is_file()]
    for index in tqdm(missing, desc=f"class images ({prompt})", unit="image", disable=not (progress and missing)):
        generator = torch.Generator(device="cpu").manual_seed(index)
        with torch.no_grad(), autocast():
            image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=resolution,
                         width=resolution, generator=generator, output_type="pil").images[0]
        with atomic_path(paths[index], force=True) as temporary:
            image.save(temporary, format="PNG")


def generated_class_images(folder: Path, prompt: str, count: int) -> ClassImages:
    """The first ``count`` generated class images in ``folder``, all captioned ``prompt``."""
    paths = _generated_paths(folder, count)
    missing = [path for path in paths if not path.is_file()]
    if missing:  # e.g. several machines without a shared cache folder
        raise MergeError(f"Class image {missing[0]} is missing ({len(missing)} of {count}); the main process "
                         f"generates them into --class-cache-dir, which every process must be able to read.")
    return ClassImages(paths, [prompt] * count)


def _generated_paths(folder: Path, count: int) -> list[Path]:
    """The files of generated class images 0 .. count - 1 (image i is sampled with seed i)."""
    return [Path(folder) / f"{index:05d}.png" for index in range(count)]
