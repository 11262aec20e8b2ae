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

import gc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
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


@dataclass(frozen=True)
class TextSet:
    """Texts that :meth:`TextFeatures.encode` encodes as one batch set: their prompts' rows, or
    (``gram``) only the Gram matrix of all their rows, summed batch by batch so that they are
    never all held. Batches never mix two sets: a set's features do not depend on the others.
    ``label`` names its progress bar (None: no bar)."""

    texts: tuple[str, ...]
    gram: bool = False
    label: str | None = None


class TextFeatures:
    """The base's tokenizer(s) and text encoder(s), with modifier tokens installed.

    tokens: token -> one embedding per text encoder (in the architecture's order). Each token
    is added to every tokenizer and its rows set in every encoder's embedding table; a token
    the vocabulary already has is refused, as diffusers' textual-inversion loader does.

    The encoders are loaded when first needed and held one at a time (:meth:`encoder`): SDXL's
    two take 3.3 GB in float32, OpenCLIP bigG alone 2.8 GB. :meth:`encode` therefore runs all its
    texts through one encoder before it loads the next, holding the earlier encoders' states
    (float32) of every batch meanwhile; give it every set at once, and each encoder loads once.
    """

    def __init__(self, base: BaseModel, tokens: Mapping[str, Sequence[Tensor]] | None = None, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.base = base
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokens = dict(tokens or {})
        self.tokenizers = base.load_tokenizers()
        self._held: tuple[int, Any] | None = None  # (index, model): the one encoder in memory
        dims = base.token_dims()
        for token, embeddings in self.tokens.items():
            _check_token(token, embeddings, dims)
        check_new(list(self.tokens), self.tokenizers, lambda token, _: (
            f"Token {token} is already in the base model's vocabulary; a modifier token must be new "
            f"(rename it, e.g. <new1>)."))
        for tokenizer in self.tokenizers:  # tokenizing needs them before any encoder is loaded
            tokenizer.add_tokens(list(self.tokens))

    def encoder(self, index: int) -> Any:
        """Text encoder ``index``, its tokens' rows installed, cut to the layers the context needs
        (:func:`_context_layers_only`): the one held in memory; another is released first."""
        if self._held is None or self._held[0] != index:
            self._held = None
            gc.collect()  # the encoder released, before the next one loads
            model = _context_layers_only(self.base.load_text_encoder(index, self.device, self.dtype),
                                         self.base.architecture.hidden_state)
            if self.tokens:
                install(self.tokenizers[index], model,
                        {token: embeddings[index] for token, embeddings in self.tokens.items()}, copy_table=False)
            self._held = (index, model)
        return self._held[1]

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
        return self.encode([TextSet(tuple(captions), label=label)], rule=rule, batch_size=batch_size,
                           progress=progress)[0]

    def gram(self, captions: Sequence[str], *, rule: RowRule = ROW_RULES[DEFAULT_ROWS], batch_size: int = 64,
             progress: bool = False, label: str = "text features") -> tuple[Tensor, int]:
        """``(G, n)``: G = C^T C of the stacked rows C that ``rule`` keeps (float64, CPU), n = number of rows.

        Accumulated batch by batch, so the features of all captions are never held at once;
        ``label`` names the progress bar.
        """
        return self.encode([TextSet(tuple(captions), gram=True, label=label)], rule=rule, batch_size=batch_size,
                           progress=progress)[0]

    def encode(self, sets: Sequence[TextSet], *, rule: RowRule = ROW_RULES[DEFAULT_ROWS], batch_size: int = 64,
               progress: bool = False) -> list[list[PromptRows] | tuple[Tensor, int]]:
        """Per set, :meth:`prompt_rows` of its texts, or (a ``gram`` set) :meth:`gram` of them, with
        each text encoder loaded once for all the sets: every batch of every set goes through one
        encoder, whose states are held until the next encoder's of the same batch come. The encoder
        already held goes first, so that a later call does not load it again.
        ``progress``: a bar per labelled set and encoder."""
        if batch_size < 1:
            raise MergeError(f"batch_size must be at least 1, got {batch_size}.")
        if any(text_set.gram and not text_set.texts for text_set in sets):
            raise MergeError("No captions to compute a Gram matrix from.")
        batched = [self._batches(text_set.texts, rule, batch_size) for text_set in sets]
        held: list[list[dict[int, Tensor]]] = [[{} for _ in batches] for _, _, batches in batched]
        order = sorted(range(len(self.tokenizers)), key=lambda index: self._held is None or self._held[0] != index)
        *first, last = order
        for index in first:
            for text_set, (ids, _, batches), states in zip(sets, batched, held):
                with self._bar(text_set, index, progress) as bar:
                    for indices, batch_states in zip(batches, states):
                        batch_states[index] = self._encode(index, [ids[i] for i in indices],
                                                           [text_set.texts[i] for i in indices])
                        bar.update(len(indices))
        results = []
        for text_set, (ids, counts, batches), states in zip(sets, batched, held):
            with self._bar(text_set, last, progress) as bar:
                results.append(self._finish(text_set, ids, counts, batches, states, last, rule, bar))
        return results

    def _bar(self, text_set: TextSet, index: int, progress: bool) -> tqdm:
        """The progress bar of a set's pass through encoder ``index`` (named by it where there are two)."""
        components = self.base.architecture.text_encoders
        label = text_set.label if len(components) == 1 else f"{text_set.label} ({components[index]})"
        return tqdm(total=len(text_set.texts), disable=not progress or text_set.label is None, desc=label,
                    unit="caption")

    def _batches(self, captions: Sequence[str], rule: RowRule,
                 batch_size: int) -> tuple[list[list[list[int]]], list[int], list[list[int]]]:
        """Token ids and real-token counts of ``captions`` (:meth:`_tokenize`), and their batches as
        caption indices: captions of equal token length (under a padded rule every caption has the
        same length, so batches are just consecutive)."""
        ids, counts = self._tokenize(captions, padded=rule.padded)
        by_length: dict[int, list[int]] = {}
        for index, caption_ids in enumerate(ids):
            by_length.setdefault(len(caption_ids[0]), []).append(index)
        batches = [group[start:start + batch_size] for length in sorted(by_length)
                   for group in (by_length[length],) for start in range(0, len(group), batch_size)]
        return ids, counts, batches

    def _finish(self, text_set: TextSet, ids: list[list[list[int]]], counts: list[int], batches: list[list[int]],
                held: list[dict[int, Tensor]], last: int, rule: RowRule,
                bar: tqdm) -> list[PromptRows] | tuple[Tensor, int]:
        """One set through encoder ``last``, each batch's states joined, in the encoders' order, to
        the other encoders' (released as they are used): its prompts' rows, or its Gram matrix and
        row count."""
        texts = text_set.texts
        device = float64_device(self.device)
        width = sum(self.base.token_dims())
        gram = torch.zeros(width, width, dtype=torch.float64, device=device) if text_set.gram else None
        count, by_index = 0, {}
        for indices, earlier in zip(batches, held):
            earlier[last] = self._encode(last, [ids[i] for i in indices], [texts[i] for i in indices])
            states = torch.cat([earlier[index] for index in sorted(earlier)], dim=-1)
            earlier.clear()
            prompts = [PromptRows(states[row, rule.rows(texts[index], counts[index])],
                                  rule.token_rows(texts[index], counts[index])) for row, index in enumerate(indices)]
            if gram is not None:
                stacked = torch.cat([prompt.rows for prompt in prompts]).to(device, torch.float64)
                gram += stacked.T @ stacked
                count += stacked.shape[0]
            else:
                by_index.update((index, PromptRows(prompt.rows.float().cpu(), prompt.tokens))
                                for index, prompt in zip(indices, prompts))
            bar.update(len(indices))
        if gram is not None:
            return gram.cpu(), count
        return [by_index[index] for index in range(len(texts))]

    def _encode(self, index: int, batch: list[list[list[int]]], texts: list[str]) -> Tensor:
        """Encoder ``index``'s part of the cross-attention context (batch, tokens, d_index) of
        equal-length token id sequences.

        Non-finite features (a float16 encoder that overflows, damaged weights) are refused here,
        naming the encoder and dtype, so that no NaN reaches a Gram matrix, its cache or a solve.
        """
        encoder = self.encoder(index)
        input_ids = torch.tensor([caption_ids[index] for caption_ids in batch], device=self.device)
        with torch.no_grad():
            state = encoder(input_ids).last_hidden_state  # the context rows: see _context_layers_only
        finite = torch.isfinite(state).flatten(1).all(dim=1)
        if not finite.all():
            text = texts[int((~finite).nonzero()[0])]
            raise self._non_finite_error(self.base.architecture.text_encoders[index], text)
        return state

    def _non_finite_error(self, component: str, text: str) -> MergeError:
        """The error for NaN or infinite features from ``component``, with what to try next."""
        dtype = str(self.dtype).removeprefix("torch.")
        remedy = ("run it in float32 (--dtype float32)" if self.dtype in (torch.float16, torch.bfloat16)
                  else "its weights may be damaged")
        return MergeError(f"The text encoder {component} of {self.base.name} gave NaN or infinite features "
                          f"in {dtype} (for {text!r}); {remedy}.")


def _context_layers_only(encoder: Any, hidden_state: int | None) -> Any:
    """``encoder`` whose ``last_hidden_state`` is the context the UNet reads: as it is for the
    last hidden state (None, after the final layer norm); for ``hidden_states[hidden_state]``
    (SDXL's -2), the layers after that state are dropped and the final layer norm is made the
    identity. The same operations on the same rows give the same values, without running (or
    reading, or holding the states of) layers whose output no merge reads: for SDXL's -2, the
    last layer of each encoder, 79 MB of OpenCLIP bigG, and every layer's states (33 of them,
    where output_hidden_states was asked for one).

    Found by name (``...encoder.layers``, ``...final_layer_norm``), as the CLIP classes of
    transformers nest them differently.
    """
    if hidden_state is None:
        return encoder
    modules = dict(encoder.named_modules())
    [layers] = [module for name, module in modules.items()
                if name.split(".")[-2:] == ["encoder", "layers"] and isinstance(module, nn.ModuleList)]
    [norm] = [name for name in modules if name.split(".")[-1] == "final_layer_norm"]
    del layers[len(layers) + 1 + hidden_state:]  # hidden_states[0] is the embeddings, before any layer
    encoder.get_submodule(norm.rpartition(".")[0]).final_layer_norm = nn.Identity()
    return encoder


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
