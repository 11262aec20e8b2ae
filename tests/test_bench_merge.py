"""The full-size benchmark's two jobs, on the tiny model: ours and the authors'-style baseline
solve the same merge (so the benchmark compares like with like), and its table row renders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergekit_cd.base import open_base
from mergekit_cd.loading import save
from mergekit_cd.testing import random_concept_deltas


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("bench_merge")


def test_ours_and_the_baseline_compute_the_same_merge(bench, tiny_pipeline_path, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_CD_CACHE", str(tmp_path / "cache"))
    folder = tiny_pipeline_path("sd1")
    base = open_base(folder)
    specs = [(f"<new{i + 1}>", bench.CLASS_WORDS[i]) for i in range(3)]
    inputs = []
    for i, delta in enumerate(random_concept_deltas(base, specs, seed=5)):
        (tmp_path / f"{i}").mkdir()
        inputs.append(str(save(delta, tmp_path / f"{i}" / "delta.bin", format="authors-bin", base=base)))
    ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.bin")
    bench.job_ours(str(folder), ours, str(tmp_path / "gram"), "200", *inputs)
    bench.job_baseline(str(folder), theirs, "200", *inputs)
    # float32 per-layer solves against float64 ones, at cond(G) ~ 1e7 on the tiny model
    assert bench.difference(folder, ours, theirs) < 0.01  # measured 0.2%
    # as a full run measures it: in a child, so that the measuring process stays small
    assert bench.in_child_difference(folder, ours, theirs) == bench.difference(folder, ours, theirs)
    assert bench.difference(folder, ours, inputs[0]) > 0.05  # a different delta is told apart


@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_the_floor_job_reads_encodes_solves_and_writes(bench, tiny_pipeline_path, tmp_path, architecture):
    from safetensors.torch import load_file

    folder = tiny_pipeline_path(architecture)
    base = open_base(folder)
    inputs = [str(save(delta, tmp_path / f"{i}.safetensors", base=base))
              for i, delta in enumerate(random_concept_deltas(base, [("<new1>", "cat"), ("<new2>", "dog")], seed=5))]
    output = tmp_path / "floor.safetensors"  # the cached run reads the Gram matrix the cold one kept beside it
    for cold in ("1", "0"):
        bench.job_floor(str(folder), str(output), "20", cold, *inputs)
        assert (tmp_path / "floor.gram.safetensors").is_file()
        written = load_file(output)
        assert set(written) == set(base.layer_names())
        assert all(written[name].shape[1] == base.context_dim for name in written)


def test_a_row_prints_ours_against_the_floor_and_the_baseline(bench):
    run = lambda seconds, peak=1.0: {"seconds": seconds, "cpu": seconds / 2, "peak_gib": peak,  # noqa: E731
                                     "residual": 1e-7}
    row = {"scenario": "sd15", "concepts": 3, "captions": 200, "input_gib": 0.2, "cold": run(30), "cached": run(10),
           "floor": {"cold": run(20), "cached": run(5)}, "baseline": run(90, 2.0), "ours_residual": 1e-15,
           "difference": 1e-3}
    cells = [cell.strip() for cell in bench.describe(row).strip("|").split("|")]
    assert cells[4:10] == ["30 / 10", "20 / 5", "1.5x / 2.0x", "1.5x / 2.0x", "1.00", "90"]
    assert cells[10:12] == ["3.0x / 9.0x"] * 2
    assert len(cells) == bench.HEADER.splitlines()[0].count("|") - 1


def test_the_quick_run_on_tiny_models_prints_ours_the_floor_and_the_baseline(tmp_path):
    """``--quick --tiny``: the script as a user runs it, end to end (build, every job in a child,
    the table), on the tiny models; what it prints, not how fast."""
    script = Path(__file__).parent.parent / "benchmarks" / "bench_merge.py"
    environment = {**os.environ, "MERGEKIT_CD_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(script), "--quick", "--tiny", "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| scenario"))
    [row] = [line for line in lines[header + 2:] if line.startswith("|")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:3] == ["sd15", "3", "50"] and len(cells) == lines[header].count("|") - 1
    assert all(part.endswith("x") for cell in (cells[6], cells[7], cells[10], cells[11]) for part in cell.split(" / "))
    assert float(cells[13]) < 1e-5  # ours: the residual cd-merge printed, as written
    assert (tmp_path / "work" / "base-sd15-tiny" / "model_index.json").is_file()
    for extra in (["--only", "sdxl"], ["--captions", "200"], ["--quik"]):  # refused, not silently overridden
        refused = subprocess.run([sys.executable, str(script), "--quick", *extra], capture_output=True, text=True)
        assert refused.returncode == 2
        assert refused.stderr.splitlines()[-1].endswith(
            "error: unrecognized arguments: --quik" if extra == ["--quik"] else
            "error: --quick runs the sd15 scenario alone with 50 captions; leave out --only and --captions")
