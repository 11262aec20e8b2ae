"""Closed-form merge solvers: pure tensor functions, float64 inside, no I/O.

``solve_hard`` is the paper's constrained merge, ``solve_soft`` its weighted generalisation,
``solve_hybrid`` exact on the token rows and weighted on each concept's context rows.
All take the rows of every layer stacked into one ``W0`` (rows share the text features, so
one factorisation serves them all) and accept ``ridge``, ``rtol``, ``check_finite`` and
``return_info`` like ``scipy.linalg`` solvers. ``factor_hard`` / ``factor_soft`` / ``factor_hybrid`` split a solve
into one factorisation and a :class:`MergeOperator` applied layer by layer (as
``cho_factor`` / ``cho_solve`` do), so a merge can stream the layers.
"""

from .hard import factor_hard, solve_hard
from .hybrid import factor_hybrid, solve_hybrid
from ._common import chunk_rows, row_slices
from .info import IllConditionedWarning, SolveInfo
from .operator import MergeOperator
from .soft import factor_soft, solve_soft

__all__ = ["solve_hard", "solve_soft", "solve_hybrid", "factor_hard", "factor_soft", "factor_hybrid",
           "MergeOperator", "SolveInfo", "IllConditionedWarning"]
