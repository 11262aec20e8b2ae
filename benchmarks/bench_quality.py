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
    """Each model's concept presence and both-present rate against its preservation of ordinary
    prompts, with 95% intervals; one marker per model, named in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(11, 5), dpi=100, sharex=True)
    markers, colours = "osD^vP*Xhp<>d8H", plt.get_cmap("tab20").colors
    for index, (label, row) in enumerate(table.items()):
        if "preservation" not in row:
            continue
        kept = row["preservation"]
        for axes, key in zip(panels, ("presence", "both")):
            if key not in row:
                continue
            value = row[key]
            axes.errorbar(kept.value, value.value, xerr=[[kept.value - kept.low], [kept.high - kept.value]],
                          yerr=[[value.value - value.low], [value.high - value.value]], fmt=markers[index % 15],
                          color=colours[index % 20], capsize=2, alpha=0.8, label=label)
    for axes, title in zip(panels, ("each concept on its own prompts", "both concepts on two-concept prompts")):
        axes.set_ylabel("share of images showing it (detector)")
        axes.set_title(title, fontsize=10)
        axes.grid(alpha=0.3)
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=8)
    figure.supxlabel("preservation: ordinary prompts followed, relative to the base", x=0.4)
    figure.suptitle("Merging two toy-world concepts, pooled over the pairs (95% intervals)")
    figure.tight_layout(rect=(0, 0, 0.8, 1))
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
          f"{options.train_steps} training steps, {options.images_per_prompt} images per prompt, "
          f"{options.sampling_steps} DPM-Solver++ steps", flush=True)
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
