"""Token features of captions, exactly as the UNet's cross-attention layers read them.

SD1.x / SD2.x: ``text_encoder(input_ids)[0]``, the last hidden state after the final layer
norm. SDXL: ``hidden_states[-2]`` of both text encoders, concatenated on the feature axis
(REFERENCE 1b).

Which rows of a caption's features count is a row rule (:data:`ROW_RULES`, chosen by name):

- ``authors`` (:func:`kept_rows`) follows the authors' diffusers merge script exactly: captions
  tokenized without padding (truncated to the tokenizer's 77 tokens), every row after BOS up to
  EOS, "photo of a" dropping four. Captions of equal token length are encoded together, so
  batching never pads.
- ``pipeline``: every row a diffusers pipeline feeds the UNet, tokenized as ``encode_prompt``
  does (padded to the tokenizer's max length with its own pad token), BOS included. Every
  caption has the same length, so captions of any length share a batch.

Each rule's :attr:`RowRule.name` goes into the caches' keys and the merge metadata. Under either
rule a prompt's *token rows* are the ones the authors' rule keeps; under the pipeline rule the
others (BOS, a dropped "photo of a", the padding) are its *context rows* (:class:`PromptRows`).
The disk cache of these features is :mod:`mergekit_cd.feature_cache`; target prompts are
:mod:`mergekit_cd.prompts`, caption files :mod:`mergekit_cd.captions`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .delta import check_token_name
from .devices import float64_device
from .errors import MergeError
from .tokens import check_new, install

if TYPE_CHECKING:
    from .base import BaseModel

#: The authors drop the rows of this phrase (and BOS) when it starts a caption.
PHOTO_PHRASE = "photo of a"
#: ... where "starts" is their test: the phrase occurs within the first 15 characters.
PHOTO_PHRASE_WINDOW = 15



def kept_rows(caption: str, num_tokens: int) -> slice:
    """Rows of a caption's ``num_tokens`` token features (BOS .. EOS, no padding) that count.

    Every token after BOS, EOS included; but when "photo of a" occurs within the first 15
    characters (the authors' test ``"photo of a" in caption[:15]``, so "a photo of a cat"
    qualifies too), the first four rows (BOS and the next three tokens) are dropped.
    """
    start = 4 if PHOTO_PHRASE in caption[:PHOTO_PHRASE_WINDOW] else 1
    return slice(start, num_tokens)


@dataclass(frozen=True)
class RowRule:
    """Which rows of a caption's features a merge uses (see the module docstring).

    ``name`` is recorded in cache keys and merge metadata; a rule that changes gets a new one.
    ``padded``: tokenized as diffusers' ``encode_prompt`` does, padded to the tokenizer's max
    length with its own pad token, and every row kept; else unpadded, the authors' rows kept.
    """

    name: str
    padded: bool
    summary: str

    def rows(self, caption: str, num_tokens: int) -> slice:
        """The rows of the encoded sequence (``num_tokens`` real tokens, BOS .. EOS) that count."""
        return slice(0, None) if self.padded else kept_rows(caption, num_tokens)

    def token_rows(self, caption: str, num_tokens: int) -> slice:
        """Among :meth:`rows`, the caption's token rows (those the authors' rule keeps)."""
        kept = kept_rows(caption, num_tokens)
        return kept if self.padded else slice(0, kept.stop - kept.start)


#: The row rules by the name ``MergeOptions.rows`` and ``cd-merge --rows`` take.
ROW_RULES: dict[str, RowRule] = {
    "authors": RowRule("authors-v1", False,
                       "the authors' rows: each caption unpadded, the rows after BOS up to EOS ('photo of a' "
                       "drops four); the start and padding rows the UNet also reads are left free"),
    "pipeline": RowRule("pipeline-v1", True,
                        "every row a diffusers pipeline feeds the UNet: padded to the tokenizer's max length "
                        "with its own pad token, BOS included; a target prompt's rows beyond the authors' "
                        "are its context rows"),
}
#: The rule a merge uses unless told otherwise: the paper's.
DEFAULT_ROWS = "authors"


def row_rule(name: str) -> RowRule:
    """The row rule called ``name``, or one MergeError listing the choices."""
    if name not in ROW_RULES:
        raise MergeError(f"Unknown row rule {name!r}; choose one of {', '.join(ROW_RULES)}.")
    return ROW_RULES[name]


@dataclass(frozen=True)
class PromptRows:
    """One prompt's feature rows under a row rule, and which of them are its token rows."""

    rows: Tensor  # (r, d)
    tokens: slice  # the token rows among them; the others are its context rows

    @property
    def token_rows(self) -> Tensor:
        return self.rows[self.tokens]

    @property
    def context_rows(self) -> Tensor:
        """The rows that are not token rows (none under the authors' rule), in order."""
        return torch.cat([self.rows[:self.tokens.start], self.rows[self.tokens.stop:]])


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
        return self._tokenize(captions, padded=False)[0]

    def _tokenize(self, captions: Sequence[str], *, padded: bool) -> tuple[list[list[list[int]]], list[int]]:
        """Per caption its token ids from each tokenizer, and its number of real tokens (BOS .. EOS).

        ``padded``: as diffusers' ``encode_prompt`` tokenizes, ``padding="max_length"`` to the
        tokenizer's ``model_max_length`` with its own pad token. The tokenizers must agree on both
        lengths, or their features could not be concatenated row by row.
        """
        if not captions:
            return [], []
        padding = {"padding": "max_length"} if padded else {}
        encoded = [tokenizer(list(captions), truncation=True, max_length=tokenizer.model_max_length, **padding)
                   for tokenizer in self.tokenizers]
        ids = [list(caption_ids) for caption_ids in zip(*(tokens["input_ids"] for tokens in encoded))]
        counts = [list(caption_counts) for caption_counts in
                  zip(*([sum(mask) for mask in tokens["attention_mask"]] for tokens in encoded))]
        for caption, caption_ids, caption_counts in zip(captions, ids, counts):
            if len({len(sequence) for sequence in caption_ids}) != 1 or len(set(caption_counts)) != 1:
                raise MergeError(f"The tokenizers of {self.base.name} split {caption!r} into different "
                                 f"numbers of tokens; their features cannot be concatenated.")
        return ids, [caption_counts[0] for caption_counts in counts]

    def features(self, captions: Sequence[str], *, rule: RowRule = ROW_RULES[DEFAULT_ROWS], batch_size: int = 64,
                 progress: bool = False, label: str = "text features") -> list[Tensor]:
        """Per caption, the feature rows ``rule`` keeps (rows, d), float32 on the CPU, in input order."""
        return [prompt.rows for prompt in self.prompt_rows(captions, rule=rule, batch_size=batch_size,
                                                           progress=progress, label=label)]

    def prompt_rows(self, captions: Sequence[str], *, rule: RowRule = ROW_RULES[DEFAULT_ROWS], batch_size: int = 64,
                    progress: bool = False, label: str = "text features") -> list[PromptRows]:
        """Per caption, the rows ``rule`` keeps (float32, CPU) and which are its token rows, in input order."""
        by_index: dict[int, PromptRows] = {}
        for indices, prompts in self._rule_batches(captions, rule, batch_size, progress, label):
            by_index.update((index, PromptRows(prompt.rows.float().cpu(), prompt.tokens))
                            for index, prompt in zip(indices, prompts))
        return [by_index[index] for index in range(len(captions))]

    def gram(self, captions: Sequence[str], *, rule: RowRule = ROW_RULES[DEFAULT_ROWS], batch_size: int = 64,
             progress: bool = False, label: str = "text features") -> tuple[Tensor, int]:
        """``(G, n)``: G = C^T C of the stacked rows C that ``rule`` keeps (float64, CPU), n = number of rows.

        Accumulated batch by batch, so the features of all captions are never held at once;
        ``label`` names the progress bar.
        """
        if not captions:
            raise MergeError("No captions to compute a Gram matrix from.")
        device = float64_device(self.device)
        width = sum(self.base.token_dims())
        gram = torch.zeros(width, width, dtype=torch.float64, device=device)
        count = 0
        for _, prompts in self._rule_batches(captions, rule, batch_size, progress, label):
            stacked = torch.cat([prompt.rows for prompt in prompts]).to(device, torch.float64)
            gram += stacked.T @ stacked
            count += stacked.shape[0]
        return gram.cpu(), count

    def _rule_batches(self, captions: Sequence[str], rule: RowRule, batch_size: int,
                      progress: bool, label: str) -> Iterator[tuple[list[int], list[PromptRows]]]:
        """(caption indices, their rows under ``rule``) per batch of captions of equal token length
        (under a padded rule every caption has the same length, so batches are just consecutive)."""
        if batch_size < 1:
            raise MergeError(f"batch_size must be at least 1, got {batch_size}.")
        ids, counts = self._tokenize(captions, padded=rule.padded)
        by_length: dict[int, list[int]] = {}
        for index, caption_ids in enumerate(ids):
            by_length.setdefault(len(caption_ids[0]), []).append(index)
        with tqdm(total=len(captions), disable=not progress, desc=label, unit="caption") as bar:
            for length in sorted(by_length):
                group = by_length[length]
                for start in range(0, len(group), batch_size):
                    indices = group[start:start + batch_size]
                    states = self._encode([ids[index] for index in indices], [captions[index] for index in indices])
                    yield indices, [PromptRows(states[row, rule.rows(captions[index], counts[index])],
                                               rule.token_rows(captions[index], counts[index]))
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

    @property
    def loaded(self) -> bool:
        """Whether :meth:`get` loaded the encoder (every feature cached: it never did)."""
        return self._built is not None

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
