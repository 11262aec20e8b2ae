"""Property tests of the closed-form merge solvers: the laws they must obey on any input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from mergekit_cd.solvers import IllConditionedWarning, solve_hard, solve_hybrid, solve_soft

F64 = torch.float64
# Generated problems include deliberately ill-conditioned constraints; the warning they raise is
# tested on its own below.
pytestmark = pytest.mark.filterwarnings("ignore::mergekit_cd.solvers.IllConditionedWarning")


def random_matrix(rng: np.random.Generator, rows: int, cols: int, cond: float, scale: float) -> torch.Tensor:
    """A rows x cols matrix with singular values spread over [scale / cond, scale]."""
    k = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    sv = scale * np.geomspace(1.0, 1.0 / cond, k) if k else np.zeros(0)
    return torch.from_numpy((u * sv) @ v.T)


@st.composite
def problems(draw, *, duplicates: bool = False, conflicting: bool = False, feasible: bool = True):
    """A merge problem (W0, G, C, V, W_true): optional duplicated constraint rows."""
    n = draw(st.integers(1, 8))
    d = draw(st.integers(1, 12))
    s = draw(st.integers(1, d))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 10.0 ** draw(st.integers(-3, 3))
    W0 = torch.from_numpy(rng.standard_normal((n, d)))
    C_reg = random_matrix(rng, draw(st.integers(d, 3 * d)), d, draw(st.sampled_from([1.0, 10.0, 1e3])), scale)
    C = random_matrix(rng, s, d, draw(st.sampled_from([1.0, 10.0, 1e3])), scale)
    W_true = W0 + torch.from_numpy(rng.standard_normal((n, d)))
    V = W_true @ C.T if feasible else torch.from_numpy(rng.standard_normal((n, s)))
    if duplicates:
        copies = draw(st.lists(st.integers(0, s - 1), min_size=1, max_size=3))
        C = torch.cat([C, C[copies]])
        extra = V[:, copies].clone()
        if conflicting:
            extra[:, 0] += torch.from_numpy(rng.standard_normal(n)) * (1 + extra[:, 0].abs())
        V = torch.cat([V, extra], dim=1)
    ridge = draw(st.sampled_from([0.0, 0.0, 1e-3, 1.0])) * scale**2
    return W0, C_reg.T @ C_reg, C, V, ridge


def objective(W, W0, G, ridge):
    D = W - W0
    return float(torch.einsum("ij,jk,ik->", D, G, D) + ridge * (D * D).sum())


def relative_residual(W, C, V):
    return float((W @ C.T - V).norm() / V.norm().clamp_min(1e-300))


def row_space_complement(C: torch.Tensor) -> torch.Tensor:
    """Projector onto the directions no constraint row touches."""
    d = C.shape[1]
    return torch.eye(d, dtype=F64) - torch.linalg.pinv(C) @ C


# --------------------------------------------------------------------------- hard constraints


@given(problems())
def test_constraints_hold_for_any_feasible_problem(problem):
    """W C^T = V to 1e-10 relative whenever some W satisfies the constraints."""
    W0, G, C, V, ridge = problem
    W, info = solve_hard(W0, G, C, V, ridge=ridge, return_info=True)
    assert relative_residual(W, C, V) < 1e-10
    assert info.residual < 1e-10
    assert info.n_dependent == 0 and info.rank == C.shape[0]


@given(problems(duplicates=True))
def test_consistent_duplicate_rows_are_satisfied_exactly(problem):
    """Repeating a constraint row with the same target changes nothing and is reported."""
    W0, G, C, V, ridge = problem
    s = C.shape[0]
    W, info = solve_hard(W0, G, C, V, ridge=ridge, return_info=True)
    assert relative_residual(W, C, V) < 1e-10
    assert info.n_dependent == s - torch.linalg.matrix_rank(C).item()
    assert info.n_conflicting == 0
    unique = torch.unique(C, dim=0, return_inverse=True)[1]
    first = [int((unique == u).nonzero()[0]) for u in range(int(unique.max()) + 1)]
    W_unique = solve_hard(W0, G, C[first], V[:, first], ridge=ridge)
    assert torch.allclose(W, W_unique, rtol=1e-9, atol=1e-9 * float(W.abs().max()))


@given(problems(duplicates=True, conflicting=True))
def test_conflicting_duplicates_are_met_in_least_squares(problem):
    """Same feature, different targets: the solution meets their mean, and says so."""
    W0, G, C, V, ridge = problem
    W, info = solve_hard(W0, G, C, V, ridge=ridge, return_info=True)
    assert info.n_conflicting >= 1
    assert any("conflicting" in note for note in info.notes)
    # least squares: the misfit is orthogonal to everything the weights can reach
    misfit = W @ C.T - V
    reach = torch.linalg.pinv(C.T) @ C.T  # projector onto the reachable target directions
    assert float((misfit @ reach).norm()) <= 1e-8 * float(V.norm())
    # each group of identical rows receives the mean of its targets
    rows, inverse = torch.unique(C, dim=0, return_inverse=True)
    achieved = W @ rows.T
    for g in range(rows.shape[0]):
        members = (inverse == g).nonzero().flatten()
        if len(members) > 1:
            mean = V[:, members].mean(dim=1)
            assert torch.allclose(achieved[:, g], mean, rtol=1e-8, atol=1e-8 * float(V.abs().max()))


@given(problems(), st.booleans())
def test_kkt_stationarity_holds(problem, conflicting):
    """At the optimum (W - W0)(G + ridge I) lies in the row space of C (Lagrange condition)."""
    W0, G, C, V, ridge = problem
    if conflicting:
        C = torch.cat([C, C[:1]])
        V = torch.cat([V, V[:, :1] + 1.0], dim=1)
    W = solve_hard(W0, G, C, V, ridge=ridge)
    A = G + ridge * torch.eye(G.shape[0], dtype=F64)
    gradient = (W - W0) @ A
    scale = float((W - W0).norm() * torch.linalg.matrix_norm(A, 2)) + 1e-300
    assert float((gradient @ row_space_complement(C)).norm()) <= 1e-8 * scale


@given(problems(), st.integers(0, 2**32 - 1))
def test_no_feasible_perturbation_lowers_the_objective(problem, seed):
    """Any change E with E C^T = 0 keeps feasibility and cannot reduce the objective."""
    W0, G, C, V, ridge = problem
    W = solve_hard(W0, G, C, V, ridge=ridge)
    rng = np.random.default_rng(seed)
    E = torch.from_numpy(rng.standard_normal(W.shape)) @ row_space_complement(C)
    assume(float(E.norm()) > 1e-6)
    best = objective(W, W0, G, ridge)
    for step in (1e-3, 1e-1, 1.0):
        tol = 1e-9 * (abs(best) + objective(W + step * E, W, G, ridge) + 1e-300)
        assert objective(W + step * E, W0, G, ridge) >= best - tol


@given(problems())
def test_agrees_with_dense_scipy_kkt_solve(problem):
    """The closed form equals an independent dense KKT solve (scipy, per row)."""
    W0, G, C, V, ridge = problem
    n, d = W0.shape
    s = C.shape[0]
    A = G.numpy() + ridge * np.eye(d)
    kkt = np.block([[2 * A, C.numpy().T], [C.numpy(), np.zeros((s, s))]])
    rhs = np.concatenate([2 * A @ W0.numpy().T, V.numpy().T])
    assume(np.linalg.cond(kkt) < 1e12)
    reference = scipy.linalg.solve(kkt, rhs, assume_a="sym")[:d].T
    W = solve_hard(W0, G, C, V, ridge=ridge).numpy()
    assert np.allclose(W, reference, rtol=1e-7, atol=1e-7 * np.abs(reference).max())


@given(problems(duplicates=True, conflicting=True), st.integers(0, 2**32 - 1), st.booleans())
def test_result_does_not_depend_on_row_order(problem, seed, with_duplicates):
    """Permuting the constraint rows (and V's columns alike) gives the same W."""
    W0, G, C, V, ridge = problem
    if not with_duplicates:
        keep = torch.unique(C, dim=0, return_inverse=True)[1]
        first = sorted({int((keep == u).nonzero()[0]) for u in keep.tolist()})
        C, V = C[first], V[:, first]
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(C.shape[0]))
    W = solve_hard(W0, G, C, V, ridge=ridge)
    W_perm = solve_hard(W0, G, C[perm], V[:, perm], ridge=ridge)
    assert torch.allclose(W, W_perm, rtol=1e-9, atol=1e-9 * float(W.abs().max()))


@given(problems())
def test_concept_already_satisfied_by_base_changes_nothing(problem):
    """If W0 already meets the constraints, the minimal change is no change."""
    W0, G, C, _, ridge = problem
    W = solve_hard(W0, G, C, W0 @ C.T, ridge=ridge)
    assert torch.allclose(W, W0, rtol=0, atol=1e-10 * float(W0.abs().max()))


@given(problems())
def test_single_concept_changes_base_only_as_its_constraints_require(problem):
    """Merging one concept: its outputs are kept and the base moves no more than its own weights."""
    W0, G, C, _, ridge = problem
    rng = np.random.default_rng(int(C.shape[0] * 1000 + W0.shape[1]))
    W_concept = W0 + torch.from_numpy(rng.standard_normal(W0.shape))
    V = W_concept @ C.T
    W = solve_hard(W0, G, C, V, ridge=ridge)
    assert relative_residual(W, C, V) < 1e-10
    mine, theirs = objective(W, W0, G, ridge), objective(W_concept, W0, G, ridge)
    assert mine <= theirs * (1 + 1e-9) + 1e-12


# --------------------------------------------------------------------------- soft constraints


def split_concepts(C, V, sizes):
    bounds = np.cumsum([0, *sizes])
    return ([C[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
            [V[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])])


@given(problems(), st.integers(1, 3))
def test_soft_converges_to_hard_as_weights_grow(problem, concepts):
    """The gap to solve_hard shrinks like 1/weight (mu = 1, same ridge).

    Weights are measured in units of 1 / lambda_min(M), M = C (G + ridge I)^-1 C^T: the soft
    solution is close to the hard one once weight * lambda_min(M) >> 1.
    """
    W0, G, C, V, ridge = problem
    concepts = min(concepts, C.shape[0])
    sizes = [len(part) for part in np.array_split(np.arange(C.shape[0]), concepts)]
    C_list, V_list = split_concepts(C, V, sizes)
    A = G + ridge * torch.eye(G.shape[0], dtype=F64)
    unit = 1.0 / float(torch.linalg.eigvalsh(C @ torch.linalg.solve(A, C.T))[0])
    W_hard, info = solve_hard(W0, G, C, V, ridge=ridge, return_info=True)
    # soft never truncates: compare where hard kept every row and needed no fallback ridge
    assume(info.n_dependent == 0 and info.ridge == ridge)
    errors = []
    for weight in (1e2, 1e4, 1e6):
        W = solve_soft(W0, G, C_list, V_list, [weight * unit] * concepts, 1.0, ridge=ridge)
        errors.append(float((W - W_hard).norm()))
    scale = float((W_hard - W0).norm()) + 1e-300
    assert errors[2] <= 1e-3 * errors[0] + 1e-9 * scale  # 1e4 times the weight, ~1e-4 times the gap


@given(problems(), st.integers(0, 2**32 - 1))
def test_soft_is_stationary_and_order_independent(problem, seed):
    """The gradient of the soft objective vanishes, and concept order does not matter."""
    W0, G, C, V, ridge = problem
    rng = np.random.default_rng(seed)
    concepts = min(3, C.shape[0])
    sizes = [len(p) for p in np.array_split(np.arange(C.shape[0]), concepts)]
    C_list, V_list = split_concepts(C, V, sizes)
    weights = list(10.0 ** rng.uniform(-2, 2, concepts))
    mu = float(10.0 ** rng.uniform(-2, 1))
    W = solve_soft(W0, G, C_list, V_list, weights, mu, ridge=ridge)
    gradient = mu * (W - W0) @ G + ridge * (W - W0)
    for weight, Ci, Vi in zip(weights, C_list, V_list):
        gradient = gradient + weight * (W @ Ci.T - Vi) @ Ci
    size = sum(w * float(Ci.norm()) ** 2 for w, Ci in zip(weights, C_list)) + mu * float(G.norm()) + ridge
    assert float(gradient.norm()) <= 1e-8 * size * (float(W.norm()) + float(V.norm()) + 1)
    C_list, V_list = C_list + [C_list[0]], V_list + [V_list[0] + 1.0]  # a conflicting duplicate concept
    weights.append(weights[0])
    concepts += 1
    order = rng.permutation(concepts)
    W = solve_soft(W0, G, C_list, V_list, weights, mu, ridge=ridge)
    W_perm = solve_soft(W0, G, [C_list[i] for i in order], [V_list[i] for i in order],
                        [weights[i] for i in order], mu, ridge=ridge)
    # equal up to rounding: weights spread over 1e4 and cond(G) up to 1e6 cost a few digits
    assert torch.allclose(W, W_perm, rtol=1e-7, atol=1e-7 * float(W.abs().max()) + 1e-300)


def test_soft_gradient_fusion_limit_is_the_fusion_optimum_closest_to_base():
    """mu = 0 with a tiny ridge: outputs match every concept, change stays in their row space."""
    rng = np.random.default_rng(0)
    n, d = 5, 10
    W0 = torch.from_numpy(rng.standard_normal((n, d)))
    G = torch.eye(d, dtype=F64)
    C_list = [torch.from_numpy(rng.standard_normal((2, d))) for _ in range(3)]
    V_list = [torch.from_numpy(rng.standard_normal((n, 2))) for _ in range(3)]
    W = solve_soft(W0, G, C_list, V_list, [1.0, 1.0, 1.0], 0.0, ridge=1e-10)
    C = torch.cat(C_list)
    assert relative_residual(W, C, torch.cat(V_list, 1)) < 1e-8
    assert float(((W - W0) @ row_space_complement(C)).norm()) < 1e-8


def test_soft_rejects_an_objective_without_unique_minimiser():
    W0 = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="mu = 0 and ridge = 0"):
        solve_soft(W0, torch.eye(3, dtype=F64), [torch.ones(1, 3, dtype=F64)],
                   [torch.ones(2, 1, dtype=F64)], [1.0], 0.0)


# --------------------------------------------------------------------------- hybrid: exact and soft


@st.composite
def hybrid_problems(draw):
    """A merge problem plus 1-3 concepts' context rows P_i (0-4 each, on the features' scale),
    their targets U_i and weights lambda_i spread over 1e-2 .. 1e2."""
    W0, G, C, V, ridge = draw(problems())
    n, d = W0.shape
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = float(torch.linalg.matrix_norm(C, 2))
    P_list, U_list = [], []
    for _ in range(draw(st.integers(1, 3))):
        P = random_matrix(rng, draw(st.integers(0, 4)), d, draw(st.sampled_from([1.0, 10.0, 1e3])), scale)
        P_list.append(P)
        U_list.append(W0 @ P.T + torch.from_numpy(rng.standard_normal((n, P.shape[0]))) * scale)
    weights = list(10.0 ** rng.uniform(-2, 2, len(P_list)))
    return W0, G, C, V, P_list, U_list, weights, ridge


def hybrid_metric(G, P_list, weights, ridge):
    """A = G + sum_i lambda_i P_i^T P_i + ridge I."""
    A = G + ridge * torch.eye(G.shape[0], dtype=F64)
    return A + sum((w * P.T @ P for w, P in zip(weights, P_list)), torch.zeros_like(G))


@given(hybrid_problems())
def test_hybrid_constraints_hold_for_any_feasible_problem(problem):
    """W C^T = V to 1e-10 relative, whatever the context terms pull towards."""
    W0, G, C, V, P_list, U_list, weights, ridge = problem
    W, info = solve_hybrid(W0, G, C, V, P_list, U_list, weights, ridge=ridge, return_info=True)
    assert relative_residual(W, C, V) < 1e-10
    assert info.residual < 1e-10 and info.n_constraints == C.shape[0]


@given(hybrid_problems(), st.booleans())
def test_hybrid_kkt_stationarity_holds(problem, conflicting):
    """At the optimum the objective's gradient (W - W0)(G + ridge I) + sum_i lambda_i (W P_i^T - U_i) P_i
    lies in the row space of C (Lagrange condition), with or without a conflicting duplicate row."""
    W0, G, C, V, P_list, U_list, weights, ridge = problem
    if conflicting:
        C = torch.cat([C, C[:1]])
        V = torch.cat([V, V[:, :1] + 1.0], dim=1)
    W = solve_hybrid(W0, G, C, V, P_list, U_list, weights, ridge=ridge)
    gradient = (W - W0) @ (G + ridge * torch.eye(G.shape[0], dtype=F64))
    for weight, P, U in zip(weights, P_list, U_list):
        gradient = gradient + weight * (W @ P.T - U) @ P
    A = hybrid_metric(G, P_list, weights, ridge)
    size = float(torch.linalg.matrix_norm(A, 2)) * (float((W - W0).norm()) + float(W.norm()))
    size += sum(w * float(P.norm() * U.norm()) for w, P, U in zip(weights, P_list, U_list)) + 1e-300
    assert float((gradient @ row_space_complement(C)).norm()) <= 1e-8 * size


@given(hybrid_problems())
def test_hybrid_agrees_with_dense_scipy_kkt_solve(problem):
    """The closed form equals an independent dense KKT solve of the hybrid objective (scipy)."""
    W0, G, C, V, P_list, U_list, weights, ridge = problem
    d, s = G.shape[0], C.shape[0]
    A = hybrid_metric(G, P_list, weights, ridge).numpy()
    b = W0.numpy() @ (G.numpy() + ridge * np.eye(d))
    for weight, P, U in zip(weights, P_list, U_list):
        b = b + weight * U.numpy() @ P.numpy()
    kkt = np.block([[2 * A, C.numpy().T], [C.numpy(), np.zeros((s, s))]])
    assume(np.linalg.cond(kkt) < 1e12)
    reference = scipy.linalg.solve(kkt, np.concatenate([2 * b.T, V.numpy().T]), assume_a="sym")[:d].T
    W = solve_hybrid(W0, G, C, V, P_list, U_list, weights, ridge=ridge).numpy()
    assert np.allclose(W, reference, rtol=1e-7, atol=1e-7 * np.abs(reference).max())


@given(hybrid_problems())
def test_hybrid_tends_to_solve_hard_as_the_context_weights_vanish(problem):
    """lambda = 0 is solve_hard exactly; lambda -> 0 approaches it (the gap shrinks like lambda)."""
    W0, G, C, V, P_list, U_list, weights, ridge = problem
    W_hard = solve_hard(W0, G, C, V, ridge=ridge)
    W_zero = solve_hybrid(W0, G, C, V, P_list, U_list, [0.0] * len(weights), ridge=ridge)
    assert torch.allclose(W_zero, W_hard, rtol=1e-9, atol=1e-9 * float(W_hard.abs().max()))
    gaps = [float((solve_hybrid(W0, G, C, V, P_list, U_list, [t * w for w in weights], ridge=ridge)
                   - W_hard).norm()) for t in (1e-6, 1e-9)]
    assert gaps[1] <= 1e-2 * gaps[0] + 1e-9 * (float(W_hard.norm()) + 1e-300)


@given(hybrid_problems())
def test_hybrid_without_constraints_is_the_soft_merge_of_the_context_rows(problem):
    """C of no rows: only the caption and context terms remain, solve_soft's objective with mu = 1."""
    W0, G, C, V, P_list, U_list, weights, ridge = problem
    W = solve_hybrid(W0, G, C[:0], V[:, :0], P_list, U_list, weights, ridge=ridge)
    assume(any(P.shape[0] for P in P_list))  # solve_soft needs at least one row to be a soft merge
    W_soft = solve_soft(W0, G, P_list, U_list, weights, 1.0, ridge=ridge)
    assert torch.allclose(W, W_soft, rtol=1e-8, atol=1e-8 * float(W_soft.abs().max()))


@given(hybrid_problems(), st.integers(0, 2**32 - 1))
def test_hybrid_does_not_depend_on_the_order_of_concepts_or_rows(problem, seed):
    """Permuting the concepts (P_i, U_i, lambda_i together) and the constraint rows gives the same W."""
    W0, G, C, V, P_list, U_list, weights, ridge = problem
    rng = np.random.default_rng(seed)
    order, rows = rng.permutation(len(P_list)), torch.from_numpy(rng.permutation(C.shape[0]))
    W = solve_hybrid(W0, G, C, V, P_list, U_list, weights, ridge=ridge)
    W_perm = solve_hybrid(W0, G, C[rows], V[:, rows], [P_list[i] for i in order], [U_list[i] for i in order],
                          [weights[i] for i in order], ridge=ridge)
    assert torch.allclose(W, W_perm, rtol=1e-8, atol=1e-8 * float(W.abs().max()))


def test_hybrid_argument_errors_name_the_problem():
    W0, G = torch.zeros(2, 3, dtype=F64), torch.eye(3, dtype=F64)
    C, V = torch.ones(1, 3, dtype=F64), torch.ones(2, 1, dtype=F64)
    P, U = torch.ones(2, 3, dtype=F64), torch.ones(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="weights has 2 entries for 1 concepts"):
        solve_hybrid(W0, G, C, V, [P], [U], [1.0, 2.0])
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        solve_hybrid(W0, G, C, V, [P], [U], [-1.0])
    with pytest.raises(ValueError, match="P_list has 1 concepts but U_list has 2"):
        solve_hybrid(W0, G, C, V, [P], [U, U], [1.0])
    with pytest.raises(ValueError, match=r"P_list\[0\] columns \(feature dim\) is 4, expected 3"):
        solve_hybrid(W0, G, C, V, [torch.ones(2, 4, dtype=F64)], [U], [1.0])
    with pytest.raises(ValueError, match=r"U_list\[0\] columns \(context rows\) is 1, expected 2"):
        solve_hybrid(W0, G, C, V, [P], [torch.ones(2, 1, dtype=F64)], [1.0])


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_solved_in_float64_and_returned_in_their_dtype(dtype):
    rng = np.random.default_rng(1)
    n, d, s = 64, 16, 5
    W0 = torch.from_numpy(rng.standard_normal((n, d)))
    C_reg = torch.from_numpy(rng.standard_normal((40, d)))
    C = torch.from_numpy(rng.standard_normal((s, d)))
    V = torch.from_numpy(rng.standard_normal((n, s)))
    exact = solve_hard(W0, C_reg.T @ C_reg, C, V)
    low = solve_hard(W0.to(dtype), (C_reg.T @ C_reg).to(dtype), C.to(dtype), V.to(dtype), rtol=1e-9)
    assert low.dtype == dtype
    # the inputs are rounded to dtype; the answer must be as good as that rounding allows
    reference = solve_hard(W0.to(dtype).double(), (C_reg.T @ C_reg).to(dtype).double(),
                           C.to(dtype).double(), V.to(dtype).double(), rtol=1e-9)
    assert torch.equal(low, reference.to(dtype))
    eps = torch.finfo(dtype).eps
    assert float((low.double() - exact).norm() / exact.norm()) < 200 * eps


@given(problems(), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_any_input_dtype_is_solved_in_float64_and_returned_in_its_own(problem, dtype):
    """Weights in low precision: the answer is the float64 answer for those weights, rounded once."""
    W0, G, C, V, ridge = problem
    assume(float(W0.abs().max()) < 1e4 and float(V.abs().max()) < 1e4)
    low = solve_hard(W0.to(dtype), G, C, V.to(dtype), ridge=ridge)
    reference = solve_hard(W0.to(dtype).double(), G, C, V.to(dtype).double(), ridge=ridge)
    assert low.dtype == dtype
    assert torch.equal(low, reference.to(dtype))


@pytest.mark.parametrize("epsilon", [1e-5, 1e-6, 1e-7])
def test_conflicting_near_duplicates_in_float32_features_are_one_row(epsilon):
    """Rows equal to float32 precision with different targets: least squares, not a blow-up."""
    rng = np.random.default_rng(7)
    n, d = 20, 16
    W0 = torch.from_numpy(rng.standard_normal((n, d)))
    C_reg = torch.from_numpy(rng.standard_normal((64, d)))
    C = torch.from_numpy(rng.standard_normal((3, d)))
    C = torch.cat([C, C[:1] * (1 + epsilon * torch.from_numpy(rng.standard_normal(d)))]).float()
    V = W0 @ C.double().T
    V[:, 3] += 1.0  # the near-duplicate wants a different output
    W, info = solve_hard(W0, C_reg.T @ C_reg, C, V, return_info=True)
    assert info.n_dependent == 1 and info.n_conflicting == 1
    assert info.relative_change < 1.0
    achieved = W @ C.double().T
    assert torch.allclose(achieved[:, 0], W0 @ C[0].double() + 0.5, atol=1e-3)


def test_kept_near_duplicates_warn_that_the_weights_may_move_far():
    """Float64 features 1e-6 apart count as distinct rows: met exactly, with a warning."""
    rng = np.random.default_rng(8)
    n, d = 20, 16
    W0 = torch.from_numpy(rng.standard_normal((n, d)))
    C_reg = torch.from_numpy(rng.standard_normal((64, d)))
    C = torch.from_numpy(rng.standard_normal((3, d)))
    C = torch.cat([C, C[:1] + 1e-6 * torch.from_numpy(rng.standard_normal((1, d)))])
    V = W0 @ C.T
    V[:, 3] += 1.0
    with pytest.warns(IllConditionedWarning, match=r"nearly dependent \(cond\(M\) = "):
        W, info = solve_hard(W0, C_reg.T @ C_reg, C, V, return_info=True)
    assert info.rank == 4 and info.relative_change > 100
    assert info.residual < 1e-6


def test_diagnostics_survive_extreme_scales():
    """Norms in the diagnostics neither overflow nor underflow."""
    rng = np.random.default_rng(9)
    W0 = torch.from_numpy(rng.standard_normal((4, 5)))
    C_reg = torch.from_numpy(rng.standard_normal((20, 5)))
    C = torch.from_numpy(rng.standard_normal((2, 5)))
    for scale in (1e-150, 1e250):
        V = torch.from_numpy(rng.standard_normal((4, 2))) * scale
        W, info = solve_hard(W0 * scale, C_reg.T @ C_reg, C, V, return_info=True)
        assert 0 < info.residual < 1e-12 and np.isfinite(info.relative_change)


def test_singular_gram_matrix_warns_and_falls_back_without_nan():
    """Fewer caption tokens than feature dimensions: warned fallback ridge, constraints still hold."""
    rng = np.random.default_rng(2)
    n, d, s = 6, 12, 3
    W0 = torch.from_numpy(rng.standard_normal((n, d)))
    C_reg = torch.from_numpy(rng.standard_normal((4, d)))  # rank 4 < 12
    C = torch.from_numpy(rng.standard_normal((s, d)))
    V = torch.from_numpy(rng.standard_normal((n, s)))
    with pytest.warns(IllConditionedWarning, match=r"numerical rank 4 of 12.*pass ridge > 0"):
        W, info = solve_hard(W0, C_reg.T @ C_reg, C, V, return_info=True)
    assert torch.isfinite(W).all()
    assert info.residual < 1e-10
    assert info.ridge > 0 and info.g_condition > 1e10
    assert "fallback ridge" in info.notes[0]
    with pytest.warns(IllConditionedWarning):
        W_soft = solve_soft(W0, C_reg.T @ C_reg, [C], [V], [1.0], 1.0)
    assert torch.isfinite(W_soft).all()


def test_zero_gram_matrix_still_gives_the_minimum_norm_change():
    d = 4
    W0 = torch.zeros(2, d, dtype=F64)
    C = torch.eye(d, dtype=F64)[:2]
    V = torch.ones(2, 2, dtype=F64)
    with pytest.warns(IllConditionedWarning):
        W = solve_hard(W0, torch.zeros(d, d, dtype=F64), C, V)
    assert torch.allclose(W, torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0]], dtype=F64))


def test_well_conditioned_problem_raises_no_warning():
    rng = np.random.default_rng(3)
    C_reg = torch.from_numpy(rng.standard_normal((50, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve_hard(torch.zeros(3, 8, dtype=F64), C_reg.T @ C_reg,
                   torch.from_numpy(rng.standard_normal((2, 8))), torch.ones(3, 2, dtype=F64))


def test_no_constraints_returns_the_base():
    W0 = torch.randn(3, 4, dtype=F64)
    W, info = solve_hard(W0, torch.eye(4, dtype=F64), torch.zeros(0, 4, dtype=F64),
                         torch.zeros(3, 0, dtype=F64), return_info=True)
    assert torch.equal(W, W0) and info.n_constraints == 0 and info.rank == 0


def test_inputs_are_not_modified():
    rng = np.random.default_rng(4)
    args = [torch.from_numpy(rng.standard_normal(shape)) for shape in ((5, 6), (6, 6), (2, 6), (5, 2))]
    args[1] = args[1] @ args[1].T
    copies = [a.clone() for a in args]
    solve_hard(*args, ridge=0.1)
    solve_soft(args[0], args[1], [args[2]], [args[3]], [2.0], 0.5)
    assert all(torch.equal(a, b) for a, b in zip(args, copies))


def test_rows_are_streamed_in_chunks_with_identical_results(monkeypatch):
    """Chunking the rows is an implementation detail: same answer for any chunk size."""
    from mergekit_cd.solvers import _common

    rng = np.random.default_rng(5)
    W0 = torch.from_numpy(rng.standard_normal((50, 6)))
    C_reg = torch.from_numpy(rng.standard_normal((20, 6)))
    C = torch.from_numpy(rng.standard_normal((3, 6)))
    V = torch.from_numpy(rng.standard_normal((50, 3)))
    whole = solve_hard(W0, C_reg.T @ C_reg, C, V)
    monkeypatch.setattr(_common, "CHUNK_ELEMENTS", 7)
    assert torch.allclose(solve_hard(W0, C_reg.T @ C_reg, C, V), whole, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(G=torch.eye(5, dtype=F64)), "G rows is 5, expected 4"),
        (lambda a: a.update(C=torch.ones(2, 3, dtype=F64)), r"C columns \(feature dim\) is 3, expected 4"),
        (lambda a: a.update(V=torch.ones(3, 3, dtype=F64)), r"V columns \(constraint rows\) is 3, expected 2"),
        (lambda a: a["C"].__setitem__((0, 0), float("nan")), "C contains NaN or infinite values"),
        (lambda a: a.update(W0=torch.ones(3, 4, dtype=torch.int64)), "W0 must be a floating-point tensor"),
        (lambda a: a.update(W0=torch.ones(3, 4, 1, dtype=F64)), "W0 must have 2 dimensions"),
        (lambda a: a.update(ridge=-1.0), "ridge must be a finite number >= 0"),
        (lambda a: a.update(rtol=float("nan")), r"rtol must be in \[0, 1\)"),
        (lambda a: a.update(G=-torch.eye(4, dtype=F64)), "positive semi-definite"),
    ],
)
def test_bad_arguments_are_rejected_with_a_message(change, message):
    args = dict(W0=torch.ones(3, 4, dtype=F64), G=torch.eye(4, dtype=F64),
                C=torch.ones(2, 4, dtype=F64), V=torch.ones(3, 2, dtype=F64), ridge=0.0, rtol=None)
    change(args)
    with pytest.raises((ValueError, TypeError), match=message):
        solve_hard(args["W0"], args["G"], args["C"], args["V"], ridge=args["ridge"], rtol=args["rtol"])


def test_soft_argument_errors_name_the_problem():
    W0, G = torch.zeros(2, 3, dtype=F64), torch.eye(3, dtype=F64)
    C, V = torch.ones(1, 3, dtype=F64), torch.ones(2, 1, dtype=F64)
    with pytest.raises(ValueError, match="weights has 2 entries for 1 concepts"):
        solve_soft(W0, G, [C], [V], [1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="weights must be finite and > 0"):
        solve_soft(W0, G, [C], [V], [0.0], 1.0)
    with pytest.raises(ValueError, match="C_list has 1 concepts but V_list has 2"):
        solve_soft(W0, G, [C], [V, V], [1.0], 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_stay_on_the_device_and_match_cpu():
    rng = np.random.default_rng(6)
    W0 = torch.from_numpy(rng.standard_normal((300, 32))).float()
    C_reg = torch.from_numpy(rng.standard_normal((100, 32)))
    G = C_reg.T @ C_reg
    C = torch.from_numpy(rng.standard_normal((6, 32)))
    V = torch.from_numpy(rng.standard_normal((300, 6))).float()
    cpu = solve_hard(W0, G, C, V)
    gpu, info = solve_hard(W0.cuda(), G.cuda(), C.cuda(), V.cuda(), return_info=True)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
    soft = solve_soft(W0.cuda(), G.cuda(), [C.cuda()], [V.cuda()], [10.0], 1.0)
    assert soft.device.type == "cuda"
