"""Token features of captions, exactly as the UNet's cross-attention layers read them.

SD1.x / SD2.x: ``text_encoder(input_ids)[0]``, the last hidden state after the final layer
norm. SDXL: ``hidden_states[-2]`` of both text encoders, concatenated on the feature axis
(REFERENCE 1b). Captions are tokenized without padding (truncated to the tokenizer's 77
tokens); captions of equal token length are encoded together, so batching never pads.

Which rows of a caption's features count (:func:`kept_rows`) follows the authors' diffusers
merge script exactly; :data:`FEATURE_RULE` names that rule so caches and merge metadata can
record it. :func:`cached_gram` stores the regularisation Gram matrix ``C_reg^T C_reg`` on disk,
keyed by the base fingerprint, the captions, the rule, the text encoder dtype and the tokens
that occur in the captions; :func:`cached_features` does the same for a merge's target prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from .delta import check_token_name
from .devices import float64_device
from .errors import MergeError
from .fileio import atomic_path, save_safetensors
from .tokens import check_new, install

if TYPE_CHECKING:
    from .base import BaseModel

#: Name of the row rule of :func:`kept_rows`; part of every Gram cache key.
FEATURE_RULE = "authors-v1"
#: The authors drop the rows of this phrase (and BOS) when it starts a caption.
PHOTO_PHRASE = "photo of a"
#: ... where "starts" is their test: the phrase occurs within the first 15 characters.
PHOTO_PHRASE_WINDOW = 15

#: Target prompts of an object concept: the paper's two prompts.
OBJECT_TEMPLATES = ("{token} {class_word}", "photo of a {token} {class_word}")
#: Target prompts of a style concept: the authors' style prompt plus the bare token prompt.
STYLE_TEMPLATES = ("{token} {class_word}", "painting in the style of {token} {class_word}")

_CACHE_FORMAT_VERSION = "1"
#: A cached Gram matrix whose largest asymmetry exceeds this fraction of its largest entry is damaged
#: (accumulating ``C^T C`` in float64, on any device, stays many orders of magnitude closer).
SYMMETRY_RTOL = 1e-10


def kept_rows(caption: str, num_tokens: int) -> slice:
    """Rows of a caption's ``num_tokens`` token features (BOS .. EOS, no padding) that count.

    Every token after BOS, EOS included; but when "photo of a" occurs within the first 15
    characters (the authors' test ``"photo of a" in caption[:15]``, so "a photo of a cat"
    qualifies too), the first four rows (BOS and the next three tokens) are dropped.
    """
    start = 4 if PHOTO_PHRASE in caption[:PHOTO_PHRASE_WINDOW] else 1
    return slice(start, num_tokens)


class TextFeatures:
    """The base's tokenizer(s) and text encoder(s), with modifier tokens installed.

    tokens: token -> one embedding per text encoder (in the architecture's order). Each token
    is added to every tokenizer and its rows set in every encoder's embedding table; a token
    the vocabulary already has is refused, as diffusers' textual-inversion loader does.
    """

    def __init__(self, base: BaseModel, tokens: Mapping[str, Sequence[Tensor]] | None = None, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.base = base
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokens = dict(tokens or {})
        self.tokenizers = base.load_tokenizers()
        self.encoders = base.load_text_encoders(self.device, dtype)
        self._install_tokens(self.tokens)

    def _install_tokens(self, tokens: dict[str, Sequence[Tensor]]) -> None:
        """Check every token first, then add them all: a refused token leaves nothing half-done."""
        dims = self.base.token_dims()
        for token, embeddings in tokens.items():
            _check_token(token, embeddings, dims)
        check_new(list(tokens), self.tokenizers, lambda token, _: (
            f"Token {token} is already in the base model's vocabulary; a modifier token must be new "
            f"(rename it, e.g. <new1>)."))
        if tokens:
            for index, (tokenizer, encoder) in enumerate(zip(self.tokenizers, self.encoders)):
                install(tokenizer, encoder, {token: embeddings[index] for token, embeddings in tokens.items()})

    def token_ids(self, captions: Sequence[str]) -> list[list[list[int]]]:
        """Per caption, its token ids from each tokenizer (BOS .. EOS, truncated, no padding)."""
        if not captions:
            return []
        per_tokenizer = [tokenizer(list(captions), truncation=True,
                                   max_length=tokenizer.model_max_length)["input_ids"]
                         for tokenizer in self.tokenizers]
        ids = [list(caption_ids) for caption_ids in zip(*per_tokenizer)]
        for caption, caption_ids in zip(captions, ids):
            if len({len(sequence) for sequence in caption_ids}) != 1:
                raise MergeError(f"The tokenizers of {self.base.name} split {caption!r} into different "
                                 f"numbers of tokens; their features cannot be concatenated.")
        return ids

    def features(self, captions: Sequence[str], *, batch_size: int = 64,
                 progress: bool = False, label: str = "text features") -> list[Tensor]:
        """Per caption, its kept feature rows (rows, d), float32 on the CPU, in input order."""
        by_index: dict[int, Tensor] = {}
        for indices, rows in self._kept_batches(captions, batch_size, progress, label):
            by_index.update((index, caption_rows.float().cpu()) for index, caption_rows in zip(indices, rows))
        return [by_index[index] for index in range(len(captions))]

    def gram(self, captions: Sequence[str], *, batch_size: int = 64,
             progress: bool = False, label: str = "text features") -> tuple[Tensor, int]:
        """``(G, n)``: G = C^T C of the stacked kept rows C (float64, CPU), n = number of rows.

        Accumulated batch by batch, so the features of all captions are never held at once;
        ``label`` names the progress bar.
        """
        if not captions:
            raise MergeError("No captions to compute a Gram matrix from.")
        device = float64_device(self.device)
        width = sum(self.base.token_dims())
        gram = torch.zeros(width, width, dtype=torch.float64, device=device)
        count = 0
        for _, rows in self._kept_batches(captions, batch_size, progress, label):
            stacked = torch.cat(rows).to(device, torch.float64)
            gram += stacked.T @ stacked
            count += stacked.shape[0]
        return gram.cpu(), count

    def _kept_batches(self, captions: Sequence[str], batch_size: int,
                      progress: bool, label: str) -> Iterator[tuple[list[int], list[Tensor]]]:
        """(caption indices, their kept rows) per batch of captions of equal token length."""
        if batch_size < 1:
            raise MergeError(f"batch_size must be at least 1, got {batch_size}.")
        ids = self.token_ids(captions)
        by_length: dict[int, list[int]] = {}
        for index, caption_ids in enumerate(ids):
            by_length.setdefault(len(caption_ids[0]), []).append(index)
        with tqdm(total=len(captions), disable=not progress, desc=label, unit="caption") as bar:
            for length in sorted(by_length):
                group = by_length[length]
                for start in range(0, len(group), batch_size):
                    indices = group[start:start + batch_size]
                    states = self._encode([ids[index] for index in indices], [captions[index] for index in indices])
                    yield indices, [states[row, kept_rows(captions[index], length)]
                                    for row, index in enumerate(indices)]
                    bar.update(len(indices))

    def _encode(self, batch: list[list[list[int]]], texts: list[str]) -> Tensor:
        """Cross-attention context (batch, tokens, d) of equal-length token id sequences.

        Non-finite features (a float16 encoder that overflows, damaged weights) are refused here,
        naming the encoder and dtype, so that no NaN reaches a Gram matrix, its cache or a solve.
        """
        hidden_state = self.base.architecture.hidden_state  # None: last, after the final norm
        states = []
        with torch.no_grad():
            for index, encoder in enumerate(self.encoders):
                input_ids = torch.tensor([caption_ids[index] for caption_ids in batch], device=self.device)
                output = encoder(input_ids, output_hidden_states=hidden_state is not None)
                state = output.last_hidden_state if hidden_state is None else output.hidden_states[hidden_state]
                finite = torch.isfinite(state).flatten(1).all(dim=1)
                if not finite.all():
                    text = texts[int((~finite).nonzero()[0])]
                    raise self._non_finite_error(self.base.architecture.text_encoders[index], text)
                states.append(state)
        return torch.cat(states, dim=-1)

    def _non_finite_error(self, component: str, text: str) -> MergeError:
        """The error for NaN or infinite features from ``component``, with what to try next."""
        dtype = str(self.dtype).removeprefix("torch.")
        remedy = ("run it in float32 (--dtype float32)" if self.dtype in (torch.float16, torch.bfloat16)
                  else "its weights may be damaged")
        return MergeError(f"The text encoder {component} of {self.base.name} gave NaN or infinite features "
                          f"in {dtype} (for {text!r}); {remedy}.")


class LazyTextFeatures:
    """A :class:`TextFeatures` built on first use, then shared by every cache miss.

    :func:`cached_gram` and :func:`cached_features` take one, so a merge whose text features
    are all cached loads no tokenizer or text encoder, and one with misses loads them once.
    """

    def __init__(self, base: BaseModel, tokens: Mapping[str, Sequence[Tensor]] | None = None, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.base = base
        self.tokens = dict(tokens or {})
        self.device = torch.device(device)
        self.dtype = dtype
        self._built: TextFeatures | None = None

    def get(self) -> TextFeatures:
        """The encoder, loaded (and the tokens installed) on the first call."""
        if self._built is None:
            self._built = TextFeatures(self.base, self.tokens, device=self.device, dtype=self.dtype)
        return self._built


def _check_token(token: str, embeddings: Sequence[Tensor], dims: tuple[int, ...]) -> None:
    """A modifier token's name follows the one rule, with one embedding of the right size per encoder."""
    check_token_name(token)
    sizes = tuple(int(embedding.shape[-1]) for embedding in embeddings)
    if sizes != dims:
        raise MergeError(f"Token {token} has embedding sizes {sizes}, but the text encoder(s) need {dims}.")


def target_prompts(token: str, class_word: str, *, templates: Sequence[str] | None = None,
                   style: bool = False) -> list[str]:
    """A concept's target prompts: each template filled with ``token`` and ``class_word``.

    Defaults: :data:`OBJECT_TEMPLATES`, or :data:`STYLE_TEMPLATES` when ``style`` is set.
    Style is only ever this explicit flag: the authors switched templates whenever the class
    string contained "art", so "cartoon" or "party" counted as styles. Runs of spaces are
    collapsed (an empty class word or token leaves no stray space) and repeated prompts
    dropped (duplicate constraints would make the hard merge singular).
    """
    chosen = tuple(templates) if templates else (STYLE_TEMPLATES if style else OBJECT_TEMPLATES)
    prompts: list[str] = []
    for template in chosen:
        if "{token}" not in template:
            raise MergeError(f"Target template {template!r} lacks {{token}}; every target prompt must "
                             f"contain the concept's modifier token.")
        try:
            prompt = " ".join(template.format(token=token, class_word=class_word).split())
        except (KeyError, IndexError, ValueError) as error:
            raise MergeError(f"Target template {template!r} may only use {{token}} and {{class_word}} "
                             f"({error!r}).") from None
        if prompt not in prompts:
            prompts.append(prompt)
    return prompts


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
                   tokens: Mapping[str, Sequence[Tensor]] | None = None) -> str:
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
        "feature_rule": FEATURE_RULE,
        "text_dtype": str(dtype),
    }
    found = tokens_in(captions, tokens)
    if found:
        content["tokens"] = found
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode("utf-8")).hexdigest()


def features_cache_key(base: BaseModel, texts: Sequence[str], dtype: torch.dtype,
                       tokens: Mapping[str, Sequence[Tensor]] | None = None) -> str:
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
        "feature_rule": FEATURE_RULE,
        "text_dtype": str(dtype),
        "tokens": tokens_in(texts, tokens),
    }
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode("utf-8")).hexdigest()


def cached_gram(base: BaseModel, captions: Sequence[str], *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, tokens: Mapping[str, Sequence[Tensor]] | None = None,
                batch_size: int = 64, cache_dir: str | os.PathLike[str] | None = None,
                progress: bool = False, label: str = "text features",
                encoder: LazyTextFeatures | None = None) -> tuple[Tensor, int, bool]:
    """``(G, n, from_cache)``: :meth:`TextFeatures.gram` of ``captions``, stored on disk.

    The file is ``gram-<key>.safetensors`` under ``cache_dir`` (default :func:`default_cache_dir`),
    keyed by :func:`gram_cache_key`. A hit loads neither tokenizer nor text encoder; a miss
    uses ``encoder`` when given (its device, dtype and tokens win over the arguments). A cache
    file that is not a valid Gram matrix counts as a miss; an unwritable cache only warns.
    """
    if not captions:
        raise MergeError("No regularisation captions to compute a Gram matrix from.")
    encoder = encoder or LazyTextFeatures(base, tokens, device=device, dtype=dtype)
    key = gram_cache_key(base, captions, encoder.dtype, encoder.tokens)
    path = Path(cache_dir or default_cache_dir()).expanduser() / f"gram-{key}.safetensors"
    cached = _read_gram(path, sum(base.token_dims()))
    if cached is not None:
        return (*cached, True)
    gram, count = encoder.get().gram(captions, batch_size=batch_size, progress=progress, label=label)
    metadata = {"format_version": _CACHE_FORMAT_VERSION, "rows": str(count), "feature_rule": FEATURE_RULE,
                "base": base.name, "base_fingerprint": base.fingerprint, "text_dtype": str(encoder.dtype),
                "num_captions": str(len(captions))}
    _write_cache(path, {"gram": gram}, metadata, f"the Gram matrix of the {label}")
    return gram, count, False


def cached_features(base: BaseModel, texts: Sequence[str], *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, tokens: Mapping[str, Sequence[Tensor]] | None = None,
                    batch_size: int = 64, cache_dir: str | os.PathLike[str] | None = None,
                    encoder: LazyTextFeatures | None = None) -> tuple[list[Tensor], bool]:
    """``(rows, from_cache)``: :meth:`TextFeatures.features` of ``texts``, stored on disk.

    For the few target prompts of a merge, so that a repeated merge needs no text encoder at
    all. The file is ``features-<key>.safetensors`` (:func:`features_cache_key`); hits, misses,
    ``encoder`` and damaged or unwritable caches behave as in :func:`cached_gram`.
    """
    if not texts:
        raise MergeError("No prompts to compute features of.")
    encoder = encoder or LazyTextFeatures(base, tokens, device=device, dtype=dtype)
    key = features_cache_key(base, texts, encoder.dtype, encoder.tokens)
    path = Path(cache_dir or default_cache_dir()).expanduser() / f"features-{key}.safetensors"
    cached = _read_features(path, len(texts), sum(base.token_dims()))
    if cached is not None:
        return cached, True
    # own storage each: rows of one batch are views of one tensor, which safetensors may refuse
    rows = [row.clone() for row in encoder.get().features(texts, batch_size=batch_size)]
    metadata = {"format_version": _CACHE_FORMAT_VERSION, "feature_rule": FEATURE_RULE, "base": base.name,
                "text_dtype": str(encoder.dtype), "num_texts": str(len(texts))}
    _write_cache(path, {str(index): row for index, row in enumerate(rows)}, metadata, "the target features")
    return rows, False


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


def _read_features(path: Path, count: int, width: int) -> list[Tensor] | None:
    """The cached feature rows of ``count`` texts, or None when the file is missing or damaged.

    Valid: tensors ``"0"`` .. ``str(count - 1)``, each float32, ``(rows, width)`` and finite; as
    with the Gram matrix, anything else is recomputed.
    """
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            if set(handle.keys()) != {str(index) for index in range(count)}:
                return None
            rows = [handle.get_tensor(str(index)).clone() for index in range(count)]  # copies, as above
    except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, whatever the damage
        return None
    for row in rows:
        if row.dtype != torch.float32 or row.dim() != 2 or row.shape[1] != width or not torch.isfinite(row).all():
            return None
    return rows


def _write_cache(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str], what: str) -> None:
    """Write atomically, so readers never see half a file; a cache that cannot be written (no
    space, no permission) only warns: the merge goes on without it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, force=True) as temporary:
            save_safetensors({name: tensor.contiguous() for name, tensor in tensors.items()}, temporary,
                             metadata=metadata)
    except (OSError, MergeError) as error:
        warnings.warn(f"Could not cache {what} in {path.parent}: {error}", stacklevel=3)


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
