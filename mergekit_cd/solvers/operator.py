"""A factored merge that can be applied to the rows of one layer at a time.

Like ``scipy.linalg.cho_factor`` / ``cho_solve``: :func:`~mergekit_cd.solvers.factor_hard` or
:func:`~mergekit_cd.solvers.factor_soft` does the factorisation once, and
:meth:`MergeOperator.apply` streams any number of weight rows through it, so a merge never
needs the K/V rows of every layer in memory at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._common import (
    ConstraintSpectrum,
    RowNorms,
    Whitening,
    build_info,
    check_matrix,
    check_same_device,
    check_shapes,
    stream_rows,
)
from .info import SolveInfo


@dataclass
class MergeOperator:
    """``W = W0 + (V - W0 C^T) Z`` for rows of any layer whose outputs are constrained on ``C``."""

    C: Tensor  # (s, d) constraint features, float64
    Z: Tensor  # (s, d) update operator, float64
    A: Tensor  # the regulariser's matrix (G or mu*G), float64
    whitening: Whitening
    spectrum: ConstraintSpectrum
    dependent: Tensor
    rtol: float
    check_finite: bool = True
    norms: RowNorms | None = field(default=None, repr=False)

    @property
    def num_constraints(self) -> int:
        return self.C.shape[0]

    def apply(self, W0: Tensor, V: Tensor, *, misfit: Tensor | None = None, difference: bool = False,
              dtype: torch.dtype | None = None) -> Tensor:
        """The merged rows for base rows ``W0`` (n, d) and their targets ``V`` (n, s), in ``dtype``
        (default W0's); ``difference``: their difference from ``W0`` instead (what a delta stores).

        ``misfit``: ``V - W0 C^T`` where the caller has it without that product (a merge has each
        concept's own change on its features), so that it is not computed again; else computed here."""
        check_matrix(W0, "W0", 2, self.check_finite)
        check_matrix(V, "V", 2, self.check_finite)
        check_shapes([("W0 columns (feature dim)", W0.shape[1], self.C.shape[1]),
                      ("V rows", V.shape[0], W0.shape[0]),
                      ("V columns (constraint rows)", V.shape[1], self.num_constraints)])
        check_same_device({"V": V, "the factorisation (G, C)": self.C}, W0)
        if misfit is not None:
            check_matrix(misfit, "misfit", 2, self.check_finite)
            check_shapes([("misfit rows", misfit.shape[0], V.shape[0]), ("misfit columns", misfit.shape[1], V.shape[1])])
            check_same_device({"misfit": misfit}, W0)
        return stream_rows(W0, self.C, V, self.Z, norms=self.norms, misfit=misfit, difference=difference,
                           dtype=dtype)

    def info(self) -> SolveInfo:
        """Diagnostics over every row applied so far (needs ``diagnostics=True`` at factor time)."""
        if self.norms is None:
            raise ValueError("This operator was factored without diagnostics=True.")
        return build_info(self.A, self.whitening, self.spectrum, self.dependent, self.norms.stats(), self.rtol)

