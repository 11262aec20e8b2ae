"""Soft (weighted) merge: trade each concept's fidelity against preservation of the base."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._common import (
    FLOAT,
    NUMERICAL_ZERO,
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
from .info import SolveInfo
from .operator import MergeOperator


def solve_soft(
    W0: Tensor,
    G: Tensor,
    C_list: Sequence[Tensor],
    V_list: Sequence[Tensor],
    weights: Sequence[float] | Tensor,
    mu: float = 1.0,
    *,
    ridge: float = 0.0,
    rtol: float | None = None,
    check_finite: bool = True,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, SolveInfo]:
    """Minimise ``sum_i weights[i] ||W C_i^T - V_i||^2 + mu ||(W - W0) C_reg^T||^2 + ridge ||W - W0||^2``.

    Parameters
    ----------
    W0 : (n, d) base weight rows (all layers stacked).
    G : (d, d) ``C_reg^T C_reg`` of the regularisation captions.
    C_list : per concept, (s_i, d) features of its target prompts.
    V_list : per concept, (n, s_i) targets ``W_i C_i^T`` from its own fine-tuned weights.
    weights : per concept, lambda_i > 0: how strongly its outputs are kept.
    mu : weight of preservation on the captions, >= 0.
    ridge : weight of ``||W - W0||^2``, >= 0 (not scaled by mu).
    rtol, check_finite, return_info : as in :func:`solve_hard`; rtol only affects the
        reported rank, since the soft solution needs no truncation.

    Closed form: ``W (sum_i l_i C_i^T C_i + mu G + ridge I) = sum_i l_i V_i C_i + (mu G + ridge I) W0``,
    solved in float64 through the same whitened SVD as :func:`solve_hard`.

    Limits. As the weights grow together (``weights = t * w``, ``t -> inf``, mu and ridge fixed),
    every consistent target is met ever more exactly and the solution converges to
    ``solve_hard(W0, G, C, V, ridge=ridge/mu)`` on the stacked constraints; the gap shrinks like
    ``1/t``. Targets that conflict (the same feature, different values) are met in the
    *weighted* least-squares sense, so they agree with ``solve_hard`` (an unweighted mean) only
    when their weights are equal. With ``mu -> 0`` the caption
    term vanishes and the objective becomes Mix-of-Show's "gradient fusion",
    ``sum_i ||W C_i^T - W_i C_i^T||^2``; it has no unique minimiser on its own, so keep a small
    ridge: ``mu = 0, ridge -> 0`` selects the fusion solution closest to W0, the one gradient
    descent started from W0 (as Mix-of-Show does with L-BFGS) converges to. ``mu = ridge = 0``
    is rejected.
    """
    if len(C_list) != len(V_list):
        raise ValueError(f"C_list has {len(C_list)} concepts but V_list has {len(V_list)}.")
    if not C_list:
        raise ValueError("solve_soft needs at least one concept.")
    C = torch.cat(list(C_list))
    V = torch.cat(list(V_list), dim=1)
    check_problem(W0, G, C, V, ridge, check_finite, labels=("C_list", "V_list"))
    operator = factor_soft(G, C_list, weights, mu, ridge=ridge, rtol=rtol, check_finite=False,
                           diagnostics=return_info)
    W = operator.apply(W0, V)
    return (W, operator.info()) if return_info else W


def factor_soft(
    G: Tensor,
    C_list: Sequence[Tensor],
    weights: Sequence[float] | Tensor,
    mu: float = 1.0,
    *,
    ridge: float = 0.0,
    rtol: float | None = None,
    check_finite: bool = True,
    diagnostics: bool = False,
) -> MergeOperator:
    """Factor :func:`solve_soft`'s problem once; ``.apply(W0, V)`` (V: the concepts' targets
    concatenated column-wise) then solves it for any rows. Arguments as in :func:`solve_soft`."""
    if not C_list:
        raise ValueError("solve_soft needs at least one concept.")
    weights = torch.as_tensor(weights, dtype=FLOAT).reshape(-1)
    if weights.numel() != len(C_list):
        raise ValueError(f"weights has {weights.numel()} entries for {len(C_list)} concepts.")
    if not bool(torch.isfinite(weights).all()) or bool((weights <= 0).any()):
        raise ValueError(f"weights must be finite and > 0, got {weights.tolist()}.")
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu must be a finite number >= 0, got {mu}.")
    if mu == 0 and ridge == 0:
        raise ValueError("mu = 0 and ridge = 0 leave the merge without a unique solution; "
                         "give mu > 0, or a small ridge for the gradient-fusion limit.")
    C = torch.cat(list(C_list))
    check_factor_problem(G, C, ridge, check_finite, c_name="C_list")
    rtol = resolve_rtol(rtol, C.dtype)
    counts = torch.tensor([c.shape[0] for c in C_list])
    row_scale = weights.to(C.device).sqrt().repeat_interleave(counts.to(C.device))

    A = regulariser(G, mu)
    whitening = whiten(A, ridge, what="mu*G + ridge*I")
    C64 = C.to(FLOAT)
    spectrum = constraint_spectrum(C64 * row_scale[:, None], whitening)
    S = spectrum.singular_values
    # directions at rounding level are zero, not signal: amplified by large weights they would grow
    numerically_zero = S <= NUMERICAL_ZERO * (S[0] if S.numel() else 0.0)
    gains = torch.where(numerically_zero, torch.zeros_like(S), S / (S * S + 1.0))
    Z = row_scale[:, None] * update_operator(spectrum, gains)
    dependent = dependent_mask(spectrum, rtol)
    norms = RowNorms(row_scale[:, None] * spectrum.right[:, dependent]) if diagnostics else None
    return MergeOperator(C64, Z, A, whitening, spectrum, dependent, rtol, check_finite, norms)
