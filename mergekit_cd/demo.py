"""``make demo``: the main job on a built-in example, offline, in well under a minute on a CPU.

1. Builds a tiny SD1-like base model (random weights, see :mod:`mergekit_cd.testing`) and three
   stand-in concepts, saved in three of the formats people share (our native file, the
   diffusers training layout, the authors' ``delta.bin``).
2. Runs ``cd-merge`` on them (the paper's objective, then with a small ridge, written in the
   diffusers layout) and ``cd-inspect`` on the result.
3. Shows the same solver at SD1.5 size (random weights, real shapes): what the constrained
   merge, the soft merge and the naive sum keep of each concept and how far they drift.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import torch

from .solvers import solve_hard, solve_soft

OUTPUT = Path("demo-output")
OUT_DIMS = [320] * 5 + [640] * 5 + [1280] * 6  # SD1.5 cross-attention layers
CONTEXT = 768
ROWS_PER_CONCEPT = 6  # two target prompts, three token rows each


def run_command(main, arguments: list[str]) -> None:
    print(f"\n$ {shlex.join(arguments)}", flush=True)
    code = main(arguments[1:])
    if code:
        sys.exit(code)


def tiny_merge() -> None:
    """Build inputs in three formats and merge them with the real command."""
    from .base import open_base
    from .cli.inspect import main as cd_inspect
    from .cli.merge import main as cd_merge
    from .loading import save
    from .testing import random_concept_delta, save_tiny_pipeline

    OUTPUT.mkdir(exist_ok=True)
    base_path = OUTPUT / "tiny-sd1"
    if not base_path.exists():
        save_tiny_pipeline("sd1", base_path)
    base = open_base(base_path)
    inputs = []
    for seed, (token, word, fmt, name) in enumerate([("<new1>", "cat", "native", "cat.safetensors"),
                                                     ("<new1>", "teapot", "diffusers", "teapot"),
                                                     ("<new3>", "barn", "authors-bin", "barn-delta.bin")]):
        path = OUTPUT / name
        save(random_concept_delta(base, token, word, seed=seed), path, format=fmt, base=base, force=True)
        inputs.append(str(path))
    print(f"Base: {base_path} (tiny SD1-like model). Concepts: {', '.join(inputs)} "
          f"(native, diffusers layout, the authors' delta.bin; two both call their token <new1>).")
    merged = str(OUTPUT / "merged.safetensors")
    classes = ["--class", "cat", "--class", "teapot", "--class", "barn"]
    run_command(cd_merge, ["cd-merge", *inputs, "-o", merged, "--base", str(base_path), *classes, "--force", "-q"])
    print("\nThe paper's objective lets weights move freely in feature directions the captions rarely use. "
          "A small ridge keeps them close at almost no cost in drift:")
    run_command(cd_merge, ["cd-merge", *inputs, "-o", str(OUTPUT / "merged-ridge"), "--base", str(base_path),
                           *classes, "--relative-ridge", "1e-3", "--force", "-q"])
    run_command(cd_inspect, ["cd-inspect", merged])


def features(rows: int, generator: torch.Generator) -> torch.Tensor:
    scales = torch.logspace(0, -3, CONTEXT, dtype=torch.float64)
    return torch.randn(rows, CONTEXT, generator=generator, dtype=torch.float64) * scales


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def full_size_solver(seed: int = 0, concepts: int = 3) -> None:
    """The solvers on SD1.5-shaped random weights with CLIP-like feature scales."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * sum(OUT_DIMS)
    W0 = torch.randn(n, CONTEXT, generator=g, dtype=torch.float64) * CONTEXT**-0.5
    reg = features(2400, g)  # ~200 captions x 12 tokens
    held_out = features(600, g)
    targets = [features(ROWS_PER_CONCEPT, g) for _ in range(concepts)]
    tuned = []
    for C in targets:  # each concept: a rank-4 change aimed at its own tokens, 1% of |W0|
        direction = torch.randn(4, CONTEXT, generator=g, dtype=torch.float64) + C[:4] / C[:4].norm()
        update = torch.randn(n, 4, generator=g, dtype=torch.float64) @ direction
        tuned.append(W0 + update * (0.01 * float(W0.norm()) / float(update.norm())))
    G = reg.T @ reg
    V_list = [W @ C.T for W, C in zip(tuned, targets)]

    print(f"\nAt SD1.5 size: {concepts} synthetic concepts, {n} weight rows x {CONTEXT} features, "
          f"{reg.shape[0]} regularisation token rows, {held_out.shape[0]} held-out token rows.")
    start = time.perf_counter()
    W_hard, info = solve_hard(W0, G, torch.cat(targets), torch.cat(V_list, dim=1), return_info=True)
    hard_time = time.perf_counter() - start
    W_soft = solve_soft(W0, G, targets, V_list, [1e3] * concepts, 1.0)
    W_sum = W0 + sum(W - W0 for W in tuned)
    base_out = W0 @ held_out.T
    print(f"{'method':26} {'worst concept error':>20} {'held-out drift':>15}")
    for name, W in [("constrained (solve_hard)", W_hard), ("soft (weights 1e3, mu 1)", W_soft),
                    ("naive sum of deltas", W_sum)]:
        worst = max(relative(W @ C.T, V) for C, V in zip(targets, V_list))
        print(f"{name:26} {worst:>20.2e} {relative(W @ held_out.T, base_out):>15.2e}")
    print(f"constrained solve: {hard_time:.2f} s, rank {info.rank}/{info.n_constraints}, "
          f"cond(G) {info.g_condition:.1e}, cond(M) {info.m_condition:.1e}, residual {info.residual:.1e}")


def main() -> None:
    from .cli._common import quiet_libraries

    with quiet_libraries():
        tiny_merge()
    full_size_solver()
    print("\nconcept error / residual: relative change of a concept's K/V outputs on its own target "
          "tokens (0 = kept exactly).\nheld-out drift: relative change of all K/V outputs on captions "
          f"the merge never saw (0 = base behaviour kept).\nFiles are in {OUTPUT.resolve()}.")


if __name__ == "__main__":
    main()
