"""Linear algebra shared by the hard and soft merges.

Both merges reduce to the same three steps, done in float64:

1. *Whitening*: factor ``A = G + ridge I`` (hard) or ``mu G + ridge I`` (soft) as ``L L^T``
   (Cholesky when well conditioned, eigh otherwise), so the regulariser
   ``tr((W - W0) A (W - W0)^T)`` becomes the plain Frobenius norm of ``(W - W0) L``.
2. *Constraint spectrum*: a thin SVD ``U S Q^T`` of the whitened constraints
   ``B = L^-1 C^T``. It reveals dependent rows (small singular values) and is invariant to
   the order of the rows, which is what makes the merge order-independent.
3. *Row update*: ``W = W0 + (V - W0 C^T) Z`` with ``Z = Q f(S) U^T L^-1``, where ``f`` is
   ``1/s`` (hard, truncated pseudo-inverse) or ``s / (s^2 + 1)`` (soft). ``Z`` is shared by
   every row of every layer, so the rows are streamed through in chunks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .info import IllConditionedWarning, SolveInfo

FLOAT = torch.float64
#: A G (plus ridge) whose condition number exceeds this is treated as singular: the fallback
#: ridge lambda_max / G_CONDITION_LIMIT is added so the solve stays defined and finite.
G_CONDITION_LIMIT = 1e10
#: Constraint rows whose singular value (in the G-metric) is below ``rtol * s_max`` are dependent.
#: The default is ``sqrt(eps)`` of the constraint features' dtype (1.5e-8 for float64, 3.5e-4 for
#: float32, 3.1e-2 for float16): rows that agree to about half the digits their dtype carries
#: are one row, so near-duplicates with conflicting targets are met in least squares instead of
#: exactly at the price of an enormous weight change.
def default_rtol(dtype: torch.dtype) -> float:
    """``sqrt(eps)`` of ``dtype``: the default dependence tolerance for features of that precision."""
    return math.sqrt(torch.finfo(dtype).eps)


def resolve_rtol(rtol: float | None, dtype: torch.dtype) -> float:
    """The tolerance to use: the caller's, checked, or :func:`default_rtol`."""
    if rtol is None:
        return default_rtol(dtype)
    if not (0 <= rtol < 1):
        raise ValueError(f"rtol must be in [0, 1), got {rtol}.")
    return rtol


#: Singular values below this fraction of the largest are rounding noise (about 1e3 * float64 eps).
NUMERICAL_ZERO = 1e3 * torch.finfo(torch.float64).eps
#: cond(M) on the kept constraint directions above this gets an IllConditionedWarning: the rows
#: are nearly dependent, and meeting them exactly can move the weights very far.
M_CONDITION_WARNING = 1e8
#: A dependent direction q "conflicts" when ||(V - W0 C^T) q|| exceeds this fraction of
#: ||V - W0 C^T||: its targets cannot all be met, so they are met in least squares.
CONFLICT_RTOL = 1e-6
#: Cholesky is used when its pivots bound cond(G + ridge I) below G_CONDITION_LIMIT / this margin;
#: otherwise the exact eigendecomposition decides.
CHOLESKY_MARGIN = 10.0
#: Rows streamed per chunk are chosen so one float64 chunk holds about this many numbers.
CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class Whitening:
    """A factor ``L`` with ``L L^T = A`` (``A`` = the regulariser's matrix), used through solves."""

    lower: Tensor | None  # Cholesky factor, or None when the eigh path was taken
    eigenvectors: Tensor | None
    inv_sqrt_eigenvalues: Tensor | None
    ridge: float
    notes: tuple[str, ...]

    def solve(self, X: Tensor) -> Tensor:
        """``L^-1 X``."""
        if self.lower is not None:
            return torch.linalg.solve_triangular(self.lower, X, upper=False)
        return self.inv_sqrt_eigenvalues[:, None] * (self.eigenvectors.mT @ X)

    def solve_transposed(self, X: Tensor) -> Tensor:
        """``L^-T X``."""
        if self.lower is not None:
            return torch.linalg.solve_triangular(self.lower.mT, X, upper=True)
        return self.eigenvectors @ (self.inv_sqrt_eigenvalues[:, None] * X)


def whiten(A: Tensor, ridge: float, *, what: str) -> Whitening:
    """Factor ``A + ridge I`` (``A`` symmetric PSD, float64); add a warned fallback ridge if singular."""
    d = A.shape[0]
    eye = torch.eye(d, dtype=FLOAT, device=A.device)
    shifted = A + ridge * eye
    diagonal = torch.diagonal(shifted)
    scale = float(diagonal.max()) if d else 0.0
    if scale > 0:
        lower, info = torch.linalg.cholesky_ex(shifted)
        if int(info) == 0:
            # Every Cholesky pivot L_ii^2 is >= lambda_min and every diagonal entry <= lambda_max,
            # so this is a lower bound of cond(A); a singular A shows up as a tiny pivot. Keep a margin.
            estimate = scale / float(torch.diagonal(lower).min()) ** 2
            if estimate * CHOLESKY_MARGIN < G_CONDITION_LIMIT:
                return Whitening(lower, None, None, ridge, ())
    eigenvalues, eigenvectors = torch.linalg.eigh(shifted)
    top = float(eigenvalues[-1]) if d else 0.0
    if top < 0 or float(eigenvalues[0]) < -math.sqrt(torch.finfo(FLOAT).eps) * max(top, 1.0):
        raise ValueError(f"{what} must be symmetric positive semi-definite (smallest eigenvalue "
                         f"{float(eigenvalues[0]):.3g}, largest {top:.3g}).")
    notes: tuple[str, ...] = ()
    floor = top / G_CONDITION_LIMIT
    if top <= 0 or float(eigenvalues[0]) < floor:
        extra = floor if top > 0 else 1.0
        rank = int((eigenvalues > floor).sum()) if top > 0 else 0
        message = (f"{what} is singular or ill-conditioned (numerical rank {rank} of {d}): the "
                   f"captions leave feature directions unconstrained. Added a fallback ridge "
                   f"{extra:.3g} (largest eigenvalue / {G_CONDITION_LIMIT:.0e}); weights may move "
                   f"freely in those directions. Use more captions or pass ridge > 0.")
        warnings.warn(message, IllConditionedWarning, stacklevel=4)
        notes = (message,)
        ridge = ridge + extra
        eigenvalues = eigenvalues + extra
    inv_sqrt = eigenvalues.clamp_min(torch.finfo(FLOAT).tiny).rsqrt()
    return Whitening(None, eigenvectors, inv_sqrt, ridge, notes)


def condition_number(A: Tensor) -> float:
    """Condition number of a symmetric PSD matrix (inf when singular)."""
    if A.shape[0] == 0:
        return 1.0
    eigenvalues = torch.linalg.eigvalsh(A)
    low, high = float(eigenvalues[0]), float(eigenvalues[-1])
    return high / low if low > 0 else math.inf


@dataclass(frozen=True)
class ConstraintSpectrum:
    """SVD of the whitened constraints ``B = L^-1 C^T = U diag(S) Q^T``."""

    left: Tensor  # L^-T U, (d, m): maps whitened directions back to features
    singular_values: Tensor  # S, (m,), descending, m = min(d, s)
    right: Tensor  # Q, (s, s): full, so that dependent directions of s > d rows are included


def constraint_spectrum(C: Tensor, whitening: Whitening) -> ConstraintSpectrum:
    """Rank-revealing SVD of the constraint features in the regulariser's metric."""
    s, d = C.shape
    B = whitening.solve(C.mT)
    U, S, Qh = torch.linalg.svd(B, full_matrices=s > d)
    return ConstraintSpectrum(whitening.solve_transposed(U[:, : S.shape[0]]), S, Qh.mT)


def dependent_mask(spectrum: ConstraintSpectrum, rtol: float) -> Tensor:
    """Boolean (s,) mask over the right singular directions judged dependent."""
    s = spectrum.right.shape[0]
    S = spectrum.singular_values
    top = float(S[0]) if S.numel() else 0.0
    mask = torch.ones(s, dtype=torch.bool, device=S.device)
    if top > 0:
        mask[: S.shape[0]] = S <= rtol * top
    return mask


def update_operator(spectrum: ConstraintSpectrum, gains: Tensor) -> Tensor:
    """``Z = Q[:, :m] diag(gains) (L^-T U)^T``, the (s, d) map from target misfit to weight change."""
    m = gains.shape[0]
    return (spectrum.right[:, :m] * gains) @ spectrum.left.mT


@dataclass(frozen=True)
class RowStats:
    """Norms gathered while streaming rows, for diagnostics only."""

    residual: float  # relative ||W C^T - V||_F / ||V||_F of the returned W
    relative_change: float  # ||W - W0||_F / ||W0||_F
    misfit_norm: float  # ||V - W0 C^T||_F
    watched_norms: Tensor  # norms of the misfit along each watched direction


def scaled_norm(x: Tensor, dim: int | None = None) -> Tensor:
    """Frobenius (or per-``dim``) norm that neither overflows nor underflows: scale by max |x| first."""
    scale = x.abs().amax(dim=dim, keepdim=True) if x.numel() else torch.ones((), dtype=x.dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    norm = (x / scale).norm(dim=dim, keepdim=True) * scale
    return norm.reshape(-1) if dim is not None else norm.reshape(())


class RowNorms:
    """Accumulates the norms behind :class:`RowStats` over chunks, and over several calls
    (one per layer), without keeping any rows."""

    _KEYS = ("residual", "target", "change", "base", "misfit")

    def __init__(self, watch: Tensor, constrained: int | None = None) -> None:
        self.watch = watch  # (s, k) constraint-space directions whose misfit is measured
        # only the first ``constrained`` target columns are constraints (all when None): the
        # hybrid merge's further columns are soft terms, so residual and misfit leave them out
        self.constrained = constrained
        self._parts: dict[str, list[Tensor]] = {key: [] for key in (*self._KEYS, "watched")}

    def add(self, w0: Tensor, target: Tensor, misfit: Tensor, achieved: Tensor, C: Tensor) -> None:
        """Record one float64 chunk: base rows, targets, misfit and the rows actually returned."""
        target, misfit, C = target[:, :self.constrained], misfit[:, :self.constrained], C[:self.constrained]
        self._parts["residual"].append(scaled_norm(torch.addmm(target, achieved, C.mT, alpha=-1.0)))
        self._parts["target"].append(scaled_norm(target))
        self._parts["change"].append(scaled_norm(achieved - w0))
        self._parts["base"].append(scaled_norm(w0))
        self._parts["misfit"].append(scaled_norm(misfit))
        self._parts["watched"].append(scaled_norm(misfit @ self.watch, dim=0))

    def stats(self) -> RowStats:
        total = {key: scaled_norm(torch.stack(self._parts[key]).cpu()) if self._parts[key]
                 else torch.zeros((), dtype=FLOAT) for key in self._KEYS}
        watched = scaled_norm(torch.stack(self._parts["watched"]).cpu(), dim=0) if self._parts["watched"] \
            else torch.zeros(self.watch.shape[1], dtype=FLOAT)
        return RowStats(_ratio(total["residual"], total["target"]), _ratio(total["change"], total["base"]),
                        float(total["misfit"]), watched)


def chunk_rows(width: int) -> int:
    """Rows of a chunk ``width`` numbers wide: about :data:`CHUNK_ELEMENTS` numbers, small enough
    to stay in the CPU's cache while every product and sum of the chunk is done, large enough
    that the products stay efficient."""
    return max(1, CHUNK_ELEMENTS // max(width, 1))


def row_slices(n: int, width: int) -> Iterator[slice]:
    """Consecutive slices of ``n`` rows, :func:`chunk_rows` of them each."""
    step = chunk_rows(width)
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def stream_rows(W0: Tensor, C: Tensor, V: Tensor, Z: Tensor, *, norms: RowNorms | None = None,
                misfit: Tensor | None = None, difference: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """Compute ``W = W0 + (V - W0 C^T) Z`` chunk by chunk in float64, returned in ``dtype``
    (default W0's); ``difference``: return ``W - W0`` instead, computed as that difference of the
    float64 chunks, so that no full-size float64 W is kept to subtract W0 from later.

    Rows are independent, so streaming bounds the float64 working set whatever ``n`` is.
    With ``norms``, also record the residual, change and misfit of every chunk there.
    ``misfit``: ``V - W0 C^T`` as the caller has it, used instead of computing it.
    """
    n, d = W0.shape
    out = torch.empty_like(W0, dtype=dtype or W0.dtype)
    for rows in row_slices(n, max(d, C.shape[0])):
        w0 = W0[rows].to(FLOAT)
        target = V[rows].to(FLOAT)
        gap = torch.addmm(target, w0, C.mT, alpha=-1.0) if misfit is None else misfit[rows].to(FLOAT)
        full = torch.addmm(w0, gap, Z)
        if norms is not None:  # of W as returned (rounded to its dtype); of the float64 W beside a difference
            norms.add(w0, target, gap, full if difference else full.to(out.dtype).to(FLOAT), C)
        out[rows] = full - w0 if difference else full
    return out


def _ratio(numerator: Tensor, denominator: Tensor) -> float:
    """numerator / denominator, or the numerator itself when the denominator is zero."""
    return float(numerator / denominator) if float(denominator) > 0 else float(numerator)


def check_matrix(x: Tensor, name: str, ndim: int, check_finite: bool) -> None:
    """Validate one solver argument: a floating tensor of the right rank, finite if asked."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}.")
    # A NaN or inf anywhere makes the sum non-finite (cheap); only then look element-wise
    # (a finite sum that overflowed is let through by the exact check).
    if check_finite and not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values.")


def check_shapes(pairs: list[tuple[str, int, int]]) -> None:
    """Raise one ValueError naming the first pair of dimensions that disagree."""
    for label, got, expected in pairs:
        if got != expected:
            raise ValueError(f"Shape mismatch: {label} is {got}, expected {expected}.")


def check_same_device(tensors: dict[str, Tensor], reference: Tensor, reference_name: str = "W0") -> None:
    """All arguments must live on one device; we never move data behind the caller's back."""
    for name, t in tensors.items():
        if t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}.")


def regulariser(G: Tensor, scale: float) -> Tensor:
    """``scale * G`` in float64, symmetrised (G built in low precision is rarely exactly symmetric)."""
    G64 = G.to(FLOAT)
    return (G64 + G64.mT) * (0.5 * scale)



def check_problem(W0: Tensor, G: Tensor, C: Tensor, V: Tensor, ridge: float,
                  check_finite: bool, labels: tuple[str, str] = ("C", "V")) -> None:
    """Validate the arguments shared by both solvers; errors name the argument and the fix."""
    c_name, v_name = labels
    for name, x in (("W0", W0), ("G", G), (c_name, C), (v_name, V)):
        check_matrix(x, name, 2, check_finite)
    n, d = W0.shape
    if d == 0:
        raise ValueError("W0 has no feature columns (d = 0); there is nothing to merge.")
    check_shapes([("G rows", G.shape[0], d), ("G columns", G.shape[1], d),
                  (f"{c_name} columns (feature dim)", C.shape[1], d),
                  (f"{v_name} rows", V.shape[0], n),
                  (f"{v_name} columns (constraint rows)", V.shape[1], C.shape[0])])
    check_same_device({"G": G, c_name: C, v_name: V}, W0)
    check_ridge(ridge)


def check_factor_problem(G: Tensor, C: Tensor, ridge: float, check_finite: bool, c_name: str = "C") -> None:
    """Validate what a factorisation needs: G (d, d) and C (s, d) on one device, ridge >= 0."""
    for name, x in (("G", G), (c_name, C)):
        check_matrix(x, name, 2, check_finite)
    d = G.shape[0]
    if d == 0:
        raise ValueError("G is empty (d = 0); there is nothing to merge.")
    check_shapes([("G columns", G.shape[1], d), (f"{c_name} columns (feature dim)", C.shape[1], d)])
    check_same_device({c_name: C}, G, "G")
    check_ridge(ridge)


def check_ridge(ridge: float) -> None:
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}.")


def build_info(A: Tensor, whitening: Whitening, spectrum: ConstraintSpectrum, dependent: Tensor,
               stats: RowStats, rtol: float) -> SolveInfo:
    """Diagnostics common to both solvers (see :class:`SolveInfo`)."""
    s = spectrum.right.shape[0]
    m = spectrum.singular_values.shape[0]
    kept = spectrum.singular_values[~dependent[:m]]
    rank = int(kept.numel())
    threshold = CONFLICT_RTOL * stats.misfit_norm
    n_conflicting = int((stats.watched_norms > threshold).sum()) if threshold > 0 else 0
    notes = list(whitening.notes)
    if rank < s:
        notes.append(f"{s - rank} of {s} constraint rows depend on the others (rtol {rtol:g}): "
                     f"{s - rank - n_conflicting} consistent, satisfied exactly; "
                     f"{n_conflicting} conflicting, met in the least-squares sense.")
    m_condition = float((kept[0] / kept[-1]) ** 2) if rank else math.inf
    if m_condition > M_CONDITION_WARNING and rank:
        notes.append(f"Constraint rows are nearly dependent (cond(M) = {m_condition:.2g}): meeting them "
                     f"exactly moved the weights by {100 * stats.relative_change:.3g}% of their norm.")
    return SolveInfo(stats.residual, condition_number(A), m_condition, s, rank, s - rank,
                     n_conflicting, whitening.ridge, stats.relative_change, rtol, tuple(notes))
