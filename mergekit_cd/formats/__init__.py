"""File formats: one module per layout, each with ``NAME``, ``detect``, ``read`` and ``write``.

A format module also says ``WRITES_FULL_WEIGHTS``: whether ``write`` wants full fine-tuned
weights (FineTunedWeights) rather than differences (ConceptDelta) as its usual input.

``FORMATS`` is tried in order by :func:`detect_format`; adding a format is one new module and
one line here. Formats never do math: full-weight files read as
:class:`~mergekit_cd.weights.FineTunedWeights`, difference files as
:class:`~mergekit_cd.delta.ConceptDelta`, and conversion between them happens elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from ..errors import MergeError
from ..fileio import load_pickle, load_safetensors
from . import authors_bin, compvis, diffusers_layout, native
from ._common import Delta, describe_container, natural_order, safetensors_header

FORMATS: list[ModuleType] = [
    native,
    diffusers_layout,
    authors_bin,
    compvis,
]


def format_names() -> list[str]:
    """The ``NAME`` of every format, in detection order (the choices of ``--format``/``--to``)."""
    return [module.NAME for module in FORMATS]


def get_format(name: str) -> ModuleType:
    """The format module called ``name``."""
    for module in FORMATS:
        if module.NAME == name:
            return module
    raise MergeError(f"Unknown format {name!r}; expected one of {', '.join(format_names())}.")


def detect_format(path: str | os.PathLike[str]) -> ModuleType:
    """The first format that recognises ``path``; otherwise a MergeError saying what was found."""
    for module in FORMATS:
        if module.detect(path):
            return module
    raise MergeError(f"{path}: not a Custom Diffusion file mergekit-cd reads; found {_found(Path(path))}. "
                     f"Formats: {', '.join(format_names())} (--format picks one).")


def _found(path: Path) -> str:
    """What is at ``path``; an unreadable file raises its own MergeError (corrupt, refused)."""
    if path.is_dir():
        names = natural_order(entry.name for entry in path.iterdir())
        return f"a folder holding {names[:6]}" if names else "an empty folder"
    if not path.exists():
        raise MergeError(f"{path}: no such file or folder.")
    header = safetensors_header(path)
    if header is not None:
        return f"a safetensors file with keys {natural_order(header[0])[:4]} ({len(header[0])} keys)"
    if path.suffix == ".safetensors":
        load_safetensors(path)  # raises: empty, truncated or corrupt
    return f"a torch pickle holding {describe_container(load_pickle(path, mmap=True))}"


def read(path: str | os.PathLike[str], format_name: str | None = None) -> Delta:
    """Read ``path`` in the named format, or in the one :func:`detect_format` finds."""
    module = get_format(format_name) if format_name else detect_format(path)
    return module.read(path)


def write(obj: Delta, path: str | os.PathLike[str], format_name: str, *, force: bool = False) -> None:
    """Write ``obj`` to ``path`` in the named format (atomically; ``force`` replaces an output)."""
    get_format(format_name).write(obj, path, force=force)
