"""The full-size benchmark's two jobs, on the tiny model: ours and the authors'-style baseline
solve the same merge (so the benchmark compares like with like), and its table row renders."""

from __future__ import annotations


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
    for cold in ("1", "0"):
        output = tmp_path / f"floor-{cold}.safetensors"
        bench.job_floor(str(folder), str(output), "20", cold, *inputs)
        written = load_file(output)
        assert set(written) == set(base.layer_names())
        assert all(written[name].shape[1] == base.context_dim for name in written)


def test_a_row_prints_ours_against_the_floor_and_the_baseline(bench):
    run = lambda seconds, peak=1.0: {"seconds": seconds, "peak_gib": peak, "residual": 1e-7}  # noqa: E731
    row = {"scenario": "sd15", "concepts": 3, "captions": 200, "input_gib": 0.2, "cold": run(30), "cached": run(10),
           "floor": {"cold": run(20), "cached": run(5)}, "baseline": run(90, 2.0), "ours_residual": 1e-15,
           "difference": 1e-3}
    cells = [cell.strip() for cell in bench.describe(row).strip("|").split("|")]
    assert cells[4:8] == ["30 / 10", "1.5x / 2.0x", "1.00", "90"] and cells[8] == "3.0x / 9.0x"
    assert len(cells) == bench.HEADER.splitlines()[0].count("|") - 1
