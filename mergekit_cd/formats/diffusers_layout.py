"""diffusers' Custom Diffusion training output: a folder of full K/V weights and one file per token."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


from ..errors import MergeError
from ..fileio import (atomic_path, open_safetensors, read_tensor,
                      save_safetensors)
from ..metadata import from_header, to_header
from ..weights import FineTunedWeights
from .token_files import read_token_folder, token_file_names, token_state
from ._common import (
    Delta,
    LayerCollector,
    Pair,
    PickleFile,
    SafetensorsLayers,
    assemble,
    check_matrix,
    check_token_shapes,
    checking_values_on_read,
    full_weights,
    peek_pickle,
    safetensors_header,
    saveable,
    split_layer_key,
    unexpected_key,
)

NAME = "diffusers"
HOLDS_OTHER_MODULES = False  # cross-attention K/V only
WRITES_FULL_WEIGHTS = True  # writes FineTunedWeights only
STORES_FACTORS = False
FACTORS_ONLY = False
STORES_STATISTICS = False
TOKEN_FOLDER_SUFFIX = None
ARCHITECTURES = None
OUTPUT_SUFFIX = ""  # a name without extension: a folder
WEIGHTS_NAMES = ("pytorch_custom_diffusion_weights.safetensors", "pytorch_custom_diffusion_weights.bin")
TOKEN_SUFFIXES = (".safetensors", ".bin")
_PROJECTIONS = {".processor.to_k_custom_diffusion.weight": "to_k",
                ".processor.to_v_custom_diffusion.weight": "to_v"}
_IGNORED = (".processor.to_q_custom_diffusion.weight", ".processor.to_out_custom_diffusion.0.weight",
            ".processor.to_out_custom_diffusion.0.bias")
_MARK = "_custom_diffusion."


def detect(path: str | os.PathLike[str]) -> bool:
    """A folder holding the weights file, or the weights file itself (by name or by its keys)."""
    path = Path(path)
    if path.is_dir():
        return any((path / name).is_file() for name in WEIGHTS_NAMES)
    if path.name in WEIGHTS_NAMES:
        return path.is_file()
    header = safetensors_header(path)
    keys = header[0] if header is not None else _pickle_keys(path)
    return any(_MARK in key for key in keys)


def _pickle_keys(path: Path) -> list[str]:
    contents = peek_pickle(path)
    return [str(key) for key in contents] if isinstance(contents, dict) else []


def read(path: str | os.PathLike[str]) -> FineTunedWeights:
    """Full weights and every token file beside them; metadata from the weights file's header.

    The weights are validated holding one tensor at a time, and read again per layer when used
    (a safetensors file, or a zip pickle memory-mapped; an old non-zip pickle is kept in memory);
    within :func:`~._common.values_checked_on_read` their values are checked then, not here.
    """
    weights_file = _weights_file(Path(path))
    source = str(weights_file)
    collector = LayerCollector(source)
    ignored: list[str] = []
    if weights_file.suffix == ".safetensors":
        on_read = checking_values_on_read()
        with open_safetensors(weights_file) as handle:
            header = handle.metadata()
            for key in handle.keys():
                _collect(key, lambda key=key: read_tensor(handle, key, source, data=not on_read), collector, ignored,
                         values=not on_read)
        reader: Callable[[str], Pair] = SafetensorsLayers(handle, collector.keys(), on_read)
        lazy = True
    else:
        file = PickleFile(weights_file)
        if not isinstance(file.contents, dict):
            raise MergeError(f"{source}: expected a dict of tensors, found a {type(file.contents).__name__}.")
        header = {}
        for key, value in file.contents.items():
            if str(key).endswith(".processor") and isinstance(value, dict) and not value:
                continue  # the .bin variant stores an empty dict for each processor without weights (attn1)
            _collect(str(key), lambda value=value: value, collector, ignored, values=not file.values_on_read)
            file.release(value)
        reader, lazy = file.reader((), collector.keys()), file.mapped
    tokens = read_token_folder(weights_file.parent, "beside the Custom Diffusion weights", skip=WEIGHTS_NAMES,
                               suffixes=TOKEN_SUFFIXES)
    check_token_shapes(tokens, str(weights_file.parent))
    return assemble(collector, reader, lazy=lazy, tokens=tokens, ignored=ignored, source=source,
                    provenance=from_header(header, source=source))


def _collect(key: str, value: Callable[[], Any], collector: LayerCollector, ignored: list[str], *,
             values: bool) -> None:
    """Record a weights-file entry: a K/V weight (checked, its values too when ``values``; read
    only if it is one), or an ignored q/out one."""
    split = split_layer_key(key, _PROJECTIONS)
    if split is not None:
        collector.add(*split, key, check_matrix(value(), key, collector.source, values=values))
    elif key.endswith(_IGNORED):
        ignored.append(key)
    else:
        raise unexpected_key(key, collector.source, "'<layer>.processor.to_k_custom_diffusion.weight' and "
                                                    "'<layer>.processor.to_v_custom_diffusion.weight'")


def _weights_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for name in WEIGHTS_NAMES:
        if (path / name).is_file():
            return path / name
    raise MergeError(f"{path}: no {' or '.join(WEIGHTS_NAMES)} in this folder.")


def write(obj: Delta, path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Write full weights as the folder ``path``: the weights file plus ``<token>.safetensors`` each."""
    weights = full_weights(obj, path, NAME)
    target = Path(path)
    header = to_header(weights)
    tensors = {f"{layer}.processor.{projection}_custom_diffusion.weight": matrix
               for layer, pair in weights.layers.items()
               for projection, matrix in zip(("to_k", "to_v"), pair)}
    names = token_file_names(weights.tokens, target, NAME, reserved=WEIGHTS_NAMES)
    token_files = {names[token]: token_state(token, embeddings, target, NAME)
                   for token, embeddings in weights.tokens.items()}
    with atomic_path(target, force=force, folder=True, foreign_entries=foreign_entries) as folder:
        save_safetensors(saveable(tensors), folder / WEIGHTS_NAMES[0], metadata=header)
        for file_name, state in token_files.items():
            save_safetensors(saveable(state), folder / file_name, metadata=header)


def foreign_entries(folder: Path) -> list[str]:
    """What in ``folder`` is not part of an output of this layout; ``--force`` replaces a
    folder only when there is nothing (the weights file and token files alone)."""
    names = sorted(entry.name for entry in folder.iterdir())
    if not detect(folder):
        return names
    return [name for name in names if not ((folder / name).is_file() and Path(name).suffix in TOKEN_SUFFIXES)]


