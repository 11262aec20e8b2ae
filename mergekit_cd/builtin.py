"""Models shipped inside the package, named ``builtin:<name>`` wherever a model folder is expected
(``--base builtin:toyworld``, ``--clip builtin:toyworld-clip``)."""

from __future__ import annotations

from pathlib import Path

from .errors import MergeError

PREFIX = "builtin:"


def builtin_models() -> dict[str, Path]:
    """Name -> folder of every shipped model."""
    from . import toyworld

    return {"toyworld": toyworld.base_path(), "toyworld-clip": toyworld.clip_path()}


def builtin_folder(reference: str) -> Path | None:
    """The shipped folder ``reference`` names (``builtin:<name>``), ``None`` for any other reference;
    an unknown name, or a package installed without its model files, is one MergeError."""
    if not str(reference).startswith(PREFIX):
        return None
    name = str(reference)[len(PREFIX):]
    models = builtin_models()
    if name not in models:
        raise MergeError(f"{reference}: no such built-in model; the built-in models are "
                         f"{', '.join(PREFIX + known for known in models)}.")
    folder = models[name]
    if not folder.is_dir():
        raise MergeError(f"{reference}: the package was installed without its model files ({folder} is missing); "
                         f"reinstall mergekit-cd.")
    return folder
