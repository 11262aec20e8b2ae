"""New modifier tokens whose embedding rows train while every other row stays exactly as it was.

The public scripts train the whole embedding table and zero the gradient of the old rows; the
optimizer's weight decay still shrinks them, so "frozen" rows drift. Here the old table is not
a trainable parameter at all: :class:`NewTokenEmbedding` looks ids up in the untouched table and
substitutes the new tokens' rows, which are the only trainable parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import MergeError
from ..tokens import check_new


class NewTokenEmbedding(nn.Module):
    """The frozen embedding table plus trainable rows for ``token_ids``.

    Ids may lie inside or beyond the table (a tokenizer can have fewer entries than rows).
    """

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
        return max(self.table.num_embeddings, int(self.token_ids.max()) + 1)

    @property
    def embedding_dim(self) -> int:
        return self.table.embedding_dim

    def forward(self, input_ids: Tensor) -> Tensor:
        looked_up = self.table(input_ids.clamp(max=self.table.num_embeddings - 1))
        match = (input_ids[..., None] == self.token_ids).to(self.rows.dtype)  # (..., new tokens)
        substituted = (match @ self.rows).to(looked_up.dtype)
        return torch.where(match.sum(-1, keepdim=True) > 0, substituted, looked_up)

    def full_table(self) -> nn.Embedding:
        """A plain embedding with the old rows (bit for bit) and the trained new rows."""
        old = self.table.weight.detach()
        weight = torch.zeros((self.num_embeddings, old.shape[1]), dtype=old.dtype, device=old.device)
        weight[: old.shape[0]] = old
        weight[self.token_ids] = self.rows.detach().to(old.dtype)
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
    """Add ``tokens`` to every tokenizer; give each encoder a :class:`NewTokenEmbedding` whose
    rows start from the ``init_tokens``' embeddings. Checks everything before changing anything.
    """
    check_new_tokens(tokenizers, tokens)
    init_ids = [[single_token_id(tokenizer, word, "initializer token") for word in init_tokens]
                for tokenizer in tokenizers]
    wrappers = []
    for tokenizer, encoder, ids in zip(tokenizers, encoders, init_ids):
        tokenizer.add_tokens(list(tokens))
        token_ids = [tokenizer.convert_tokens_to_ids(token) for token in tokens]
        table = encoder.get_input_embeddings()
        wrapper = NewTokenEmbedding(table, token_ids, table.weight.detach()[ids].float())
        encoder.set_input_embeddings(wrapper)
        wrappers.append(wrapper)
    return wrappers


def finish(encoders: Sequence, wrappers: Sequence[NewTokenEmbedding]) -> None:
    """Replace each wrapper by a plain table holding the trained rows (a standard text encoder)."""
    for encoder, wrapper in zip(encoders, wrappers):
        table = wrapper.full_table()
        encoder.set_input_embeddings(table)
        if getattr(encoder.config, "vocab_size", None) is not None:
            encoder.config.vocab_size = table.num_embeddings
