"""New modifier tokens whose embedding rows train while every other row stays exactly as it was.

The public scripts train the whole embedding table and zero the gradient of the old rows; the
optimizer's weight decay still shrinks them, so "frozen" rows drift. Here the table is not a
trainable parameter at all: the tokens are installed as everywhere else
(:func:`mergekit_cd.tokens.install`: the old rows copied bit for bit, the new ones from their
initializer words), and :class:`NewTokenEmbedding` looks ids up in that frozen table and
substitutes the new tokens' rows, which are the only trainable parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import MergeError
from ..tokens import check_new, install


class NewTokenEmbedding(nn.Module):
    """The frozen embedding table plus trainable rows for ``token_ids`` (rows of the table)."""

    def __init__(self, table: nn.Embedding, token_ids: Sequence[int], initial_rows: Tensor) -> None:
        super().__init__()
        self.table = table.requires_grad_(False)
        self.register_buffer("token_ids", torch.tensor(list(token_ids), dtype=torch.long,
                                                       device=table.weight.device), persistent=False)
        self.rows = nn.Parameter(initial_rows.detach().to(table.weight.device, torch.float32).clone())

    @property
    def weight(self) -> Tensor:
        """The frozen table (what code reading ``get_input_embeddings().weight`` expects)."""
        return self.table.weight

    @property
    def num_embeddings(self) -> int:
        return self.table.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.table.embedding_dim

    def forward(self, input_ids: Tensor) -> Tensor:
        looked_up = self.table(input_ids)
        match = (input_ids[..., None] == self.token_ids).to(self.rows.dtype)  # (..., new tokens)
        substituted = (match @ self.rows).to(looked_up.dtype)
        return torch.where(match.sum(-1, keepdim=True) > 0, substituted, looked_up)

    def full_table(self) -> nn.Embedding:
        """A plain embedding with the old rows (bit for bit) and the trained new rows."""
        weight = self.table.weight.detach().clone()
        weight[self.token_ids] = self.rows.detach().to(weight.dtype)
        table = nn.Embedding(weight.shape[0], weight.shape[1], _weight=weight)
        return table.requires_grad_(False)


def single_token_id(tokenizer, word: str, what: str) -> int:
    """The id of ``word`` when the tokenizer reads it as exactly one token."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise MergeError(f"The {what} {word!r} is not a single token of the base model's vocabulary (it "
                         f"splits into {len(ids)} pieces: {' '.join(pieces)}); choose a rare single "
                         f"token such as 'ktn' or 'sks'.")
    return ids[0]


def check_new_tokens(tokenizers: Sequence, tokens: Sequence[str]) -> None:
    """Each modifier token must be new to every tokenizer (the one rule, :func:`~mergekit_cd.tokens.taken_by`)."""
    check_new(tokens, tokenizers, lambda token, _: (
        f"Token {token} is already in the base model's vocabulary; a modifier token must be a new word "
        f"(e.g. <new1>); choose another --token."))


def add_tokens(tokenizers: Sequence, encoders: Sequence, tokens: Sequence[str],
               init_tokens: Sequence[str]) -> list[NewTokenEmbedding]:
    """Install ``tokens`` in every tokenizer and text encoder (:func:`mergekit_cd.tokens.install`),
    their rows starting from the ``init_tokens``' embeddings; give each encoder a
    :class:`NewTokenEmbedding` training those rows. Checks everything before changing anything.
    """
    check_new_tokens(tokenizers, tokens)
    init_ids = [[single_token_id(tokenizer, word, "initializer token") for word in init_tokens]
                for tokenizer in tokenizers]
    wrappers = []
    for tokenizer, encoder, ids in zip(tokenizers, encoders, init_ids):
        initial = encoder.get_input_embeddings().weight.detach()[ids].float()
        install(tokenizer, encoder, dict(zip(tokens, initial)))
        token_ids = [tokenizer.convert_tokens_to_ids(token) for token in tokens]
        wrapper = NewTokenEmbedding(encoder.get_input_embeddings(), token_ids, initial)
        encoder.set_input_embeddings(wrapper)
        wrappers.append(wrapper)
    return wrappers


def finish(encoders: Sequence, wrappers: Sequence[NewTokenEmbedding]) -> None:
    """Replace each wrapper by a plain table holding the trained rows (a standard text encoder)."""
    for encoder, wrapper in zip(encoders, wrappers):
        encoder.set_input_embeddings(wrapper.full_table())
