"""The authors' diffusers-variant ``delta.bin``: full K/V weights, or their compressed differences."""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor

from ..errors import MergeError
from ..fileio import atomic_path, save_pickle
from ._common import (
    IGNORED_SUFFIXES,
    METADATA_KEY,
    Delta,
    LayerCollector,
    PickleFile,
    assemble,
    check_entry,
    check_token_count,
    check_vector,
    describe_container,
    metadata_entry,
    owned,
    peek_pickle,
    read_metadata,
    split_layer_key,
    stored_entries,
    unexpected_key,
)

NAME = "authors-bin"
HOLDS_OTHER_MODULES = False  # cross-attention K/V only
WRITES_FULL_WEIGHTS = True  # FineTunedWeights; a LowRank ConceptDelta gives the compressed variant
STORES_FACTORS = True
FACTORS_ONLY = False
STORES_STATISTICS = False
TOKEN_FOLDER_SUFFIX = None
ARCHITECTURES = None
OUTPUT_SUFFIX = ".bin"
foreign_entries = None
_PROJECTIONS = {".to_k.weight": "to_k", ".to_v.weight": "to_v"}
_CONTAINER = "{'unet': {'<layer>.to_k.weight': ..., ...}, 'modifier_token': {'<token>': ...}}"


def detect(path: str | os.PathLike[str]) -> bool:
    """A torch pickle whose top level is a dict with a ``unet`` dict."""
    contents = peek_pickle(path)
    return isinstance(contents, dict) and isinstance(contents.get("unet"), dict)


def read(path: str | os.PathLike[str]) -> Delta:
    """FineTunedWeights for full weights; ConceptDelta of LowRank for the compressed variant.

    Every modifier token is kept (the authors' own merge keeps one per file). Other top-level
    entries (e.g. a fine-tuned ``text_encoder``) and q/out projections are listed as ignored.
    Our own files also hold their metadata (base, fingerprint, concepts) under
    ``METADATA_KEY``. The file is validated holding one tensor at a time; its layers are read
    again when used (:class:`~._common.PickleFile`; an old non-zip pickle is kept in memory).
    Within :func:`~._common.values_checked_on_read` their values are checked then, not here.
    """
    source = str(path)
    file = PickleFile(path)
    contents = file.contents
    if not isinstance(contents, dict) or not isinstance(contents.get("unet"), dict):
        raise MergeError(f"{source}: expected the authors' delta layout {_CONTAINER}, found "
                         f"{describe_container(contents)}.")
    provenance = read_metadata(contents, source)
    ignored = [str(key) for key in contents if key not in ("unet", "modifier_token", METADATA_KEY)]
    collector = LayerCollector(source)
    for key, value in contents["unet"].items():
        key = str(key)
        split = split_layer_key(key, _PROJECTIONS)
        if split is not None:
            collector.add(*split, key, check_entry(value, key, source, values=not file.values_on_read))
            file.release(value)
        elif key.endswith(IGNORED_SUFFIXES):
            ignored.append(key)
        else:
            raise unexpected_key(key, source, "'<layer>.to_k.weight' and '<layer>.to_v.weight' in 'unet'")
    tokens = _read_tokens(contents.get("modifier_token", {}), source)
    return assemble(collector, file.reader(("unet",), collector.keys()), lazy=file.mapped, tokens=tokens,
                    ignored=ignored, source=source, provenance=provenance)


def _read_tokens(entries: Any, source: str) -> dict[str, tuple[Tensor, ...]]:
    """token -> embeddings (copies); an SDXL token holds a pair [text_encoder row, text_encoder_2 row].

    Copies, because the authors save a row of the whole embedding table: a view would keep
    the table's storage (and the mapped file).
    """
    if not isinstance(entries, dict):
        raise MergeError(f"{source}: modifier_token should be a dict token -> embedding, found "
                         f"{describe_container(entries)}.")
    check_token_count(len(entries), source)
    tokens = {}
    for name, value in entries.items():
        key = f"modifier_token[{str(name)!r}]"
        if isinstance(value, (list, tuple)):
            if not value:
                raise MergeError(f"{source}: {key} holds no embedding.")
            tokens[str(name)] = tuple(check_vector(part, f"{key}[{index}]", source)
                                      for index, part in enumerate(value))
        else:
            tokens[str(name)] = (check_vector(value, key, source),)
    return tokens


def write(obj: Delta, path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Full weights from FineTunedWeights; the compressed variant from a LowRank ConceptDelta.

    Our metadata goes under ``METADATA_KEY``, a top-level entry the authors' scripts ignore
    (they read ``unet``, ``modifier_token`` and ``text_encoder`` only).
    """
    metadata = metadata_entry(obj)
    entries = stored_entries(obj, path, NAME)
    unet = {f"{layer}.{projection}.weight": entry
            for layer, projections in entries.items() for projection, entry in projections.items()}
    modifier_token = {token: owned(embeddings[0]) if len(embeddings) == 1
                      else [owned(embedding) for embedding in embeddings]
                      for token, embeddings in obj.tokens.items()}
    with atomic_path(path, force=force) as temporary:
        save_pickle({"unet": unet, "modifier_token": modifier_token, METADATA_KEY: metadata}, temporary)
