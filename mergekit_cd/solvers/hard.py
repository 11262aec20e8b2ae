"""The paper's constrained merge: keep every concept's outputs, move the base as little as possible."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ._common import (
    FLOAT,
    M_CONDITION_WARNING,
    ConstraintSpectrum,
    RowNorms,
    check_factor_problem,
    check_problem,
    constraint_spectrum,
    dependent_mask,
    regulariser,
    resolve_rtol,
    update_operator,
    whiten,
)
from .info import IllConditionedWarning, SolveInfo
from .operator import MergeOperator


def solve_hard(
    W0: Tensor,
    G: Tensor,
    C: Tensor,
    V: Tensor,
    *,
    ridge: float = 0.0,
    rtol: float | None = None,
    check_finite: bool = True,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, SolveInfo]:
    """Minimise ``||(W - W0) C_reg^T||_F^2 + ridge ||W - W0||_F^2`` subject to ``W C^T = V``.

    Parameters
    ----------
    W0 : (n, d) base weight rows; the rows of all layers may be stacked, they share features.
    G : (d, d) ``C_reg^T C_reg``, the Gram matrix of the regularisation caption features.
    C : (s, d) constraint features (token features of every concept's target prompts).
    V : (n, s) targets ``W_i c^T`` computed with each concept's own fine-tuned weights.
    ridge : adds ``ridge * ||W - W0||^2`` (i.e. uses ``G + ridge I``); 0 is the paper's
        objective. A small positive value bounds how far weights move in feature directions
        the captions never exercise.
    rtol : constraint rows whose singular value in the G-metric is below ``rtol * s_max`` are
        dependent. Consistent dependent rows are satisfied exactly; conflicting ones (same
        feature, different targets) are met in the least-squares sense, symmetrically, so the
        result does not depend on the order of the rows. Default ``sqrt(eps)`` of C's dtype:
        rows that agree to the precision they were computed in count as one. Nearly dependent
        rows that are kept (cond(M) > 1e8) raise an ``IllConditionedWarning``.
    check_finite : reject NaN/inf inputs (like ``scipy.linalg``).
    return_info : also return a :class:`SolveInfo`.

    The closed form is ``W = W0 + (V - W0 C^T) M^+ C A^-1`` with ``A = G + ridge I`` and
    ``M = C A^-1 C^T``. It is computed in float64 from one factorisation of ``A`` and one SVD
    of the whitened constraints (never an explicit inverse) and returned in W0's dtype, on
    W0's device. A singular or ill-conditioned ``A`` gets a fallback ridge and an
    ``IllConditionedWarning`` instead of NaNs.
    """
    check_problem(W0, G, C, V, ridge, check_finite)
    operator = factor_hard(G, C, ridge=ridge, rtol=rtol, check_finite=False, diagnostics=return_info)
    W = operator.apply(W0, V)
    return (W, operator.info()) if return_info else W


def factor_hard(
    G: Tensor,
    C: Tensor,
    *,
    ridge: float = 0.0,
    rtol: float | None = None,
    check_finite: bool = True,
    diagnostics: bool = False,
) -> MergeOperator:
    """Factor :func:`solve_hard`'s problem once; ``.apply(W0, V)`` then solves it for any rows.

    Rows of different layers share ``G`` and ``C``, so one factorisation serves a merge that
    streams layer by layer. With ``diagnostics``, ``.info()`` reports on every row applied.
    Arguments as in :func:`solve_hard`.
    """
    check_factor_problem(G, C, ridge, check_finite)
    rtol = resolve_rtol(rtol, C.dtype)
    A = regulariser(G, 1.0)
    whitening = whiten(A, ridge, what="G + ridge*I")
    C64 = C.to(FLOAT)
    spectrum = constraint_spectrum(C64, whitening)
    dependent = dependent_mask(spectrum, rtol)
    norms = RowNorms(spectrum.right[:, dependent]) if diagnostics else None
    return MergeOperator(C64, update_operator(spectrum, exact_gains(spectrum, dependent)), A, whitening, spectrum,
                         dependent, rtol, check_finite, norms)


def exact_gains(spectrum: ConstraintSpectrum, dependent: Tensor) -> Tensor:
    """``1/s`` on the kept constraint directions, 0 on the dependent ones: the truncated
    pseudo-inverse that meets every kept constraint exactly (shared by the hybrid merge).
    Kept directions that are nearly dependent raise an ``IllConditionedWarning``."""
    m = spectrum.singular_values.shape[0]
    S = spectrum.singular_values
    gains = torch.where(dependent[:m], torch.zeros_like(S), 1.0 / S.clamp_min(torch.finfo(FLOAT).tiny))
    kept = S[~dependent[:m]]
    if kept.numel() and float(kept[0] / kept[-1]) ** 2 > M_CONDITION_WARNING:
        warnings.warn(f"Constraint rows are nearly dependent (cond(M) = {float(kept[0] / kept[-1]) ** 2:.2g}): "
                      f"meeting them exactly may move the weights far. Check SolveInfo.relative_change; "
                      f"a ridge, the soft merge or a larger rtol trade exactness for stability.",
                      IllConditionedWarning, stacklevel=4)
    return gains
