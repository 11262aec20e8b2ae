"""Diagnostics returned by the solvers with ``return_info=True``, and their warning type."""

from __future__ import annotations

from dataclasses import dataclass


class IllConditionedWarning(UserWarning):
    """The caption Gram matrix G was singular or ill-conditioned and a fallback ridge was added."""


@dataclass(frozen=True)
class SolveInfo:
    """What a solve found and did.

    residual: relative constraint residual ||W C^T - V||_F / ||V||_F of the returned W
        (for ``solve_soft``: how far the soft solution is from meeting every target exactly).
    g_condition: condition number of G as given (inf when singular).
    m_condition: condition number of M = C (G + ridge I)^-1 C^T restricted to the
        constraint directions that were kept (inf when none were kept).
    n_constraints: number of constraint rows s.
    rank: numerical rank of the constraints in the G-metric (rows kept as independent).
    n_dependent: constraint rows that were linear combinations of others (s - rank).
    n_conflicting: dependent rows whose targets disagree with the rows they depend on;
        they are met in the least-squares sense, symmetrically in the inputs.
    ridge: ridge actually used, including any fallback added for a singular G.
    relative_change: ||W - W0||_F / ||W0||_F, how far the weights moved.
    rtol: the dependence tolerance that was applied.
    notes: one human-readable line per action taken or warning raised.
    """

    residual: float
    g_condition: float
    m_condition: float
    n_constraints: int
    rank: int
    n_dependent: int
    n_conflicting: int
    ridge: float
    relative_change: float
    rtol: float
    notes: tuple[str, ...] = ()
