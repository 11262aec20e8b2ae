"""What a merge reports: per concept the residual of the weights as written, the drift on held-out
captions, each beside the naive sum's; accumulated layer by layer, no output matrix kept."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from .delta import CompressionReport, Concept, TokenRename
from .solvers import SolveInfo


@dataclass(frozen=True)
class ConceptReport:
    """How well the merged model keeps one concept: K/V outputs on its own target prompts."""

    token: str
    class_word: str
    prompts: tuple[str, ...]
    residual: float  # ||W C_i^T - W_i C_i^T|| / ||W_i C_i^T|| of W = W0 + the float32 difference returned
    sum_residual: float  # the same for the naive sum of deltas
    #: the same for W as full-weight formats write it: W0 + difference, rounded to float32
    full_weights_residual: float = 0.0


@dataclass(frozen=True)
class StatisticsSize:
    """The merge statistics an output stores, against its difference: concepts and bytes."""

    concepts: int
    statistics_bytes: int
    delta_bytes: int


@dataclass(frozen=True)
class MergeReport:
    """What a merge did and how it went."""

    method: str
    concepts: tuple[ConceptReport, ...]
    drift: float  # relative change of K/V outputs on held-out captions, merged vs base
    sum_drift: float  # the same for the naive sum of deltas
    token_renames: tuple[TokenRename, ...]
    num_reg_captions: int
    num_reg_rows: int
    gram_from_cache: bool
    solve_info: SolveInfo | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    factors: CompressionReport | None = None  # a LoRA output's factoring, measured on what is written
    statistics: StatisticsSize | None = None  # what a native output stores to be grown or shrunk later


class ConstraintResiduals:
    """Per candidate difference and concept, ``||(M - D_i) C_i^T||^2`` against the target
    ``||(W0 + D_i) C_i^T||^2``, summed layer by layer: the one home of the residual the merge
    report prints and cd-eval recomputes for any delta."""

    def __init__(self, num_candidates: int, num_concepts: int) -> None:
        self.errors = [[0.0] * num_concepts for _ in range(num_candidates)]
        self.targets = [0.0] * num_concepts

    def add(self, features: list[Tensor], W0: Tensor, own: list[Tensor], candidates: Sequence[Tensor]) -> None:
        """One layer: base rows, each concept's own difference on its features (``own[i]`` =
        D_owner C_i^T) and each candidate's difference of this layer (float64)."""
        for i, C in enumerate(features):
            self.targets[i] += _squared(W0 @ C.T + own[i])
            for k, candidate in enumerate(candidates):
                self.errors[k][i] += _squared(candidate @ C.T - own[i])

    def relative(self) -> list[list[float]]:
        """Per candidate, per concept: the relative residual over every layer added."""
        return [[_ratio(error, target) for error, target in zip(row, self.targets)] for row in self.errors]


class ReportSums:
    """Squared norms for the report, accumulated layer by layer (no output matrix is kept)."""

    def __init__(self, num_concepts: int) -> None:
        # the merged difference as returned, the full weights as written, the naive sum
        self.residuals = ConstraintResiduals(3, num_concepts)
        self.drift = self.sum_drift = self.base = 0.0

    def add(self, features: list[Tensor], W0: Tensor, own: list[Tensor], merged: Tensor, naive_sum: Tensor,
            held_gram: Tensor) -> None:
        """One layer: base rows, each concept's own difference on its features (``own[i]`` =
        D_owner C_i^T), the merged difference as returned (float32, held in float64) and the
        summed one. Residuals are of what is written, not of the float64 solve."""
        full = (W0.float() + merged.float()).double() - W0  # what FineTunedWeights.from_delta writes
        self.residuals.add(features, W0, own, (merged, full, naive_sum))
        self.drift += _quadratic(merged, held_gram)
        self.sum_drift += _quadratic(naive_sum, held_gram)
        self.base += _quadratic(W0, held_gram)

    def report(self, method: str, concepts: Sequence[Concept], renames: Sequence[TokenRename], *,
               num_captions: int, num_rows: int, gram_from_cache: bool, info: SolveInfo | None,
               notes: Sequence[str] = ()) -> MergeReport:
        """The report of a merge whose every layer was added."""
        merged, full, summed = self.residuals.relative()
        rows = tuple(ConceptReport(c.token, c.class_word or "", c.prompts, r, sr, fr)
                     for c, r, sr, fr in zip(concepts, merged, summed, full))
        return MergeReport(method, rows, _ratio(self.drift, self.base), _ratio(self.sum_drift, self.base),
                           tuple(renames), num_captions, num_rows, gram_from_cache, info,
                           (*notes, *(info.notes if info is not None else ())))


def _squared(x: Tensor) -> float:
    return float(x.square().sum())


def _quadratic(X: Tensor, gram: Tensor) -> float:
    """``||X C^T||^2 = sum((X G) * X)`` for ``G = C^T C``, without the rows of C."""
    return float(((X @ gram) * X).sum().clamp_min(0))


def _ratio(squared_numerator: float, squared_denominator: float) -> float:
    """sqrt(a / b): a relative norm from squared norms; the absolute one when b is zero."""
    if squared_denominator > 0:
        return math.sqrt(squared_numerator / squared_denominator)
    return math.sqrt(squared_numerator)

