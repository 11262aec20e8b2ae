"""How a merge's statistics (:mod:`mergekit_cd.merge_statistics`) lie in a native file.

Tensors under a prefix of their own, apart from the differences and the tokens, all float64::

    statistics.gram                                         (d, d)       G of the captions
    statistics.<i>.features                                 (rows, d)    C_i, rows <= d
    statistics.<i>.changes.<layer>.to_k / .to_v             (out, rows)  D_i C_i^T, K and V rows
    statistics.<i>.context_features                         (rows, d)    P_i (methods with context rows)
    statistics.<i>.context_changes.<layer>.to_k / .to_v     (out, rows)  D_i P_i^T

and one entry of the header's metadata, ``mergekit_cd_statistics``, a JSON document::

    {"format_version": "1",
     "regulariser": {"num_rows": 3120, "captions": {"count": 300, "sha256": "...", "shipped": "reg_captions.txt"},
                     "feature_rule": "authors-v1", "text_fingerprint": "...", "base_fingerprint": "..."},
     "options": {"method": "soft", "mu": 1.0, "ridge": 0.0, "relative_ridge": 0.0, "text_dtype": "float32"},
     "concepts": [{"token": "<new1>", "weight": 1000.0}]}      # weight null in a constrained merge

``<i>`` is the concept's place in ``concepts``, the same as in the file's own concept records
(which hold its class word and prompts). Every tensor is at most as large as a K/V weight of the base, or d x d. A file
without statistics reads as before; a file with them is refused by mergekit-cd versions before them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor

from ..delta import Concept, Shapes
from ..errors import MergeError
from ..fileio import SafetensorsFile, read_tensor
from ..merge_statistics import (STATISTICS_VERSION, CaptionSet, ConceptStatistics, LayerChanges, MergeStatistics,
                                Regulariser)
from ..metadata import parse_document
from ._common import check_matrix, check_values, checking_values_on_read, unexpected_key

PREFIX = "statistics."
#: The safetensors ``__metadata__`` entry holding the statistics' JSON document.
HEADER_KEY = "mergekit_cd_statistics"
#: (features key, changes key) of each kind of rows a concept may have.
_KINDS = (("features", "changes"), ("context_features", "context_changes"))
_EXPECTED = ("'statistics.gram', 'statistics.<i>.features', 'statistics.<i>.changes.<layer>.to_k' / '.to_v' "
             "(the same for context_features and context_changes)")


def is_statistics_key(key: str) -> bool:
    return key.startswith(PREFIX)


def to_file(statistics: MergeStatistics, layer_shapes: Mapping[str, Shapes],
            source: str) -> tuple[dict[str, Tensor], str]:
    """The tensors and the header entry storing ``statistics`` beside a delta of ``layer_shapes``
    (changes read from their file now, when they were read lazily); refused when they do not fit it."""
    tensors = {f"{PREFIX}gram": statistics.regulariser.gram}
    for index, record in enumerate(statistics.concepts):
        for features_name, changes_name in _KINDS:
            features, changes = getattr(record, features_name), getattr(record, changes_name)
            if features is None:
                continue
            if set(changes) != set(layer_shapes):
                raise MergeError(f"Cannot write {source}: the statistics of {record.concept.token} cover other "
                                 f"layers than the delta's.")
            tensors[f"{PREFIX}{index}.{features_name}"] = features
            for layer, (key, value) in changes.items():
                tensors[f"{PREFIX}{index}.{changes_name}.{layer}.to_k"] = key
                tensors[f"{PREFIX}{index}.{changes_name}.{layer}.to_v"] = value
    regulariser = statistics.regulariser
    document = {
        "format_version": STATISTICS_VERSION,
        "regulariser": {"num_rows": regulariser.num_rows,
                        "captions": {"count": regulariser.captions.count, "sha256": regulariser.captions.sha256,
                                     "shipped": regulariser.captions.shipped},
                        "feature_rule": regulariser.feature_rule, "text_fingerprint": regulariser.text_fingerprint,
                        "base_fingerprint": regulariser.base_fingerprint},
        "options": statistics.options,
        "concepts": [{"token": record.concept.token, "weight": record.weight} for record in statistics.concepts],
    }
    return tensors, json.dumps(document, sort_keys=True, allow_nan=False)


def from_file(handle: SafetensorsFile, keys: Sequence[str], concepts: Sequence[Concept],
              layer_shapes: Mapping[str, Shapes], source: str) -> MergeStatistics | None:
    """The statistics a native file stores (``keys``: its tensors under :data:`PREFIX`), each
    tensor validated once now and the changes read again on access (within
    :func:`~._common.values_checked_on_read`, their values checked then, not now); None when it
    stores none."""
    text = handle.metadata().get(HEADER_KEY)
    if text is None and not keys:
        return None
    if text is None or not keys:
        found = "tensors but no header entry" if text is None else "a header entry but no tensors"
        raise MergeError(f"{source}: its merge statistics are incomplete ({found}); the file is damaged.")
    document = parse_document(text, source=source, where="the statistics header entry")
    if not isinstance(document, dict) or document.get("format_version") != STATISTICS_VERSION:
        version = document.get("format_version") if isinstance(document, dict) else None
        raise MergeError(f"{source}: merge statistics format_version {version!r} is not one this mergekit-cd "
                         f"reads ({STATISTICS_VERSION!r}); upgrade mergekit-cd.")
    regulariser_entry, options, entries = (document.get("regulariser"), document.get("options"),
                                           document.get("concepts"))
    if not (isinstance(regulariser_entry, dict) and isinstance(options, dict) and isinstance(entries, list)):
        raise _malformed(source, "needs 'regulariser' and 'options' objects and a 'concepts' list")
    remaining = set(keys)
    on_read = checking_values_on_read()
    d = _width(layer_shapes, source)
    gram = _take(handle, f"{PREFIX}gram", (d, d), remaining, source)
    regulariser = Regulariser(gram, _field(regulariser_entry, "num_rows", int, source),
                              _captions(regulariser_entry.get("captions"), source),
                              _field(regulariser_entry, "feature_rule", str, source),
                              _field(regulariser_entry, "text_fingerprint", str, source),
                              _field(regulariser_entry, "base_fingerprint", str, source))
    if len(entries) != len(concepts):
        raise _malformed(source, f"lists {len(entries)} concepts, the file {len(concepts)}")
    records = []
    for index, (entry, concept) in enumerate(zip(entries, concepts)):
        token = entry.get("token") if isinstance(entry, dict) else None
        weight = entry.get("weight") if isinstance(entry, dict) else None
        if token != concept.token or not (weight is None or _positive(weight)):
            raise _malformed(source, f"concept {entry!r} should be {{\"token\": {concept.token!r} (the file's "
                                     f"concept {index + 1}), \"weight\": a number > 0 or null}}")
        rows = {}
        for features_name, changes_name in _KINDS:
            key = f"{PREFIX}{index}.{features_name}"
            if key not in remaining:
                rows[features_name] = rows[changes_name] = None
                continue
            features = _take(handle, key, (None, d), remaining, source)
            if not 1 <= features.shape[0] <= d:
                raise MergeError(f"{source}: {key} has {features.shape[0]} rows; a concept's statistics have 1 to "
                                 f"{d} (its rows are reduced to the feature width).")
            changes = {}
            for layer, (key_shape, value_shape) in layer_shapes.items():
                parts = [f"{PREFIX}{index}.{changes_name}.{layer}.{projection}" for projection in ("to_k", "to_v")]
                for part, shape in zip(parts, (key_shape, value_shape)):
                    _take(handle, part, (shape[0], features.shape[0]), remaining, source, values=not on_read)
                changes[layer] = tuple(parts)
            rows[features_name], rows[changes_name] = features, _LazyChanges(handle, changes, on_read)
        if rows["features"] is None:
            raise MergeError(f"{source}: the merge statistics of {token} have no {PREFIX}{index}.features.")
        records.append(ConceptStatistics(concept, weight=None if weight is None else float(weight), **rows))
    if remaining:
        raise unexpected_key(sorted(remaining)[0], source, _EXPECTED)
    return MergeStatistics(regulariser, options, tuple(records))


class _LazyChanges(Mapping[str, LayerChanges]):
    """One concept's changes, per layer read from the validated file on access (K part, V part),
    ``values_on_read``: checked finite as they are read."""

    def __init__(self, handle: SafetensorsFile, keys: dict[str, tuple[str, str]], values_on_read: bool) -> None:
        self._handle, self._keys, self._values_on_read = handle, keys, values_on_read

    def __getitem__(self, layer: str) -> LayerChanges:
        key, value = self._keys[layer]
        parts = self._handle.read(key), self._handle.read(value)
        if self._values_on_read:
            for name, part in zip((key, value), parts):
                check_values(part, name, str(self._handle.path))
        return parts

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _take(handle: SafetensorsFile, key: str, shape: tuple[int | None, int], remaining: set[str],
          source: str, *, values: bool = True) -> Tensor:
    """The float64 matrix ``key`` of the expected shape (None: any rows), checked finite
    (``values=False``: its stand-in from the header, its values left to the read that uses it)."""
    if key not in remaining:
        raise MergeError(f"{source}: the merge statistics lack {key}; the file is damaged.")
    remaining.discard(key)
    tensor = check_matrix(read_tensor(handle, key, source, data=values), key, source, factor=True, values=values)
    if str(tensor.dtype) != "torch.float64" or any(want is not None and got != want
                                                   for got, want in zip(tensor.shape, shape)):
        raise MergeError(f"{source}: {key} should be a float64 matrix of shape "
                         f"{tuple('rows' if n is None else n for n in shape)}, found {str(tensor.dtype)[6:]} "
                         f"{tuple(tensor.shape)}.")
    return tensor


def _width(layer_shapes: Mapping[str, Shapes], source: str) -> int:
    if not layer_shapes:
        raise MergeError(f"{source}: merge statistics without any layer; the file is damaged.")
    return next(iter(layer_shapes.values()))[0][1]


def _field(entry: dict[str, Any], name: str, kind: type, source: str) -> Any:
    value = entry.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _malformed(source, f"regulariser field {name!r} should be a {kind.__name__}")
    return value


def _captions(entry: Any, source: str) -> CaptionSet:
    if not (isinstance(entry, dict) and isinstance(entry.get("count"), int) and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("shipped"), (str, type(None)))):
        raise _malformed(source, "regulariser field 'captions' should be {\"count\": int, \"sha256\": str, "
                                 "\"shipped\": str or null}")
    return CaptionSet(entry["count"], entry["sha256"], entry["shipped"])


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _malformed(source: str, what: str) -> MergeError:
    return MergeError(f"{source}: the merge statistics header entry is malformed: it {what}.")
