"""Merge quality on the toy world: what each merge of two concepts shows, judged by the detector.

    python benchmarks/bench_quality.py            # the full run: 5 pairs
    python benchmarks/bench_quality.py --quick    # the first pair, fewer class images, images and merges

Trains every concept alone and each pair jointly on ``builtin:toyworld`` (reused from
``--work`` when already there), merges each pair with the constrained merge (plain and with
``relative-ridge=1e-3``), the soft merge (w = 10, 100), both on pipeline rows too, the hybrid
(lambda = 10, 100, 1000), the sum and the average, samples a fixed
seeded prompt set per model and prints one table pooled over the pairs, with 95% intervals.
Writes ``quality.json``, ``quality.md``, a plot and one labelled image grid per pair to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from mergekit_cd.toyworld import benchmark


def plot(table: dict, path: Path) -> None:
    """Both-present rate against preservation of ordinary prompts, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5), dpi=110)
    for label, row in table.items():
        if "both" not in row or "preservation" not in row:
            continue
        both, kept = row["both"], row["preservation"]
        axes.errorbar(kept.value, both.value, xerr=[[kept.value - kept.low], [kept.high - kept.value]],
                      yerr=[[both.value - both.low], [both.high - both.value]], fmt="o", capsize=3)
        axes.annotate(label, (kept.value, both.value), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.set_xlabel("preservation: ordinary prompts followed, relative to the base")
    axes.set_ylabel("both concepts present (two-concept prompts)")
    axes.set_title("Merging two toy-world concepts (95% intervals)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the first pair only, fewer class images, sampled images and merges (< 5 min)")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/quality"),
                        help="trained concepts and caches, reused between runs (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: WORK/results[-quick])")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fidelity", action="store_true", help="skip cd-eval's fidelity columns")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    options = benchmark.BenchmarkOptions(work=args.work, seed=args.seed, fidelity=not args.no_fidelity)
    if args.quick:
        options = options.quick()
    out = args.out or args.work / ("results-quick" if args.quick else "results")
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.platform()}, "
          f"{os.cpu_count()} CPUs; {len(options.pairs)} pair(s), "
          f"{options.train_steps} training steps, {options.images_per_prompt} images per prompt", flush=True)
    started = time.perf_counter()
    results = benchmark.run(options, log=lambda message: print(message, flush=True))
    table = benchmark.pooled(results)
    markdown = benchmark.format_table(table)
    print("\n" + markdown)
    elapsed = time.perf_counter() - started
    print(f"\n{len(results)} pairs in {elapsed / 60:.1f} min")
    (out / "quality.md").write_text(markdown + "\n")
    (out / "quality.json").write_text(benchmark.to_json(options, results, table) + "\n")
    plot(table, out / "quality.png")
    for result in results:
        result.grid.save(out / f"grid-{'+'.join(result.pair)}.png")
    print(f"wrote {out}/quality.md, quality.json, quality.png and the grids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
