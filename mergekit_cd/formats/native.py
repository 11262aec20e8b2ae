"""mergekit-cd's own safetensors file: K/V differences (dense or low-rank), tokens, metadata, merge statistics."""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from ..delta import ConceptDelta, Difference, LayerDelta, LazyLayers, LowRank, layer_shapes
from ..errors import MergeError
from ..fileio import (SafetensorsFile, atomic_path, open_safetensors, read_tensor,
                      save_safetensors)
from ..limits import check_embedding_size
from ..metadata import HEADER_FORMAT, from_header, to_header
from ._common import (
    Delta,
    LayerCollector,
    check_matrix,
    check_token_count,
    check_token_shapes,
    check_values,
    check_vector,
    checking_values_on_read,
    natural_order,
    safetensors_header,
    saveable,
    unexpected_key,
)
from .statistics_layout import HEADER_KEY as STATISTICS_HEADER_KEY, from_file as read_statistics, \
    is_statistics_key, to_file as statistics_tensors

NAME = "native"
HOLDS_OTHER_MODULES = False  # cross-attention K/V only
WRITES_FULL_WEIGHTS = False  # writes ConceptDelta differences
STORES_FACTORS = True
FACTORS_ONLY = False
STORES_STATISTICS = True
TOKEN_FOLDER_SUFFIX = None
ARCHITECTURES = None
OUTPUT_SUFFIX = ".safetensors"
foreign_entries = None
TOKEN_PREFIX = "token."
# key suffix -> (projection, part): a dense difference, or the two factors of a low-rank one.
_PARTS = {f".{projection}.{part}": (projection, part)
          for projection in ("to_k", "to_v") for part in ("diff", "up", "down")}
_EXPECTED = ("'<layer>.to_k.diff' / '<layer>.to_k.up' + '.down' (same for to_v) or "
             "'token.<name>.<encoder index>'")


def detect(path: str | os.PathLike[str]) -> bool:
    """A safetensors file whose keys are all ours (differences, tokens and merge statistics)."""
    header = safetensors_header(path)
    if header is None:
        return False
    keys, metadata = header
    if not keys and metadata.get("format") != HEADER_FORMAT:
        return False
    return all(key.startswith(TOKEN_PREFIX) or is_statistics_key(key) or _split(key) for key in keys)


def _split(key: str) -> tuple[str, str, str] | None:
    """(layer, projection, part) of a difference key, or None."""
    for suffix, (projection, part) in _PARTS.items():
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], projection, part
    return None


def read(path: str | os.PathLike[str]) -> ConceptDelta:
    """The delta stored in ``path``, low-rank factors kept as :class:`LowRank`.

    Every tensor is validated in one pass that holds one tensor at a time; the layers (and the
    changes of a merge's statistics) are then read again when used (:class:`LazyLayers`), so a
    merge of many large files streams them. Within :func:`~._common.values_checked_on_read` the
    pass reads no layer: their structure is checked from the header, their values when read.
    """
    source = str(path)
    collector = LayerCollector(source)
    factors: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    embeddings: dict[str, dict[int, Tensor]] = {}
    locations: dict[tuple[str, str], tuple[str, ...]] = {}
    statistics_keys: list[str] = []
    on_read = checking_values_on_read()
    with open_safetensors(path) as handle:
        provenance = from_header(handle.metadata(), source=source)
        token_keys = {key: _split_token_key(key, source) for key in handle.keys() if key.startswith(TOKEN_PREFIX)}
        check_token_count(len({name for name, _ in token_keys.values()}), source)
        for key in handle.keys():
            if key in token_keys:
                name, index = token_keys[key]
                check_embedding_size(math.prod(handle.shape(key)), key, source)
                embeddings.setdefault(name, {})[index] = check_vector(read_tensor(handle, key, source), key, source)
                continue
            if is_statistics_key(key):
                statistics_keys.append(key)
                continue
            parsed = _split(key)
            if parsed is None:
                raise unexpected_key(key, source, _EXPECTED)
            layer, projection, part = parsed
            matrix = check_matrix(read_tensor(handle, key, source, data=not on_read), key, source,
                                  factor=part != "diff", values=not on_read)
            stand_in = torch.empty(matrix.shape, dtype=matrix.dtype, device="meta")  # shape only
            if part == "diff":
                collector.add(layer, projection, key, stand_in)
                locations[(layer, projection)] = (key,)
            else:
                factors.setdefault((layer, projection), {})[part] = (key, stand_in)
    for (layer, projection), pair in factors.items():
        key = f"{layer}.{projection}"
        collector.add(layer, projection, f"{key}.up",
                      _low_rank({part: tensor for part, (_, tensor) in pair.items()}, key, source))
        locations[(layer, projection)] = (pair["up"][0], pair["down"][0])
    tokens = {name: _ordered(embeddings[name], name, source) for name in natural_order(embeddings)}
    check_token_shapes(tokens, source)
    shapes = {name: (key.shape, value.shape) for name, (key, value) in collector.layers(allow_empty=True).items()}
    statistics = read_statistics(handle, statistics_keys, provenance.concepts, shapes, source)
    reader = _LayerReader(handle, locations, on_read)
    return ConceptDelta.with_provenance(LazyLayers(shapes, reader), tokens, provenance, statistics=statistics)


class _LayerReader:
    """Reads one layer's differences back from a validated native file (its header parsed once,
    when it was validated; the file checks it is unchanged); ``values_on_read``: their values
    checked as they are read (:func:`~._common.values_checked_on_read`)."""

    def __init__(self, handle: SafetensorsFile, locations: dict[tuple[str, str], tuple[str, ...]],
                 values_on_read: bool) -> None:
        self.handle, self.locations, self.values_on_read = handle, locations, values_on_read

    def __call__(self, layer: str) -> LayerDelta:
        parts: list[Difference] = []
        for projection in ("to_k", "to_v"):
            keys = self.locations[(layer, projection)]
            tensors = [self.handle.read(key) for key in keys]
            if self.values_on_read:
                for key, tensor in zip(keys, tensors):
                    check_values(tensor, key, str(self.handle.path))
            parts.append(tensors[0] if len(tensors) == 1 else LowRank(*tensors))
        return LayerDelta(*parts)


def _split_token_key(key: str, source: str) -> tuple[str, int]:
    name, _, index = key[len(TOKEN_PREFIX):].rpartition(".")
    if not name or not index.isdigit():
        raise unexpected_key(key, source, _EXPECTED)
    return name, int(index)


def _low_rank(pair: dict[str, Tensor], key: str, source: str) -> LowRank:
    for part, other in (("up", "down"), ("down", "up")):
        if part not in pair:
            raise MergeError(f"{source}: {key}.{other} has no matching {key}.{part}.")
    up, down = pair["up"], pair["down"]
    if up.shape[1] != down.shape[0]:
        raise MergeError(f"{source}: {key} factors do not fit: up is {tuple(up.shape)}, down is "
                         f"{tuple(down.shape)}.")
    return LowRank(up, down)


def _ordered(by_index: dict[int, Tensor], name: str, source: str) -> tuple[Tensor, ...]:
    """One embedding per text encoder, indices 0..n-1 all present."""
    if sorted(by_index) != list(range(len(by_index))):
        raise MergeError(f"{source}: token {name} has embeddings for encoders {sorted(by_index)}; "
                         f"expected 0 to {len(by_index) - 1}.")
    return tuple(by_index[index] for index in range(len(by_index)))


def write(obj: Delta, path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Write a ConceptDelta (differences; factors stay factors) with its metadata and its merge statistics."""
    if not isinstance(obj, ConceptDelta):
        raise MergeError(f"Cannot write {path} as {NAME}: the format holds differences but this is "
                         f"{type(obj).__name__} (full weights); make a delta against the base with "
                         f".to_delta first.")
    tensors: dict[str, Tensor] = {}
    for name, layer in obj.layers.items():
        for projection, difference in (("to_k", layer.key), ("to_v", layer.value)):
            if isinstance(difference, LowRank):
                tensors[f"{name}.{projection}.up"] = difference.up
                tensors[f"{name}.{projection}.down"] = difference.down
            else:
                tensors[f"{name}.{projection}.diff"] = difference
    for token, embeddings in obj.tokens.items():
        for index, embedding in enumerate(embeddings):
            tensors[f"{TOKEN_PREFIX}{token}.{index}"] = embedding
    header = to_header(obj)
    if obj.statistics is not None:
        stored, header[STATISTICS_HEADER_KEY] = statistics_tensors(obj.statistics, layer_shapes(obj.layers), str(path))
        tensors.update(stored)
    with atomic_path(path, force=force) as temporary:
        save_safetensors(saveable(tensors), temporary, metadata=header)
