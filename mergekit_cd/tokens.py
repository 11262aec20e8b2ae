"""Modifier tokens in tokenizers and text encoders: the one rule for "is this token new", and the
one way rows are added, for the merge's features, :func:`~mergekit_cd.apply.apply` and the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import MergeError


def taken_by(token: str, tokenizers: Sequence[Any]) -> int | None:
    """The index of the first tokenizer that already knows ``token``: in its vocabulary, or read
    as one token of it (adding ``cat`` would take the class word's place in every prompt); None
    when the token is new to every tokenizer."""
    for index, tokenizer in enumerate(tokenizers):
        if token in tokenizer.get_vocab() or len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1:
            return index
    return None


def check_new(tokens: Sequence[str], tokenizers: Sequence[Any], refusal: Callable[[str, int], str]) -> None:
    """Refuse the first of ``tokens`` that is not new (:func:`taken_by`), in the words
    ``refusal(token, tokenizer index)`` gives, before anything changes."""
    for token in tokens:
        index = taken_by(token, tokenizers)
        if index is not None:
            raise MergeError(refusal(token, index))


def install(tokenizer: Any, encoder: Any, tokens: dict[str, Tensor], *, copy_table: bool = True) -> nn.Parameter:
    """Add ``tokens`` (name -> this encoder's embedding) to ``tokenizer`` and their rows to a new
    embedding table of ``encoder``; return the old table's Parameter, untouched (what puts the
    encoder back). No ``resize_token_embeddings``: it draws the new rows from torch's global
    generator, which would change every later seeded draw. Check with :func:`check_new` first.

    ``copy_table=False``, for an encoder that only reads: the table is not copied but looked up
    with the rows laid over it (:class:`AddedRows`), the same values; copying OpenCLIP bigG's
    253 MB table read all of it and held it twice, a sixth of a merge's peak memory."""
    embedding = encoder.get_input_embeddings()
    old = embedding.weight
    tokenizer.add_tokens(list(tokens))
    ids = [tokenizer.convert_tokens_to_ids(token) for token in tokens]
    if not copy_table:
        rows = torch.stack([row.to(old.device, old.dtype) for row in tokens.values()]) if tokens else old[:0]
        encoder.set_input_embeddings(AddedRows(embedding, torch.tensor(ids, device=old.device), rows))
        return old
    rows = max(old.shape[0], max(ids, default=-1) + 1)
    weight = torch.zeros((rows, old.shape[1]), dtype=old.dtype, device=old.device)
    weight[: old.shape[0]] = old.detach()
    for row, embedding_row in zip(ids, tokens.values()):
        weight[row] = embedding_row.to(old.device, old.dtype)
    embedding.weight = nn.Parameter(weight, requires_grad=old.requires_grad)
    embedding.num_embeddings = rows
    if getattr(encoder.config, "vocab_size", None) is not None:
        encoder.config.vocab_size = rows
    return old


class AddedRows(nn.Module):
    """A token embedding table with rows laid over it, at ids within it or beyond its end: what
    :func:`install` makes without copying the table (the rows are its ``tokens``' embeddings)."""

    def __init__(self, table: nn.Embedding, ids: Tensor, rows: Tensor) -> None:
        super().__init__()
        self.table, self.ids, self.rows = table, ids, rows

    def forward(self, input_ids: Tensor) -> Tensor:
        found = input_ids[..., None] == self.ids  # (..., tokens)
        embedded = self.table(input_ids.clamp(max=self.table.num_embeddings - 1))
        added = found.any(-1)
        embedded[added] = self.rows[found[added].int().argmax(-1)]
        return embedded
