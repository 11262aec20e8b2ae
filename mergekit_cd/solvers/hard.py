"""The paper's constrained merge: keep every concept's outputs, move the base as little as possible."""

from __future__ import annotations

import torch
from torch import Tensor

import warnings

from ._common import (
    FLOAT,
    M_CONDITION_WARNING,
    build_info,
    check_problem,
    constraint_spectrum,
    dependent_mask,
    regulariser,
    resolve_rtol,
    stream_rows,
    update_operator,
    whiten,
)
from .info import IllConditionedWarning, SolveInfo


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
    rtol = resolve_rtol(rtol, C.dtype)
    A = regulariser(G, 1.0)
    whitening = whiten(A, ridge, what="G + ridge*I")
    C64 = C.to(FLOAT)
    spectrum = constraint_spectrum(C64, whitening)
    dependent = dependent_mask(spectrum, rtol)
    m = spectrum.singular_values.shape[0]
    S = spectrum.singular_values
    gains = torch.where(dependent[:m], torch.zeros_like(S), 1.0 / S.clamp_min(torch.finfo(FLOAT).tiny))
    Z = update_operator(spectrum, gains)
    kept = S[~dependent[:m]]
    if kept.numel() and float(kept[0] / kept[-1]) ** 2 > M_CONDITION_WARNING:
        warnings.warn(f"Constraint rows are nearly dependent (cond(M) = {float(kept[0] / kept[-1]) ** 2:.2g}): "
                      f"meeting them exactly may move the weights far. Check SolveInfo.relative_change; "
                      f"a ridge, the soft merge or a larger rtol trade exactness for stability.",
                      IllConditionedWarning, stacklevel=2)
    W, stats = stream_rows(W0, C64, V, Z, watch=spectrum.right[:, dependent],
                           diagnostics=return_info)
    if not return_info:
        return W
    return W, build_info(A, whitening, spectrum, dependent, stats, rtol)
