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
from .fileio import MappedPages
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
    texts through one encoder before it loads the next, and through that encoder one layer at a
    time (:meth:`_encode`), holding every batch's states (float32) meanwhile; give it every set at
    once, and each encoder loads once.
    """

    def __init__(self, base: BaseModel, tokens: Mapping[str, Sequence[Tensor]] | None = None, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.base = base
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokens = dict(tokens or {})
        self.tokenizers = base.load_tokenizers()
        # (index, model, its files' mappings): the one encoder in memory
        self._held: tuple[int, Any, list[MappedPages]] | None = None
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
        (:func:`_context_layers_only`): the one held in memory; another is released first. Read
        only: its layers' mapped pages are handed back as they run (:meth:`_encode`), and a change
        made to them in place would be lost."""
        return self._encoder(index)[0]

    def _encoder(self, index: int) -> tuple[Any, list[MappedPages]]:
        """:meth:`encoder`, and the mappings of its weight files (its weights are views of them
        where transformers maps them: float32 on the CPU), whose pages :meth:`_encode` hands back."""
        if self._held is None or self._held[0] != index:
            self._held = None
            gc.collect()  # the encoder released, before the next one loads
            model = _context_layers_only(self.base.load_text_encoder(index, self.device, self.dtype),
                                         self.base.architecture.hidden_state)
            if self.tokens:
                install(self.tokenizers[index], model,
                        {token: embeddings[index] for token, embeddings in self.tokens.items()}, copy_table=False)
            self._held = (index, model, [MappedPages(file) for file in self.base.text_encoder_files(index)])
        return self._held[1], self._held[2]

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
        encoder (:meth:`_encode`, a layer at a time), whose states are held until the other
        encoders' of the same batch come. The encoder already held goes first, so that a later
        call does not load it again. ``progress``: a bar per encoder, of its layers, named by the
        labelled sets."""
        if batch_size < 1:
            raise MergeError(f"batch_size must be at least 1, got {batch_size}.")
        if any(text_set.gram and not text_set.texts for text_set in sets):
            raise MergeError("No captions to compute a Gram matrix from.")
        batched = [self._batches(text_set.texts, rule, batch_size) for text_set in sets]
        held: list[list[dict[int, Tensor]]] = [[{} for _ in batches] for _, _, batches in batched]
        every = [(text_set, ids, indices, states) for text_set, (ids, _, batches), set_states in zip(sets, batched, held)
                 for indices, states in zip(batches, set_states)]
        order = sorted(range(len(self.tokenizers)), key=lambda index: self._held is None or self._held[0] != index)
        for index in order:
            encoded = self._encode(index, [[ids[i] for i in indices] for _, ids, indices, _ in every],
                                   [[text_set.texts[i] for i in indices] for text_set, _, indices, _ in every],
                                   self._bar_label(sets, index) if progress else None)
            for (_, _, _, states), state in zip(every, encoded):
                states[index] = state
        return [self._finish(text_set, counts, batches, states, rule)
                for text_set, (_, counts, batches), states in zip(sets, batched, held)]

    def _bar_label(self, sets: Sequence[TextSet], index: int) -> str | None:
        """The name of the progress bar of the sets' pass through encoder ``index``: the labelled
        sets' labels (and the encoder's name where there are two); None (no bar) without a label."""
        components = self.base.architecture.text_encoders
        labels = " + ".join(dict.fromkeys(text_set.label for text_set in sets if text_set.label is not None))
        if not labels:
            return None
        return labels if len(components) == 1 else f"{labels} ({components[index]})"

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

    def _finish(self, text_set: TextSet, counts: list[int], batches: list[list[int]],
                held: list[dict[int, Tensor]], rule: RowRule) -> list[PromptRows] | tuple[Tensor, int]:
        """One set's batches, each one's encoders' states joined in their order (and released as
        they are used): its prompts' rows, or its Gram matrix and row count."""
        texts = text_set.texts
        device = float64_device(self.device)
        width = sum(self.base.token_dims())
        gram = torch.zeros(width, width, dtype=torch.float64, device=device) if text_set.gram else None
        count, by_index = 0, {}
        for indices, earlier in zip(batches, held):
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
        if gram is not None:
            return gram.cpu(), count
        return [by_index[index] for index in range(len(texts))]

    def _encode(self, index: int, batches: list[list[list[list[int]]]], texts: list[list[str]],
                label: str | None = None) -> list[Tensor]:
        """Encoder ``index``'s part of the cross-attention context (batch, tokens, d_index) of each
        batch of equal-length token id sequences (``texts``: each batch's, to name one in an error;
        ``label``: a progress bar of its layers so named).

        The batches go through the encoder together, one layer at a time: each layer runs on every
        batch, as the encoder's own forward calls it (:func:`_first_layer_inputs`), and then the
        pages of its weights are handed back (:class:`~mergekit_cd.fileio.MappedPages`), so that
        one layer's weights are in memory at a time, not all of them (OpenCLIP bigG's 31 layers
        the context reads: 2.44 GB of float32), while every batch's states are held (about
        80 KB a token for bigG). Each batch meets the same operations as in the whole forward,
        so its states are the same to the bit. Weights not mapped (another dtype or device) stay
        in memory as they were loaded.

        Non-finite features (a float16 encoder that overflows, damaged weights) are refused here,
        naming the encoder and dtype, so that no NaN reaches a Gram matrix, its cache or a solve.
        """
        encoder, mapped = self._encoder(index)
        layers = _encoder_layers(encoder)
        with torch.no_grad():
            inputs = [_first_layer_inputs(encoder, layers, torch.tensor([ids[index] for ids in batch],
                                                                        device=self.device)) for batch in batches]
            states = [state for state, _, _ in inputs]
            for layer in tqdm(layers, disable=label is None, desc=label, unit="layer"):
                states = [_layer_output(layer(state, *args, **kwargs))
                          for state, (_, args, kwargs) in zip(states, inputs)]
                for pages in mapped:
                    pages.release(layer.parameters())
            norm = _final_layer_norm(encoder)
            states = [norm(state) for state in states]  # the identity where the context is an earlier state
        for state, batch_texts in zip(states, texts):
            finite = torch.isfinite(state).flatten(1).all(dim=1)
            if not finite.all():
                raise self._non_finite_error(self.base.architecture.text_encoders[index],
                                             batch_texts[int((~finite).nonzero()[0])])
        return states

    def _non_finite_error(self, component: str, text: str) -> MergeError:
        """The error for NaN or infinite features from ``component``, with what to try next."""
        dtype = str(self.dtype).removeprefix("torch.")
        remedy = ("run it in float32 (--dtype float32)" if self.dtype in (torch.float16, torch.bfloat16)
                  else "its weights may be damaged")
        return MergeError(f"The text encoder {component} of {self.base.name} gave NaN or infinite features "
                          f"in {dtype} (for {text!r}); {remedy}.")


class _LayerInputs(Exception):  # noqa: N818 (not an error: how the forward is stopped)
    """What an encoder's forward gives its first layer, raised to stop the forward there."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.args, self.kwargs = args, kwargs


def _first_layer_inputs(encoder: Any, layers: nn.ModuleList,
                        input_ids: Tensor) -> tuple[Tensor, tuple[Any, ...], dict[str, Any]]:
    """The states an encoder's own forward gives its first layer for ``input_ids`` (its embeddings,
    the modifier tokens' rows laid over), and the other arguments it gives every layer (the
    attention mask it builds, its flags): the forward is stopped there. What transformers passes
    its layers differs between its versions; taken from the forward itself, each layer is called
    as the forward calls it."""
    def stop(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _LayerInputs(args, kwargs)

    hook = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        encoder(input_ids)
    except _LayerInputs as given:
        state, *rest = given.args
        return state, tuple(rest), given.kwargs
    finally:
        hook.remove()
    raise RuntimeError(f"{type(encoder).__name__}'s forward did not call its first layer.")


def _layer_output(output: Any) -> Tensor:
    """An encoder layer's states: transformers 5 returns them, 4 a tuple that starts with them."""
    return output[0] if isinstance(output, tuple) else output


def _encoder_layers(encoder: Any) -> nn.ModuleList:
    """The list of a CLIP text encoder's layers, found by name (``...encoder.layers``), as the
    CLIP classes of transformers nest them differently."""
    [layers] = [module for name, module in encoder.named_modules()
                if name.split(".")[-2:] == ["encoder", "layers"] and isinstance(module, nn.ModuleList)]
    return layers


def _final_layer_norm(encoder: Any) -> nn.Module:
    """A CLIP text encoder's final layer norm, found by name (the identity once cut:
    :func:`_context_layers_only`)."""
    [norm] = [module for name, module in encoder.named_modules() if name.split(".")[-1] == "final_layer_norm"]
    return norm


def _context_layers_only(encoder: Any, hidden_state: int | None) -> Any:
    """``encoder`` whose ``last_hidden_state`` is the context the UNet reads: as it is for the
    last hidden state (None, after the final layer norm); for ``hidden_states[hidden_state]``
    (SDXL's -2), the layers after that state are dropped and the final layer norm is made the
    identity. The same operations on the same rows give the same values, without running (or
    reading, or holding the states of) layers whose output no merge reads: for SDXL's -2, the
    last layer of each encoder, 79 MB of OpenCLIP bigG, and every layer's states (33 of them,
    where output_hidden_states was asked for one).

    Found by name (:func:`_encoder_layers`, ``...final_layer_norm``), as the CLIP classes of
    transformers nest them differently.
    """
    if hidden_state is None:
        return encoder
    layers = _encoder_layers(encoder)
    [norm] = [name for name, _ in encoder.named_modules() if name.split(".")[-1] == "final_layer_norm"]
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
