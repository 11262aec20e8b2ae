"""Caption files: the user's (one per line) and the two sets shipped with the package."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .errors import MergeError


def read_captions(path: str | os.PathLike[str]) -> list[str]:
    """Captions from a text file: one per line, surrounding spaces removed, blank lines skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise MergeError(f"Cannot read captions file {path}: {error}") from None
    captions = _caption_lines(text)
    if not captions:
        raise MergeError(f"Captions file {path} is empty; write one caption per line.")
    return captions


def default_reg_captions() -> list[str]:
    """The regularisation captions shipped with the package (``data/reg_captions.txt``)."""
    return _packaged_captions("reg_captions.txt")


def heldout_captions() -> list[str]:
    """Captions disjoint from the regularisation set, for measuring drift (``data/heldout_captions.txt``)."""
    return _packaged_captions("heldout_captions.txt")


def _packaged_captions(name: str) -> list[str]:
    return _caption_lines(resources.files("mergekit_cd").joinpath("data", name).read_text(encoding="utf-8"))


def _caption_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]
