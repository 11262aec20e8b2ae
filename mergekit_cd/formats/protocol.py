"""What a format module provides: :class:`Format`, satisfied by each module structurally (PEP 544),
so generic code reads these attributes instead of probing modules or naming formats."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from ._common import Delta


@runtime_checkable
class Format(Protocol):
    """A file layout mergekit-cd reads and writes; one module each in this package."""

    #: The name of ``--format`` / ``--to`` and of the recipe's input record.
    NAME: str
    #: Whether ``write`` wants full fine-tuned weights (FineTunedWeights) rather than
    #: differences (ConceptDelta) as its usual input.
    WRITES_FULL_WEIGHTS: bool
    #: Whether the layout can hold differences as low-rank factors (a compressed delta is then
    #: written as it is, without the base).
    STORES_FACTORS: bool
    #: Whether it stores nothing but factors (the LoRA layouts): every difference is factored
    #: before it is written (:func:`~mergekit_cd.delta.factorize`).
    FACTORS_ONLY: bool
    #: Whether it can hold a LoRA's UNet modules beyond the cross-attention K/V (a delta's
    #: ``other_modules``: self-attention, feed-forward, projections): the LoRA layouts.
    HOLDS_OTHER_MODULES: bool
    #: Whether it stores a solved merge's statistics (:mod:`~mergekit_cd.merge_statistics`), which
    #: let ``cd-merge`` grow or shrink the merge later without its inputs.
    STORES_STATISTICS: bool
    #: The model families the layout can hold; ``None``: all of them.
    ARCHITECTURES: tuple[str, ...] | None
    #: The output name ending that selects this format when ``--format`` is not given
    #: (``""``: a name without extension, a folder); ``None``: only by name.
    OUTPUT_SUFFIX: str | None
    #: For a layout written as a folder: what in an existing folder is not part of such an
    #: output (``--force`` replaces only folders of nothing else); ``None`` for single files.
    foreign_entries: Callable[[Path], list[str]] | None
    #: For a file output that also writes a folder of token files beside it (named
    #: ``<stem><suffix>``): that suffix; ``None`` for every other layout.
    TOKEN_FOLDER_SUFFIX: str | None

    def detect(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` is in this layout, from the cheapest look that can tell."""

    def read(self, path: str | os.PathLike[str]) -> Delta:
        """The content of ``path``, validated; layers may be read back lazily."""

    def write(self, obj: Delta, path: str | os.PathLike[str], *, force: bool = False) -> None:
        """``obj`` written to ``path`` atomically (``force`` replaces an existing output)."""
