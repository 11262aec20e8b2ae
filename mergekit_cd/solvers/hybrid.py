"""The hybrid merge: exact on the token rows, weighted least squares on each concept's context rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._common import (
    FLOAT,
    RowNorms,
    check_factor_problem,
    check_matrix,
    check_problem,
    check_same_device,
    check_shapes,
    constraint_spectrum,
    dependent_mask,
    regulariser,
    resolve_rtol,
    update_operator,
    whiten,
)
from .hard import exact_gains
from .info import SolveInfo
from .operator import MergeOperator


def solve_hybrid(
    W0: Tensor,
    G: Tensor,
    C: Tensor,
    V: Tensor,
    P_list: Sequence[Tensor],
    U_list: Sequence[Tensor],
    weights: Sequence[float] | Tensor,
    *,
    ridge: float = 0.0,
    rtol: float | None = None,
    check_finite: bool = True,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, SolveInfo]:
    """Minimise ``||(W - W0) C_reg^T||^2 + sum_i lambda_i ||W P_i^T - U_i||^2 + ridge ||W - W0||^2``
    subject to ``W C^T = V``.

    Parameters
    ----------
    W0, G, C, V : as in :func:`solve_hard`: base rows (n, d), ``C_reg^T C_reg`` (d, d), the
        constraint features (s, d) (every concept's token rows) and their targets (n, s).
    P_list : per concept i, its context rows ``P_i`` (p_i, d): the rows of its target prompts that
        the UNet reads besides the token rows (start row, padding); may be empty (0, d).
    U_list : per concept i, its targets there, ``U_i = W_i P_i^T`` (n, p_i), from its own
        fine-tuned weights ``W_i``.
    weights : per concept, ``lambda_i >= 0``: how strongly its context outputs are kept.
    ridge, rtol, check_finite, return_info : as in :func:`solve_hard`. In the returned
        :class:`SolveInfo`, ``residual`` is that of the constraints (``W C^T = V``) alone and
        ``g_condition`` that of the metric ``A`` below.

    Closed form. With ``A = G + sum_i lambda_i P_i^T P_i + ridge I``, the objective is, up to a
    constant, ``tr((W - W~) A (W - W~)^T)``, where ``W~`` is its unconstrained minimiser (the
    soft merge of the context terms, :func:`solve_soft` with ``mu = 1``)::

        W~ A = W0 (G + ridge I) + sum_i lambda_i U_i P_i,  i.e.  W~ = W0 + sum_i lambda_i (U_i - W0 P_i^T) P_i A^-1

    The KKT conditions ``(W - W~) A = Lambda C`` (Lambda: the multipliers) and ``W C^T = V`` give
    ``W = W~ + (V - W~ C^T) M^+ C A^-1`` with ``M = C A^-1 C^T``: :func:`solve_hard` in the metric
    ``A`` from the base point ``W~``, with the same treatment of dependent and conflicting
    constraint rows. Substituting ``W~`` makes it one update of ``W0`` from the stacked misfit
    ``[V - W0 C^T, U - W0 P^T]``, so :meth:`MergeOperator.apply` streams rows through it; ``A`` is
    factored once (Cholesky or eigh) and never inverted. ``lambda = 0`` is :func:`solve_hard`;
    no constraints (C of 0 rows) is :func:`solve_soft` of the P_i with ``mu = 1``.
    """
    if len(P_list) != len(U_list):
        raise ValueError(f"P_list has {len(P_list)} concepts but U_list has {len(U_list)}.")
    check_problem(W0, G, C, V, ridge, check_finite)
    operator = factor_hybrid(G, C, P_list, weights, ridge=ridge, rtol=rtol, check_finite=check_finite,
                             diagnostics=return_info)
    for index, (P, U) in enumerate(zip(P_list, U_list)):
        check_matrix(U, f"U_list[{index}]", 2, check_finite)
        check_shapes([(f"U_list[{index}] rows", U.shape[0], W0.shape[0]),
                      (f"U_list[{index}] columns (context rows)", U.shape[1], P.shape[0])])
        check_same_device({f"U_list[{index}]": U}, W0)
    W = operator.apply(W0, torch.cat([V, *U_list], dim=1))
    return (W, operator.info()) if return_info else W


def factor_hybrid(
    G: Tensor,
    C: Tensor,
    P_list: Sequence[Tensor],
    weights: Sequence[float] | Tensor,
    *,
    ridge: float = 0.0,
    rtol: float | None = None,
    check_finite: bool = True,
    diagnostics: bool = False,
) -> MergeOperator:
    """Factor :func:`solve_hybrid`'s problem once; ``.apply(W0, targets)`` then solves it for any
    rows, with ``targets = [V, U_1, ..., U_k]`` concatenated column-wise. Arguments as in
    :func:`solve_hybrid`."""
    weights = torch.as_tensor(weights, dtype=FLOAT).reshape(-1)
    if weights.numel() != len(P_list):
        raise ValueError(f"weights has {weights.numel()} entries for {len(P_list)} concepts.")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"weights must be finite and >= 0, got {weights.tolist()}.")
    check_factor_problem(G, C, ridge, check_finite)
    d = G.shape[0]
    for index, P in enumerate(P_list):
        check_matrix(P, f"P_list[{index}]", 2, check_finite)
        check_shapes([(f"P_list[{index}] columns (feature dim)", P.shape[1], d)])
        check_same_device({f"P_list[{index}]": P}, G, "G")
    rtol = resolve_rtol(rtol, C.dtype)
    C64 = C.to(FLOAT)
    P64 = torch.cat([P.to(FLOAT) for P in P_list]) if P_list else C64.new_zeros(0, d)
    counts = torch.tensor([P.shape[0] for P in P_list], dtype=torch.long)
    row_weights = weights.to(G.device).repeat_interleave(counts.to(G.device))

    scaled = row_weights.sqrt()[:, None] * P64
    context = scaled.mT @ scaled
    A = regulariser(G, 1.0) + (context + context.mT) * 0.5  # G + sum_i lambda_i P_i^T P_i, symmetric
    whitening = whiten(A, ridge, what="G + sum_i lambda_i P_i^T P_i + ridge*I")
    spectrum = constraint_spectrum(C64, whitening)
    dependent = dependent_mask(spectrum, rtol)
    Z = update_operator(spectrum, exact_gains(spectrum, dependent))  # (s, d): M^+ C A^-1
    # W~ - W0 = (U - W0 P^T) Y with Y = diag(lambda) P A^-1; then W - W0 = (V - W0 C^T) Z + (U - W0 P^T)(Y - Y C^T Z)
    Y = row_weights[:, None] * whitening.solve_transposed(whitening.solve(P64.mT)).mT
    Z_context = Y - (Y @ C64.mT) @ Z
    norms = RowNorms(spectrum.right[:, dependent], constrained=C64.shape[0]) if diagnostics else None
    return MergeOperator(torch.cat([C64, P64]), torch.cat([Z, Z_context]), A, whitening, spectrum, dependent, rtol,
                         check_finite, norms)
