"""diffusers' Custom Diffusion training output: a folder of full K/V weights and one file per token."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from ..delta import check_token_name
from ..errors import MergeError
from ..fileio import (atomic_path, load_pickle, load_safetensors, open_safetensors, read_tensor,
                      save_safetensors)
from ..metadata import from_header, to_header
from ..weights import FineTunedWeights
from ._common import (
    Delta,
    LayerCollector,
    Pair,
    PickleFile,
    SafetensorsLayers,
    assemble,
    check_matrix,
    check_token_count,
    check_token_shapes,
    check_vector,
    full_weights,
    natural_order,
    peek_pickle,
    safetensors_header,
    saveable,
    split_layer_key,
    unexpected_key,
)

NAME = "diffusers"
WRITES_FULL_WEIGHTS = True  # writes FineTunedWeights only
STORES_FACTORS = False
ARCHITECTURES = None
OUTPUT_SUFFIX = ""  # a name without extension: a folder
WEIGHTS_NAMES = ("pytorch_custom_diffusion_weights.safetensors", "pytorch_custom_diffusion_weights.bin")
TOKEN_SUFFIXES = (".safetensors", ".bin")
SDXL_TOKEN_KEYS = ("clip_l", "clip_g")  # the community SDXL embedding layout, one row per encoder
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
    (a safetensors file, or a zip pickle memory-mapped; an old non-zip pickle is kept in memory).
    """
    weights_file = _weights_file(Path(path))
    source = str(weights_file)
    collector = LayerCollector(source)
    ignored: list[str] = []
    if weights_file.suffix == ".safetensors":
        with open_safetensors(weights_file) as handle:
            header = handle.metadata()
            for key in handle.keys():
                _collect(key, lambda key=key: read_tensor(handle, key, source), collector, ignored)
        reader: Callable[[str], Pair] = SafetensorsLayers(handle, collector.keys())
        lazy = True
    else:
        file = PickleFile(weights_file)
        if not isinstance(file.contents, dict):
            raise MergeError(f"{source}: expected a dict of tensors, found a {type(file.contents).__name__}.")
        header = {}
        for key, value in file.contents.items():
            if str(key).endswith(".processor") and isinstance(value, dict) and not value:
                continue  # the .bin variant stores an empty dict for each processor without weights (attn1)
            _collect(str(key), lambda value=value: value, collector, ignored)
        reader, lazy = file.reader((), collector.keys()), file.mapped
    tokens = _read_tokens(weights_file)
    check_token_shapes(tokens, str(weights_file.parent))
    return assemble(collector, reader, lazy=lazy, tokens=tokens, ignored=ignored, source=source,
                    identity=from_header(header, source=source))


def _collect(key: str, value: Callable[[], Any], collector: LayerCollector, ignored: list[str]) -> None:
    """Record a weights-file entry: a K/V weight (checked; read only if it is one), or an
    ignored q/out one."""
    split = split_layer_key(key, _PROJECTIONS)
    if split is not None:
        collector.add(*split, key, check_matrix(value(), key, collector.source))
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


def _load(file: Path) -> dict[Any, Any]:
    """A token file's flat dict, from safetensors or a pickle (mapped: a diffusers ``.bin``
    token file stores the whole embedding table its row is a view of)."""
    if file.suffix == ".safetensors":
        return load_safetensors(file)[0]
    state = load_pickle(file, mmap=True)
    if not isinstance(state, dict):
        raise MergeError(f"{file}: expected a dict of tensors, found a {type(state).__name__}.")
    return state


def _read_tokens(weights_file: Path) -> dict[str, tuple[Tensor, ...]]:
    """Every token file in the weights file's folder, in natural name order."""
    tokens: dict[str, tuple[Tensor, ...]] = {}
    origins: dict[str, Path] = {}
    # every entry with a token file's suffix is one (a FIFO or a dangling link is an error, not skipped)
    files = [file for file in sorted(weights_file.parent.iterdir())
             if file.name not in WEIGHTS_NAMES and file.suffix in TOKEN_SUFFIXES]
    check_token_count(len(files), str(weights_file.parent))
    for file in files:
        name, embeddings = _read_token_file(file)
        if name in tokens:
            raise MergeError(f"{weights_file.parent}: token {name} is in both {origins[name].name} "
                             f"and {file.name}.")
        tokens[name], origins[name] = embeddings, file
    return {name: tokens[name] for name in natural_order(tokens)}


def _read_token_file(file: Path) -> tuple[str, tuple[Tensor, ...]]:
    """``{"<token>": vector}`` (textual inversion) or ``{"clip_l", "clip_g"}`` named by the file.

    Copies: diffusers' training script saves a row of the whole embedding table, so a view
    would keep the table's storage.
    """
    state = _load(file)
    source = str(file)
    if set(state) == set(SDXL_TOKEN_KEYS):
        return file.stem, tuple(check_vector(state[key], key, source) for key in SDXL_TOKEN_KEYS)
    if len(state) == 1:
        name, value = next(iter(state.items()))
        return str(name), (check_vector(value, str(name), source),)
    raise MergeError(f"{source}: expected a token embedding file beside the Custom Diffusion weights "
                     f"({{'<token>': vector}}, or {{'clip_l', 'clip_g'}} for SDXL), found keys "
                     f"{natural_order(map(str, state))[:6]}.")


def write(obj: Delta, path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Write full weights as the folder ``path``: the weights file plus ``<token>.safetensors`` each."""
    weights = full_weights(obj, path, NAME)
    target = Path(path)
    header = to_header(weights)
    tensors = {f"{layer}.processor.{projection}_custom_diffusion.weight": matrix
               for layer, pair in weights.layers.items()
               for projection, matrix in zip(("to_k", "to_v"), pair)}
    token_files = {_token_file_name(token, target): _token_state(token, embeddings, target)
                   for token, embeddings in weights.tokens.items()}
    _check_distinct_when_case_folded(list(token_files), target)
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


def _token_file_name(token: str, target: Path) -> str:
    check_token_name(token, f"Cannot write {target} as {NAME}")
    name = f"{token}.safetensors"
    if name.casefold() in {weights.casefold() for weights in WEIGHTS_NAMES}:
        raise MergeError(f"Cannot write {target} as {NAME}: token {token!r} cannot be a file name.")
    return name


def _check_distinct_when_case_folded(file_names: list[str], target: Path) -> None:
    """Token files whose names differ only in case would be one file on macOS and Windows (one
    token's embedding silently replacing the other's)."""
    seen: dict[str, str] = {}
    for name in file_names:
        other = seen.setdefault(name.casefold(), name)
        if other != name:
            raise MergeError(f"Cannot write {target} as {NAME}: tokens {Path(other).stem!r} and {Path(name).stem!r} "
                             f"differ only in case, and their files would be one on a case-insensitive file "
                             f"system; rename one, or write the native format (one file).")


def _token_state(token: str, embeddings: tuple[Tensor, ...], target: Path) -> dict[str, Tensor]:
    """``{token: vector}`` for one text encoder; ``{"clip_l": [1, d], "clip_g": [1, d]}`` for SDXL."""
    if len(embeddings) == 1:
        return {token: embeddings[0]}
    if len(embeddings) == 2:
        return {key: embedding[None] for key, embedding in zip(SDXL_TOKEN_KEYS, embeddings)}
    raise MergeError(f"Cannot write {target} as {NAME}: token {token} has {len(embeddings)} "
                     f"embeddings; the layout stores one (SD1/SD2) or two (SDXL).")
