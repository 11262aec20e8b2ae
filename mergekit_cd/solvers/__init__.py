"""Closed-form merge solvers: pure tensor functions, float64 inside, no I/O.

``solve_hard`` is the paper's constrained merge, ``solve_soft`` its weighted generalisation.
Both take the rows of every layer stacked into one ``W0`` (rows share the text features, so
one factorisation serves them all) and accept ``ridge``, ``rtol``, ``check_finite`` and
``return_info`` like ``scipy.linalg`` solvers.
"""

from .hard import solve_hard
from .info import IllConditionedWarning, SolveInfo
from .soft import solve_soft

__all__ = ["solve_hard", "solve_soft", "SolveInfo", "IllConditionedWarning"]
