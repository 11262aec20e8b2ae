"""The disk cache of text features: a merge's regularisation Gram matrix and its target features,
keyed by everything that decides them (base, texts, row rule, dtype, the tokens that occur), so a
repeated merge loads no text encoder at all. Damaged files are misses; an unwritable cache warns."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import Tensor

from .errors import MergeError
from .features import DEFAULT_ROWS, ROW_RULES, LazyTextFeatures, PromptRows, RowRule, TextSet
from .fileio import atomic_path, save_safetensors
from .merge_report import quadratic

if TYPE_CHECKING:
    from .base import BaseModel

_CACHE_FORMAT_VERSION = "1"
#: A cached Gram matrix whose largest asymmetry exceeds this fraction of its largest entry is damaged
#: (accumulating ``C^T C`` in float64, on any device, stays many orders of magnitude closer).
SYMMETRY_RTOL = 1e-10


def default_cache_dir() -> Path:
    """``$MERGEKIT_CD_CACHE``, else ``$XDG_CACHE_HOME/mergekit_cd``, else ``~/.cache/mergekit_cd``."""
    if os.environ.get("MERGEKIT_CD_CACHE"):
        return Path(os.environ["MERGEKIT_CD_CACHE"]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root).expanduser() / "mergekit_cd"


def tokens_in(texts: Sequence[str], tokens: Mapping[str, Sequence[Tensor]] | None) -> dict[str, str]:
    """By name, the sha256 of the embeddings of each modifier token that may occur in ``texts``.

    Tokenizers match an added token anywhere in a text (``"tasks"`` holds ``"sks"``), CLIP's
    after lower-casing; a case-insensitive substring test finds every token they can match, so
    a cache key that includes these changes whenever the tokens can change the features.
    """
    text = "\n".join(texts).lower()
    found = {}
    for name in sorted(tokens or {}):
        if name and name.lower() in text:
            digest = hashlib.sha256()
            for embedding in tokens[name]:
                digest.update(embedding.detach().float().cpu().contiguous().numpy().tobytes())
            found[name] = digest.hexdigest()
    return found


def gram_cache_key(base: BaseModel, captions: Sequence[str], dtype: torch.dtype,
                   tokens: Mapping[str, Sequence[Tensor]] | None = None, *,
                   rule: RowRule = ROW_RULES[DEFAULT_ROWS]) -> str:
    """sha256 hex of what decides a regularisation Gram matrix.

    The base fingerprint (its K/V weights), the text-encoder and tokenizer files, the
    architecture, the exact captions, the row rule, the text encoder dtype, and the modifier
    tokens (names and embeddings) that occur in the captions, since those are encoded with
    them (:func:`tokens_in`; captions without any keep the key they always had). Device and
    batch size only change rounding, so they are not part of it.
    """
    content = {
        "format_version": _CACHE_FORMAT_VERSION,
        "base_fingerprint": base.fingerprint,
        "text_fingerprint": base.text_fingerprint,
        "architecture": base.architecture.name,
        "captions": list(captions),
        "feature_rule": rule.name,
        "text_dtype": str(dtype),
    }
    found = tokens_in(captions, tokens)
    if found:
        content["tokens"] = found
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode("utf-8")).hexdigest()


def features_cache_key(base: BaseModel, texts: Sequence[str], dtype: torch.dtype,
                       tokens: Mapping[str, Sequence[Tensor]] | None = None, *,
                       rule: RowRule = ROW_RULES[DEFAULT_ROWS]) -> str:
    """sha256 hex of what decides the feature rows of ``texts`` (e.g. a merge's target prompts).

    The text-encoder and tokenizer files, the architecture, the exact texts, the row rule, the
    text encoder dtype, and the modifier tokens (names and embeddings) occurring in the texts.
    """
    content = {
        "format_version": _CACHE_FORMAT_VERSION,
        "kind": "features",
        "text_fingerprint": base.text_fingerprint,
        "architecture": base.architecture.name,
        "texts": list(texts),
        "feature_rule": rule.name,
        "text_dtype": str(dtype),
        "tokens": tokens_in(texts, tokens),
    }
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode("utf-8")).hexdigest()


def cached_gram(base: BaseModel, captions: Sequence[str], *, rule: RowRule = ROW_RULES[DEFAULT_ROWS],
                device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, tokens: Mapping[str, Sequence[Tensor]] | None = None,
                batch_size: int = 64, cache_dir: str | os.PathLike[str] | None = None,
                progress: bool = False, label: str = "text features",
                encoder: LazyTextFeatures | None = None) -> tuple[Tensor, int, bool]:
    """``(G, n, from_cache)``: :meth:`TextFeatures.gram` of ``captions`` under ``rule``, stored on disk.

    The file is ``gram-<key>.safetensors`` under ``cache_dir`` (default :func:`default_cache_dir`),
    keyed by :func:`gram_cache_key`. A hit loads neither tokenizer nor text encoder; a miss
    uses ``encoder`` when given (its device, dtype and tokens win over the arguments). A cache
    file that is not a valid Gram matrix counts as a miss; an unwritable cache only warns.
    """
    encoder = encoder or LazyTextFeatures(base, tokens, device=device, dtype=dtype)
    (gram, count), from_cache = cached_sets(base, [TextSet(tuple(captions), gram=True, label=label)], rule=rule,
                                            batch_size=batch_size, cache_dir=cache_dir, progress=progress,
                                            encoder=encoder)[0]
    return gram, count, from_cache


def cached_features(base: BaseModel, texts: Sequence[str], *, rule: RowRule = ROW_RULES[DEFAULT_ROWS],
                    device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, tokens: Mapping[str, Sequence[Tensor]] | None = None,
                    batch_size: int = 64, cache_dir: str | os.PathLike[str] | None = None,
                    encoder: LazyTextFeatures | None = None) -> tuple[list[PromptRows], bool]:
    """``(prompts, from_cache)``: :meth:`TextFeatures.prompt_rows` of ``texts`` under ``rule``, stored on disk.

    For the few target prompts of a merge, so that a repeated merge needs no text encoder at
    all. The file is ``features-<key>.safetensors`` (:func:`features_cache_key`); hits, misses,
    ``encoder`` and damaged or unwritable caches behave as in :func:`cached_gram`.
    """
    encoder = encoder or LazyTextFeatures(base, tokens, device=device, dtype=dtype)
    return cached_sets(base, [TextSet(tuple(texts))], rule=rule, batch_size=batch_size, cache_dir=cache_dir,
                       encoder=encoder)[0]


def cached_sets(base: BaseModel, sets: Sequence[TextSet], *, rule: RowRule, batch_size: int,
                cache_dir: str | os.PathLike[str] | None, encoder: LazyTextFeatures,
                progress: bool = False) -> list[tuple[list[PromptRows] | tuple[Tensor, int], bool]]:
    """Per set, ``(its result, from_cache)``: :func:`cached_gram` of a ``gram`` set, else
    :func:`cached_features`, with every miss encoded in one :meth:`TextFeatures.encode` call, so
    that each text encoder is loaded once for all of them (SDXL's two one after the other)."""
    for text_set in sets:
        if not text_set.texts:
            raise MergeError("No regularisation captions to compute a Gram matrix from." if text_set.gram
                             else "No prompts to compute features of.")
    cache = _cache_folder(base, cache_dir)
    width = sum(base.token_dims())
    paths, found = [], []
    for text_set in sets:
        if text_set.gram:
            key = gram_cache_key(base, text_set.texts, encoder.dtype, encoder.tokens, rule=rule)
            paths.append(cache / f"gram-{key}.safetensors")
            found.append(_read_gram(paths[-1], width))
        else:
            key = features_cache_key(base, text_set.texts, encoder.dtype, encoder.tokens, rule=rule)
            paths.append(cache / f"features-{key}.safetensors")
            found.append(_read_features(paths[-1], len(text_set.texts), width))
    misses = [index for index, result in enumerate(found) if result is None]
    if misses:
        encoded = encoder.get().encode([sets[index] for index in misses], rule=rule, batch_size=batch_size,
                                       progress=progress)
        for index, result in zip(misses, encoded):
            found[index] = _write_result(base, sets[index], result, paths[index], rule, encoder.dtype)
    return [(result, index not in misses) for index, result in enumerate(found)]


def _write_result(base: BaseModel, text_set: TextSet, result: list[PromptRows] | tuple[Tensor, int], path: Path,
                  rule: RowRule, dtype: torch.dtype) -> list[PromptRows] | tuple[Tensor, int]:
    """Cache a set's freshly encoded result; return it as the cache would give it back."""
    if text_set.gram:
        gram, count = result
        metadata = {"format_version": _CACHE_FORMAT_VERSION, "rows": str(count), "feature_rule": rule.name,
                    "base": base.name, "base_fingerprint": base.fingerprint, "text_dtype": str(dtype),
                    "num_captions": str(len(text_set.texts))}
        _write_cache(path, {"gram": gram}, metadata, f"the Gram matrix of {len(text_set.texts)} captions")
        return result
    # own storage each: rows of one batch are views of one tensor, which safetensors may refuse
    prompts = [PromptRows(prompt.rows.clone(), prompt.tokens) for prompt in result]
    metadata = {"format_version": _CACHE_FORMAT_VERSION, "feature_rule": rule.name, "base": base.name,
                "text_dtype": str(dtype), "num_texts": str(len(text_set.texts)),
                "token_rows": json.dumps([[prompt.tokens.start, prompt.tokens.stop] for prompt in prompts])}
    _write_cache(path, {str(index): prompt.rows for index, prompt in enumerate(prompts)}, metadata,
                 "the target features")
    return prompts


def cached_base_outputs(base: BaseModel, captions: Sequence[str], held_gram: Tensor, *,
                        rule: RowRule = ROW_RULES[DEFAULT_ROWS], dtype: torch.dtype = torch.float32,
                        tokens: Mapping[str, Sequence[Tensor]] | None = None,
                        cache_dir: str | os.PathLike[str] | None = None,
                        encoder: LazyTextFeatures | None = None) -> float:
    """``||W0 C_h^T||^2`` over every layer of ``base`` (K then V rows, float64, on ``held_gram``'s
    device), ``held_gram`` being the Gram matrix of ``captions``: the denominator of a merge
    report's held-out drift. It is the same for every merge on this base with these captions, and
    costs n d^2 a layer, as much as the naive sum's drift; so it is stored beside their Gram
    matrix, as ``base-outputs-<key>.safetensors`` under :func:`gram_cache_key` (whose base
    fingerprint is of these K/V weights), and computed only on a miss. ``encoder``'s dtype and
    tokens win over the arguments, as in :func:`cached_gram`; damaged files are misses, an
    unwritable cache warns."""
    if encoder is not None:
        dtype, tokens = encoder.dtype, encoder.tokens
    folder = _cache_folder(base, cache_dir)
    key = gram_cache_key(base, captions, dtype, tokens, rule=rule)
    path = folder / f"base-outputs-{key}.safetensors"
    cached = _read_squared_norm(path)
    if cached is not None:
        return cached
    total = 0.0
    for name in base.layer_names():
        total += quadratic(torch.cat(base.kv(name)).to(held_gram.device, torch.float64), held_gram)
    metadata = {"format_version": _CACHE_FORMAT_VERSION, "feature_rule": rule.name, "base": base.name,
                "base_fingerprint": base.fingerprint, "num_captions": str(len(captions))}
    _write_cache(path, {"squared_norm": torch.tensor(total, dtype=torch.float64)}, metadata,
                 "the base's held-out outputs")
    return total


def cache_folder(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cache folder: ``cache_dir``, else :func:`default_cache_dir`."""
    return Path(cache_dir or default_cache_dir()).expanduser()


def _cache_folder(base: BaseModel, cache_dir: str | os.PathLike[str] | None) -> Path:
    """:func:`cache_folder`, where the digests of the base's files behind every key
    (:attr:`BaseModel.text_fingerprint`, :attr:`BaseModel.fingerprint`) are remembered too
    (:meth:`BaseModel.remember_in`): a repeated merge stats them instead of reading them."""
    folder = cache_folder(cache_dir)
    base.remember_in(folder)
    return folder


def _read_squared_norm(path: Path) -> float | None:
    """The cached squared norm, or None when the file is missing or damaged (not one finite,
    non-negative float64)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            value = handle.get_tensor("squared_norm")
    except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, whatever the damage
        return None
    if value.dtype != torch.float64 or value.shape != () or not bool(torch.isfinite(value)) or float(value) < 0:
        return None
    return float(value)


def _read_gram(path: Path, width: int) -> tuple[Tensor, int] | None:
    """The cached (G, n), or None when the file is missing or is not a valid Gram matrix.

    Valid: float64, ``width`` x ``width``, finite, symmetric with a non-negative diagonal, and a
    positive row count in the metadata. Anything else (a truncated file, one NaN written into
    it) is a miss and gets recomputed: a damaged cache must never reach the solver.
    """
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            gram = handle.get_tensor("gram").clone()  # a copy: a view would keep the file mapped
            rows = int(handle.metadata()["rows"])
    except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, whatever the damage
        return None
    if gram.dtype != torch.float64 or gram.shape != (width, width) or rows < 1:
        return None
    if not torch.isfinite(gram).all() or (gram.diagonal() < 0).any():
        return None
    if (gram - gram.T).abs().max() > SYMMETRY_RTOL * gram.abs().max():
        return None
    return gram, rows


def _read_features(path: Path, count: int, width: int) -> list[PromptRows] | None:
    """The cached feature rows of ``count`` texts, or None when the file is missing or damaged.

    Valid: tensors ``"0"`` .. ``str(count - 1)``, each float32, ``(rows, width)`` and finite, and
    per text a span of token rows ``[start, stop]`` within its rows (metadata ``token_rows``); as
    with the Gram matrix, anything else is recomputed.
    """
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            if set(handle.keys()) != {str(index) for index in range(count)}:
                return None
            rows = [handle.get_tensor(str(index)).clone() for index in range(count)]  # copies, as above
            spans = json.loads(handle.metadata()["token_rows"])
    except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, whatever the damage
        return None
    if not isinstance(spans, list) or len(spans) != count:
        return None
    prompts = []
    for row, span in zip(rows, spans):
        if row.dtype != torch.float32 or row.dim() != 2 or row.shape[1] != width or not torch.isfinite(row).all():
            return None
        if not (isinstance(span, list) and len(span) == 2 and all(type(end) is int for end in span)
                and 0 <= span[0] <= span[1] <= row.shape[0]):
            return None
        prompts.append(PromptRows(row, slice(*span)))
    return prompts


def _write_cache(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str], what: str) -> None:
    """Write atomically, so readers never see half a file; a cache that cannot be written (no
    space, no permission) only warns: the merge goes on without it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, force=True) as temporary:
            save_safetensors({name: tensor.contiguous() for name, tensor in tensors.items()}, temporary,
                             metadata=metadata)
    except (OSError, MergeError) as error:
        warnings.warn(f"Could not cache {what} in {path.parent}: {error}", stacklevel=4)
