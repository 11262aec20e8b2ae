"""What a merge reports: per concept the residual of the weights as written beside the naive sum's,
the drift on held-out captions (the naive sum's too when asked: ``sum_drift``); accumulated layer
by layer, no output matrix kept."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .delta import CompressionReport, Concept, TokenRename
from .solvers import SolveInfo, chunk_rows, row_slices


@dataclass(frozen=True)
class ConceptReport:
    """How well the merged model keeps one concept: K/V outputs on its own target prompts."""

    token: str
    class_word: str
    prompts: tuple[str, ...]
    residual: float  # ||W C_i^T - W_i C_i^T|| / ||W_i C_i^T|| of W = W0 + the float32 difference returned
    sum_residual: float  # the same for the naive sum of deltas
    #: the same for W as full-weight formats write it: W0 + difference, rounded to float32; None where
    #: not measured (a merge written in a format of differences: what it writes is the difference)
    full_weights_residual: float | None = None


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
    sum_drift: float | None  # the same for the naive sum of deltas; None where not asked for (``sum_drift``)
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
    report prints and cd-eval recomputes for any delta.

    Every concept's feature rows are stacked once, so a layer costs one product of the stacked
    candidates with them, however many concepts there are; each concept's share is summed from
    its columns."""

    def __init__(self, num_candidates: int, features: Sequence[Tensor]) -> None:
        self.features = torch.cat(list(features))  # (s, d): every concept's C_i, in order
        sizes = torch.tensor([C.shape[0] for C in features])
        self.concept_of_column = torch.repeat_interleave(torch.arange(len(features)), sizes).to(self.features.device)
        zeros = torch.zeros(len(features), dtype=torch.float64, device=self.features.device)
        self.errors = [zeros.clone() for _ in range(num_candidates)]
        self.targets = zeros.clone()

    def add(self, targets: Tensor, own: Tensor, candidates: Sequence[Tensor]) -> None:
        """One layer: each concept's targets ``(W0 + D_i) C_i^T`` and own difference on its features
        ``D_i C_i^T``, side by side as the stacked features' columns (n, s), and each candidate's
        difference of this layer (n, d), all float64."""
        self.add_stacked(targets, own, torch.cat(list(candidates)))

    def add_stacked(self, targets: Tensor, own: Tensor, candidates: Tensor) -> None:
        """:meth:`add` of candidates given in one tensor, each one's rows after the previous one's
        ((candidates x n, d)): a caller that fills them in place spares the copy of stacking them."""
        self.targets += self._per_concept(targets)
        outputs = candidates @ self.features.mT
        for k, output in enumerate(outputs.split(targets.shape[0])):
            self.errors[k] += self._per_concept(output - own)

    def _per_concept(self, columns: Tensor) -> Tensor:
        """Squared norm of each concept's columns."""
        total = torch.zeros_like(self.targets)
        return total.index_add_(0, self.concept_of_column, columns.square().sum(0))

    def relative(self) -> list[list[float]]:
        """Per candidate, per concept: the relative residual over every layer added."""
        targets = self.targets.tolist()
        return [[_ratio(error, target) for error, target in zip(row.tolist(), targets)] for row in self.errors]


class ReportSums:
    """Squared norms for the report, accumulated layer by layer (no output matrix is kept).

    The held-out drift of a solved merge with fewer constraint rows than features (s < d) comes
    from the solve's own small matrices: its difference is ``(V - W0 C^T) Z`` with the misfit
    ``V - W0 C^T`` = each concept's own change (n, s), so ``||D C_h^T||^2 = sum((misfit K) *
    misfit)`` with ``K = Z G_h Z^T`` (s, s), factored once: a layer costs n s^2, not the n d^2 of
    its difference times the d x d held-out Gram matrix. That is the drift of the float64 solve:
    rounding the difference to float32 moves it by about 1e-7 of itself, far below the digits
    printed (the residuals, where rounding is what shows, are those of the weights as written).
    With as many rows as features or more (SD1.5, d = 768: 128 concepts of six rows) the
    difference's own n d^2 is the cheaper, and is taken. The base's own held-out outputs, the
    drifts' denominator, come summed over its layers (``base_outputs``, cached:
    :func:`~.feature_cache.cached_base_outputs`)."""

    def __init__(self, features: Sequence[Tensor], held_gram: Tensor, update: Tensor | None,
                 base_outputs: float, *, full_weights: bool = True, sum_drift: bool = False) -> None:
        # the merged difference as returned, the full weights as written (``full_weights``), the naive sum
        self.full_weights = full_weights
        self.residuals = ConstraintResiduals(3 if full_weights else 2, features)
        self.held_gram = held_gram
        smaller = update is not None and update.shape[0] < held_gram.shape[0]
        self.misfit_form = update @ held_gram @ update.mT if smaller else None  # K = Z G_h Z^T
        self.drift = 0.0
        self.sum_drift = 0.0 if sum_drift else None  # the naive sum's: n d^2 a layer, only when asked
        self.base = base_outputs  # ||W0 C_h^T||^2 over every layer

    def add(self, W0: Tensor, targets: Tensor, own: Tensor, merged: Tensor, naive_sum: Tensor,
            misfit: Tensor | None = None) -> None:
        """One layer: base rows, the constraint targets ``(W0 + D_i) C_i^T`` and each concept's own
        difference on its features ``D_i C_i^T`` (n, s: the concepts' columns side by side), the
        merged difference as returned (float32), the summed one, and for a solved merge the misfit
        its update was applied to (n, rows of ``update``). Residuals are of what is written, not of
        the float64 solve. The candidates are made in place in one float64 buffer, a cache-sized
        chunk of rows at a time, each chunk the residuals' one product: the merged difference
        converted as it is copied there, the full weights as ``FineTunedWeights.from_delta`` writes
        them (W0 + difference in float32) less W0."""
        count, width = len(self.residuals.errors), W0.shape[1]
        buffer = W0.new_empty((count * chunk_rows(width), width))  # the candidates of a chunk of rows
        for chunk in row_slices(W0.shape[0], width):
            w0, rows = W0[chunk], chunk.stop - chunk.start
            candidates = buffer[:count * rows]
            candidates[:rows].copy_(merged[chunk])
            if self.full_weights:
                candidates[rows:2 * rows].copy_(w0.float() + merged[chunk]).sub_(w0)
            candidates[-rows:].copy_(naive_sum[chunk])
            self.residuals.add_stacked(targets[chunk], own[chunk], candidates)
        if misfit is not None and self.misfit_form is not None:
            self.drift += float(((misfit @ self.misfit_form) * misfit).sum().clamp_min(0))
        else:
            self.drift += quadratic(merged.to(W0.dtype), self.held_gram)
        if self.sum_drift is not None:
            self.sum_drift += quadratic(naive_sum, self.held_gram)

    def report(self, method: str, concepts: Sequence[Concept], renames: Sequence[TokenRename], *,
               num_captions: int, num_rows: int, gram_from_cache: bool, info: SolveInfo | None,
               notes: Sequence[str] = ()) -> MergeReport:
        """The report of a merge whose every layer was added."""
        relative = self.residuals.relative()
        merged, summed = relative[0], relative[-1]
        full = relative[1] if self.full_weights else [None] * len(merged)
        rows = tuple(ConceptReport(c.token, c.class_word or "", c.prompts, r, sr, fr)
                     for c, r, sr, fr in zip(concepts, merged, summed, full))
        sum_drift = None if self.sum_drift is None else _ratio(self.sum_drift, self.base)
        return MergeReport(method, rows, _ratio(self.drift, self.base), sum_drift,
                           tuple(renames), num_captions, num_rows, gram_from_cache, info,
                           (*notes, *(info.notes if info is not None else ())))


def quadratic(X: Tensor, gram: Tensor) -> float:
    """``||X C^T||^2 = sum((X G) * X)`` for ``G = C^T C``, without the rows of C."""
    return float(((X @ gram) * X).sum().clamp_min(0))


def _ratio(squared_numerator: float, squared_denominator: float) -> float:
    """sqrt(a / b): a relative norm from squared norms; the absolute one when b is zero."""
    if squared_denominator > 0:
        return math.sqrt(squared_numerator / squared_denominator)
    return math.sqrt(squared_numerator)

