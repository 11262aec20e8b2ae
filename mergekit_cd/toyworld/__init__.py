"""A small text-to-image world of our own, shipped with the package: scenes of coloured,
patterned shapes (:mod:`.scenes`), personal concepts to learn (:mod:`.concepts`), a Stable
Diffusion pipeline trained on it (``builtin:toyworld``, :func:`base_path`), its CLIP-style pair
(``builtin:toyworld-clip``, :func:`clip_path`) and a detector that says what an image shows
(:mod:`.detector`). Everything measurable here is measured against the generator's labels.

>>> from diffusers import StableDiffusionPipeline
>>> from mergekit_cd import toyworld
>>> pipe = StableDiffusionPipeline.from_pretrained(toyworld.base_path())
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"


def base_path() -> Path:
    """The shipped base model: a diffusers ``StableDiffusionPipeline`` folder (32 px images)."""
    return ASSETS / "base"


def clip_path() -> Path:
    """The world's CLIP (transformers ``CLIPModel`` folder) for ``cd-eval --clip``."""
    return ASSETS / "clip"


def concept_images_path(name: str) -> Path:
    """The shipped instance images of concept ``name`` (small PNGs)."""
    from .concepts import concept

    return ASSETS / "concepts" / concept(name).name


def reg_captions_path() -> Path:
    """1000 world captions (scene stream 4) for ``cd-merge --reg-captions`` on the world's base."""
    return ASSETS / "reg_captions.txt"


def heldout_captions_path() -> Path:
    """300 further world captions (scene stream 5), for ``--held-out`` drift and preservation."""
    return ASSETS / "heldout_captions.txt"
