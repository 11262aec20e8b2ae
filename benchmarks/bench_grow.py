"""Adding one concept to a merge of many: from the merge's stored statistics against redoing it.

Builds a base (``--size tiny``: the tiny SD1 model of :mod:`mergekit_cd.testing`; ``sd15``: SD1.5's
real shapes with random weights, :func:`~mergekit_cd.testing.save_full_size_base`) and
``--concepts`` + 1 random concepts as native files under ``--work``, merges the first ``--concepts``
into ``merged.safetensors`` (untimed; it fills the feature and Gram caches), encodes the new
concept's prompts once (untimed), then times, in this process and with every cache warm:

- grow: ``cd-merge merged.safetensors new.safetensors -o grown.safetensors``;
- redo: ``cd-merge <all the concepts' files> new.safetensors -o redone.safetensors``;
- drop: ``cd-merge grown.safetensors --drop <new>`` (no input file, no text encoder);

and prints both times, their ratio, the relative difference of grown and redone weights (they
are the same merge), and the statistics' size against the difference's.

Run: ``python benchmarks/bench_grow.py [--size tiny|sd15] [--concepts 100] [--captions 200]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

CLASS_WORDS = ("cat", "dog", "pot", "chair", "car", "tree", "house", "flower", "guitar", "watch")


def build(work: Path, size: str, count: int) -> tuple[Path, list[Path]]:
    """The base folder and ``count`` concept files (tokens ``<new1>`` ... ``<new{count}>``)."""
    from mergekit_cd.base import open_base
    from mergekit_cd.loading import save
    from mergekit_cd.testing import random_concept_deltas, save_full_size_base, save_tiny_pipeline

    base_dir = work / f"base-{size}"
    if not (base_dir / "model_index.json").is_file():
        print(f"building the {size} base ...", flush=True)
        if size == "tiny":
            save_tiny_pipeline("sd1", base_dir)
        else:
            save_full_size_base("sd15", base_dir)
    files = [work / f"concepts-{size}" / f"{i:03d}.safetensors" for i in range(count)]
    missing = [i for i, file in enumerate(files) if not file.is_file()]
    if missing:
        print(f"making {len(missing)} concepts ...", flush=True)
        base = open_base(base_dir)
        for start in range(0, len(missing), 10):
            chunk = missing[start:start + 10]
            specs = [(f"<new{i + 1}>", CLASS_WORDS[i % len(CLASS_WORDS)]) for i in chunk]
            for i, delta in zip(chunk, random_concept_deltas(base, specs, seed=1000 + chunk[0])):
                files[i].parent.mkdir(parents=True, exist_ok=True)
                save(delta, files[i], base=base, force=True)
    return base_dir, files


def timed(what: str, inputs: list[Path], output: Path, base: Path, captions: list[str], cache: Path,
          **arguments) -> tuple[float, object]:
    """Seconds of one merge into ``output`` (as cd-merge runs it), and its report."""
    from mergekit_cd.merge import merge_to_file

    start = time.perf_counter()
    report = merge_to_file([str(path) for path in inputs], output, captions, base=str(base), force=True,
                           cache_dir=cache, **arguments)
    seconds = time.perf_counter() - start
    print(f"{what}: {seconds:.2f} s", flush=True)
    return seconds, report


def relative_difference(a: Path, b: Path) -> float:
    from mergekit_cd.loading import load

    x, y = load(a), load(b)
    error = sum(float((x.layers[n].rows().double() - y.layers[n].rows().double()).square().sum()) for n in y.layers)
    norm = sum(float(y.layers[n].rows().double().square().sum()) for n in y.layers)
    return (error / norm) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--concepts", type=int, default=100, help="concepts of the merge grown by one (default 100)")
    parser.add_argument("--captions", type=int, default=200, help="shipped regularisation captions (default 200)")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # token renames and the tiny base's ill-conditioned G, every run alike

    from mergekit_cd.captions import default_reg_captions
    from mergekit_cd.merge import merge_to_file

    work = args.work / "grow"
    base, files = build(work, args.size, args.concepts + 1)
    old, new = files[:-1], files[-1]
    captions = default_reg_captions()[: args.captions]
    cache = work / f"cache-{args.size}"
    merged, grown, redone = (work / f"{name}.safetensors" for name in ("merged", "grown", "redone"))
    print(f"merging {len(old)} concepts (untimed; fills the caches) ...", flush=True)
    merge_to_file([str(f) for f in old], merged, captions, base=str(base), force=True, cache_dir=cache)
    merge_to_file([str(new)], work / "new-alone.safetensors", captions, base=str(base), force=True, cache_dir=cache)
    grow_seconds, report = timed(f"grow: {len(old)} concepts + 1 from the statistics", [merged, new], grown, base,
                                 captions, cache)
    redo_seconds, _ = timed(f"redo: {len(files)} concepts from their files", files, redone, base, captions, cache)
    drop_seconds, _ = timed("drop: one concept out of the grown merge", [grown], work / "dropped.safetensors", base,
                            captions, cache, drop=[report.concepts[-1].token])
    size = report.statistics
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, size {args.size}, "
          f"{args.captions} captions")
    ratio = redo_seconds / grow_seconds
    print(f"grow {grow_seconds:.2f} s, redo {redo_seconds:.2f} s: adding one concept to a {len(old)}-concept merge is "
          + (f"{ratio:.1f}x faster than" if ratio >= 1 else f"{1 / ratio:.1f}x slower than")
          + f" redoing it; dropping one takes {drop_seconds:.2f} s")
    print(f"grown vs redone: relative difference {relative_difference(grown, redone):.1e}")
    print(f"statistics: {size.statistics_bytes / 2**20:.1f} MiB for {size.concepts} concepts beside the "
          f"{size.delta_bytes / 2**20:.1f} MiB difference ({size.statistics_bytes / size.delta_bytes:.2f}x)")


if __name__ == "__main__":
    main()
