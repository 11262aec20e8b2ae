"""Bounds on what one input file may ask for, in memory and in work, checked before it is given.

A Custom Diffusion file holds a few tokens, a few target prompts per concept, a few KB of metadata
and tensors of at most a few million values; a hostile or broken one can claim anything (a 4 KB
sparse file declaring a 2 GB tensor, a 282 KB file recording 2,000 prompts that cost a merge 30 s
per layer). Each bound is far above any real file; an expert who means it sets
``MERGEKIT_CD_NO_LIMITS=1``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from .errors import MergeError

#: Set to 1 to lift every bound below.
OVERRIDE = "MERGEKIT_CD_NO_LIMITS"
#: Values one tensor may declare: 4M (16 MB in float32), 1.6 times the largest K/V weight of any
#: supported model (SDXL's 1280 x 2048). A token row that is a view into the whole embedding table
#: counts its own values, not the table's.
MAX_TENSOR_ELEMENTS = 2**22
#: Values of one token embedding: twice the widest text encoder's (SDXL's OpenCLIP bigG, 1280); with
#: :data:`MAX_TOKENS`, what a file's tokens may hold in memory (each row is copied out) is 5 MB.
MAX_EMBEDDING_VALUES = 2560
#: Bytes of a torch zip's pickle program (``data.pkl``); a delta's is a few hundred KB.
MAX_PICKLE_PROGRAM = 64 * 2**20
#: Operations of a pickle (its program, counted without running it); a delta's takes a few thousand,
#: a whole Stable Diffusion checkpoint's about fifty thousand.
MAX_PICKLE_OPERATIONS = 200_000
#: Bytes of one file's mergekit-cd metadata JSON; ours is a few KB.
MAX_METADATA_BYTES = 2**20
#: Modifier tokens in one file; a merge of many concepts holds one per concept.
MAX_TOKENS = 256
#: Target prompts one concept may record; cd-train records 2 by default.
MAX_PROMPTS = 100
#: Target prompts of all the concepts of one merge together (each is encoded once).
MAX_MERGE_PROMPTS = 1_000
#: Constraint rows one merge solves: each concept's rows of its target prompts (their token rows
#: for a method with context rows), as the solve takes them, reduced to at most the feature width
#: d per concept (:func:`~mergekit_cd.merge.spanning_rows`). The factorisation and its dependence
#: report grow with their square: 8,192 rows took 46 s and 1.1 GiB for SDXL's width (768: 16 s) on
#: one shared CPU core. 100 concepts of 2 prompts take 600 under the authors' rule; under the
#: pipeline rule every row of a padded prompt is a constraint of the constrained and soft merges:
#: 6 concepts of 10 prompts take 4,608 at SD1.5's width, 4,620 at SDXL's.
MAX_CONSTRAINT_ROWS = 8_192
#: Rows one merge solves in all: those constraint rows and a hybrid merge's context rows (start and
#: padding rows, reduced per concept alike). Each layer's work and the statistics a merged file
#: stores grow with them, linearly (no square of the context rows is formed): a hybrid merge of
#: 100 concepts of 2 prompts takes 600 + 14,800.
MAX_SOLVED_ROWS = 16_384


def check_limit(count: int, limit: int, what: str, source: object, *, needs: str = "any real file") -> None:
    """Refuse a ``count`` past ``limit`` in ``source``; ``what`` says what is counted, with
    ``{count}`` where the number goes, ``needs`` who would need that many. The message names the
    override."""
    if count > limit and os.environ.get(OVERRIDE) != "1":
        raise MergeError(f"{source}: {what.replace('{count}', f'{count:,}')}, more than the {limit:,} {needs} "
                         f"needs; refused (set {OVERRIDE}=1 if you mean it).")


class BaseBoundError(MergeError):
    """A file declares more than any delta for the base it is read for can hold."""


@dataclass(frozen=True)
class BaseBound:
    """What any tensor of a delta for one base can hold: its largest K/V weight and widest token."""

    name: str
    tensor_values: int
    embedding_values: int
    total_values: int  # of a whole file: K/V, and the q/out weights the authors' crossattn files hold


_BASE_BOUND: ContextVar[BaseBound | None] = ContextVar("mergekit_cd_base_bound", default=None)


@contextmanager
def within_base(bound: BaseBound) -> Iterator[None]:
    """While reading a delta for a known base, tensors are bounded by that base's, not only by the
    fixed bounds: a hostile file for a small base costs no more than the base's largest weight."""
    token = _BASE_BOUND.set(bound)
    try:
        yield
    finally:
        _BASE_BOUND.reset(token)


def current_base_bound() -> BaseBound | None:
    """The bound :func:`within_base` set, if a file is being read for a base."""
    return _BASE_BOUND.get()


def check_total_values(count: int, source: object) -> None:
    """Read for a base, a whole file may declare at most :attr:`BaseBound.total_values` values:
    a 12 KB sparse file declaring 80 tensors of 4M values each cost 1.6 GB to validate."""
    _check_base_bound(count, "total_values", f"its tensors declare {count:,} values in all", source)


def check_tensor_size(shape: tuple[int, ...], key: str, source: object) -> None:
    """Refuse a tensor declaring more than :data:`MAX_TENSOR_ELEMENTS` values, or more than any
    K/V weight of the base being read for (:func:`within_base`), before its data is read (a
    safetensors header's shape, a mapped pickle's view)."""
    count = math.prod(shape)
    check_limit(count, MAX_TENSOR_ELEMENTS, f"{key} declares shape {tuple(shape)}: {{count}} values", source)
    _check_base_bound(count, "tensor_values", f"{key} declares shape {tuple(shape)}: {count:,} values", source)


def _check_base_bound(count: int, field: str, what: str, source: object) -> None:
    bound = _BASE_BOUND.get()
    if bound is not None and count > getattr(bound, field):
        held = {"tensor_values": "cross-attention weight", "embedding_values": "token embedding",
                "total_values": "delta file (four times its K/V weights)"}[field]
        raise BaseBoundError(f"{source}: {what}, more than any {held} of {bound.name} holds "
                         f"({getattr(bound, field):,}); not a delta for this base.")


def check_embedding_size(count: int, key: str, source: object) -> None:
    """Refuse a token embedding of more than :data:`MAX_EMBEDDING_VALUES` values (checked from a
    header where there is one, before the row is read)."""
    check_limit(count, MAX_EMBEDDING_VALUES, f"token embedding {key} has {{count}} values", source)
    _check_base_bound(count, "embedding_values", f"token embedding {key} has {count:,} values", source)
