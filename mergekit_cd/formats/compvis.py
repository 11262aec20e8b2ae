"""The authors' CompVis checkpoints (``delta_epoch=*.ckpt``, ``compressed_delta*.ckpt``), SD1/SD2 only."""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..errors import MergeError, TokenRenameWarning
from ..fileio import atomic_path, save_pickle
from ..limits import check_tensor_size
from .ldm_names import to_compvis_name, to_diffusers_name
from ._common import (
    IGNORED_SUFFIXES,
    METADATA_KEY,
    Delta,
    LayerCollector,
    PickleFile,
    assemble,
    check_entry,
    check_finite,
    check_token_count,
    describe,
    describe_container,
    metadata_entry,
    natural_order,
    owned,
    peek_pickle,
    plain_copy,
    read_metadata,
    split_layer_key,
    stored_entries,
    unexpected_key,
)

NAME = "compvis"
HOLDS_OTHER_MODULES = False  # cross-attention K/V only
WRITES_FULL_WEIGHTS = True  # FineTunedWeights; a LowRank ConceptDelta gives the compressed variant
STORES_FACTORS = True
FACTORS_ONLY = False
STORES_STATISTICS = False
TOKEN_FOLDER_SUFFIX = None
ARCHITECTURES = ("sd1", "sd2")  # the authors' CompVis code never had SDXL
OUTPUT_SUFFIX = ".ckpt"
foreign_entries = None
PREFIX = "model.diffusion_model."
EMBED = "embed"
#: The field of our metadata naming the tokens of ``embed``'s rows, which the checkpoint cannot hold.
TOKENS_FIELD = "tokens"
_PROJECTIONS = {".to_k.weight": "to_k", ".to_v.weight": "to_v"}
_EXPECTED = "'model.diffusion_model.<block>...attn2.to_k.weight' / '.to_v.weight' and 'embed'"
#: The names the authors' CompVis sampler gives ``embed``'s rows, by position: ``<new1>``, ``<new2>``, ...
_POSITIONAL = re.compile(r"<new(\d+)>")


def detect(path: str | os.PathLike[str]) -> bool:
    """A torch pickle with a ``state_dict`` holding ``model.diffusion_model.`` keys or ``embed``."""
    contents = peek_pickle(path)
    if not isinstance(contents, dict) or not isinstance(contents.get("state_dict"), dict):
        return False
    return any(str(key).startswith(PREFIX) or key == EMBED for key in contents["state_dict"])


def read(path: str | os.PathLike[str]) -> Delta:
    """FineTunedWeights for full weights; ConceptDelta of LowRank for ``compressed_delta`` files.

    Layers carry LDM names (``model.diffusion_model.input_blocks.1.1...attn2``), returned under
    their diffusers names. ``embed`` holds only rows (the last n of the token table), so the
    tokens are named ``<new1>`` .. ``<newn>`` in row order, as the authors' scripts name them,
    unless our metadata (under ``METADATA_KEY``, with base, fingerprint and concepts) names
    them. The file is validated holding one tensor at a time; its layers are read again when
    used (:class:`~._common.PickleFile`; an old non-zip pickle is kept in memory). Within
    :func:`~._common.values_checked_on_read` their values are checked then, not here.
    """
    source = str(path)
    file = PickleFile(path)
    contents = file.contents
    if not isinstance(contents, dict) or not isinstance(contents.get("state_dict"), dict):
        raise MergeError(f"{source}: expected the authors' CompVis layout {{'state_dict': {{...}}}}, "
                         f"found {describe_container(contents)}.")
    recorded = read_metadata(contents, source)
    names = recorded.metadata.get(TOKENS_FIELD)
    provenance = replace(recorded, metadata={k: v for k, v in recorded.metadata.items() if k != TOKENS_FIELD})
    ignored = [str(key) for key in contents if key not in ("state_dict", METADATA_KEY)]
    collector = LayerCollector(source)
    tokens: dict[str, tuple[Tensor, ...]] = {}
    for key, value in contents["state_dict"].items():
        key = str(key)
        split = split_layer_key(key, _PROJECTIONS)
        layer = to_diffusers_name(split[0].removeprefix(PREFIX)) \
            if split is not None and key.startswith(PREFIX) else None
        if key == EMBED:
            tokens = _read_embed(value, names, source)
        elif layer is not None:
            collector.add(layer, split[1], key, check_entry(value, key, source, values=not file.values_on_read))
            file.release(value)
        elif key.startswith(PREFIX) and key.endswith(IGNORED_SUFFIXES):
            ignored.append(key)
        else:
            raise unexpected_key(key, source, _EXPECTED)
    return assemble(collector, file.reader(("state_dict",), collector.keys()), lazy=file.mapped,
                    tokens=tokens, ignored=ignored, source=source, provenance=provenance)


def _read_embed(value: Any, names: Any, source: str) -> dict[str, tuple[Tensor, ...]]:
    """``embed`` [n, d] (or one row [d]) -> tokens ``<new1>`` .. ``<newn>``, or the ``names``
    our metadata gives them; each row a copy (a view would keep the whole file mapped), checked
    finite in memory (the file's bytes are read once)."""
    if isinstance(value, Tensor) and value.dim() == 1:
        value = value[None]
    if not isinstance(value, Tensor) or value.dim() != 2 or not value.is_floating_point():
        raise MergeError(f"{source}: {EMBED} should be float token rows [n, d], found {describe(value)}.")
    check_token_count(len(value), source)
    check_tensor_size(tuple(value.shape), EMBED, source)
    value = plain_copy(value)
    check_finite(value, EMBED, source)
    if names is None:
        names = [f"<new{index + 1}>" for index in range(len(value))]
    valid = (isinstance(names, list) and len(names) == len(value) and len(set(names)) == len(names)
             and all(isinstance(name, str) and name for name in names))
    if not valid:
        raise MergeError(f"{source}: the metadata names tokens {names!r} for the {len(value)} rows of "
                         f"{EMBED}; expected one distinct name per row.")
    return {name: (row.clone(),) for name, row in zip(names, value)}


def write(obj: Delta, path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Full weights from FineTunedWeights; the compressed variant from a LowRank ConceptDelta.

    Token embeddings become the rows of ``embed`` in :func:`row_order`; their names go to our
    metadata (under ``METADATA_KEY``, a top-level entry the authors' scripts ignore: they read
    ``state_dict`` only).
    """
    if obj.architecture not in (None, *ARCHITECTURES) or any(len(embeddings) != 1
                                                              for embeddings in obj.tokens.values()):
        raise MergeError(f"Cannot write {path} as {NAME}: CompVis checkpoints exist only for SD1/SD2 "
                         f"and this is an SDXL delta; use the diffusers, authors-bin or native format.")
    obj = row_order(obj, path)
    metadata = metadata_entry(obj, **{TOKENS_FIELD: list(obj.tokens)})
    state: dict[str, Any] = {}
    for layer, projections in stored_entries(obj, path, NAME).items():
        name = to_compvis_name(layer)
        if name is None:
            raise MergeError(f"Cannot write {path} as {NAME}: layer {layer} has no CompVis name.")
        for projection, entry in projections.items():
            state[f"{PREFIX}{name}.{projection}.weight"] = entry
    if obj.tokens:
        state[EMBED] = owned(torch.stack([embeddings[0] for embeddings in obj.tokens.values()]))
    with atomic_path(path, force=force) as temporary:
        save_pickle({"state_dict": state, METADATA_KEY: metadata}, temporary)


def row_order(obj: Delta, path: str | os.PathLike[str]) -> Delta:
    """``obj`` with its tokens in natural name order, the order of ``embed``'s rows.

    The authors' CompVis sampler names row i ``<new{i+1}>`` whatever our metadata says, so when
    the names use that pattern but disagree with their rows (``<new1>, <new3>`` after a merge's
    rename), every token takes its row's positional name (concepts and prompts follow, with a
    :class:`TokenRenameWarning`): otherwise the sampler would silently swap two concepts. Other
    names (``<cat>``) cannot be mistaken for a row's name and are kept in our metadata.
    """
    names = natural_order(obj.tokens)
    positional = [f"<new{index + 1}>" for index in range(len(names))]
    renames = {old: new for old, new in zip(names, positional) if old != new} \
        if any(_POSITIONAL.fullmatch(name) for name in names) else {}
    if renames:
        warnings.warn(f"{path}: CompVis rows are named by position (<new1>, <new2>, ...), so the tokens were "
                      f"renamed to match their rows: {', '.join(f'{a} -> {b}' for a, b in renames.items())}.",
                      TokenRenameWarning, stacklevel=3)
    tokens = {renames.get(name, name): obj.tokens[name] for name in names}
    return replace(obj, tokens=tokens, concepts=tuple(concept.with_names(renames) for concept in obj.concepts))
