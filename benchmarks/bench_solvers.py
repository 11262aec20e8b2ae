"""Speed and accuracy of ``solve_hard`` against a baseline written like the authors' merge script.

Shapes are the real ones (random weights): SD1.5 (16 cross-attention layers, 12480 x 2 rows,
d = 768), SD2 (d = 1024) and SDXL (70 layers, 83200 x 2 rows, d = 2048), with 2, 10 and 100
concepts of 6 constraint rows each (two target prompts, three token rows per prompt).

The baseline does per layer what the authors' script does: float32, an LU factorisation of G,
one LU solve per constraint row, an explicit inverse of M. Its cost is the same for every
layer of one shape, so it is timed on a few layers per shape (``--baseline-layers``) and scaled
by the layer count; the table says how many were timed. Both solvers get the same G, C, V and
the residual ``max ||W_l C^T - V_l|| / ||V_l||`` is measured, in float64, on those same layers.

Run: ``python benchmarks/bench_solvers.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time

import torch

from mergekit_cd.solvers import solve_hard

ARCHITECTURES = {  # name: (context dim, output dims of the cross-attention layers)
    "SD1.5": (768, [320] * 5 + [640] * 5 + [1280] * 6),
    "SD2": (1024, [320] * 5 + [640] * 5 + [1280] * 6),
    "SDXL": (2048, [640] * 10 + [1280] * 60),
}
ROWS_PER_CONCEPT = 6


def features(rows: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """Random token features whose scales spread over 1e3, so cond(G) is about 1e6 as for CLIP."""
    scales = torch.logspace(0, -3, d, dtype=torch.float64)
    return torch.randn(rows, d, generator=generator, dtype=torch.float64) * scales


def baseline_layer(W0: torch.Tensor, G: torch.Tensor, C: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """One layer the authors' way: float32, LU per constraint row, explicit inverse of M."""
    lu, pivots = torch.linalg.lu_factor(G)
    d = torch.cat([torch.linalg.lu_solve(lu, pivots, C[i].reshape(-1, 1)).T for i in range(C.shape[0])])
    M_inverse = torch.linalg.inv(d @ C.T)
    return W0 + (V - W0 @ C.T) @ M_inverse @ d


def relative_residual(W: torch.Tensor, C: torch.Tensor, V: torch.Tensor) -> float:
    return float((W.double() @ C.T - V.double()).norm() / V.double().norm())


def run(name: str, concepts: int, per_shape: int, seed: int) -> dict:
    d, outs = ARCHITECTURES[name]
    g = torch.Generator().manual_seed(seed)
    sizes = [o for o in outs for _ in ("to_k", "to_v")]
    n = sum(sizes)
    W0 = torch.randn(n, d, generator=g) * d**-0.5
    C_reg = features(4 * d, d, g)
    G = C_reg.T @ C_reg
    C = features(concepts * ROWS_PER_CONCEPT, d, g)
    typical = float((W0[:64].double() @ C.T).std())  # targets of the size real outputs have
    V = (torch.randn(n, C.shape[0], generator=g, dtype=torch.float64) * typical).float()

    start = time.perf_counter()
    W = solve_hard(W0, G, C, V)
    ours = time.perf_counter() - start

    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    by_shape: dict[int, list[int]] = {}
    for index, size in enumerate(sizes):
        by_shape.setdefault(size, []).append(index)
    G32, C32 = G.float(), C.float()
    baseline = 0.0
    timed = 0
    residual_ours = residual_base = 0.0
    for size, members in by_shape.items():
        sample = members[:per_shape] if per_shape > 0 else members
        elapsed = 0.0
        for index in sample:
            rows = slice(offsets[index], offsets[index + 1])
            start = time.perf_counter()
            W_base = baseline_layer(W0[rows], G32, C32, V[rows])
            elapsed += time.perf_counter() - start
            residual_base = max(residual_base, relative_residual(W_base, C, V[rows]))
            residual_ours = max(residual_ours, relative_residual(W[rows], C, V[rows]))
        baseline += elapsed / len(sample) * len(members)
        timed += len(sample)
    return dict(name=name, concepts=concepts, rows=C.shape[0], matrices=len(sizes), timed=timed,
                ours=ours, baseline=baseline, residual_ours=residual_ours, residual_base=residual_base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-layers", type=int, default=3,
                        help="layers per distinct shape the baseline is timed on and scaled from "
                             "(default 3; 0 = time every layer, slow for SDXL)")
    parser.add_argument("--concepts", type=int, nargs="+", default=[2, 10, 100])
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sampled = "every layer" if args.baseline_layers <= 0 else \
        f"{args.baseline_layers} layers per shape, scaled by the layer count (extrapolated)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ours: float64 inside, float32 in/out, "
          f"whole model; baseline: float32 per layer, timed on {sampled}")
    header = (f"{'model':6} {'concepts':>8} {'rows':>5} {'matrices':>9} {'speedup':>8} "
              f"{'ours/base time':>15} {'residual ours':>14} {'residual base':>14}")
    print(header)
    print("-" * len(header))
    for name in args.architectures:
        for concepts in args.concepts:
            r = run(name, concepts, args.baseline_layers, args.seed)
            print(f"{r['name']:6} {r['concepts']:>8} {r['rows']:>5} {r['timed']:>4}/{r['matrices']:<4} "
                  f"{r['baseline'] / r['ours']:>7.1f}x {r['ours'] / r['baseline']:>15.3f} "
                  f"{r['residual_ours']:>14.1e} {r['residual_base']:>14.1e}", flush=True)


if __name__ == "__main__":
    main()
