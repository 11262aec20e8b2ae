"""The quality benchmark end to end on the shipped world, shrunk to seconds: it trains, merges,
samples and scores, and writes its table, JSON, plot and grids; and it samples with DPM-Solver++."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from mergekit_cd.toyworld import benchmark


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("bench_quality")


def _tiny(self: benchmark.BenchmarkOptions) -> benchmark.BenchmarkOptions:
    """The quick run, shrunk: two training steps, one image per prompt of two denoising steps."""
    return replace(self, pairs=self.pairs[:1], train_steps=2, num_class_images=2, class_sampling_steps=2,
                   images_per_prompt=1, sampling_steps=2, methods=("constrained", "sum"))


@pytest.mark.slow
def test_quick_run_trains_merges_scores_and_writes_everything(bench, tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.setenv("MERGEKIT_CD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(benchmark.BenchmarkOptions, "quick", _tiny)
    assert bench.main(["--quick", "--work", str(tmp_path / "work")]) == 0
    out = tmp_path / "work" / "results-quick"
    lines = (out / "quality.md").read_text().splitlines()
    rows = {line.split("|")[1].strip(): line for line in lines[2:]}
    assert list(rows) == ["base", "single", "joint", "constrained", "sum"]
    assert "n/a" not in rows["constrained"]  # every column measured, cd-eval's included
    assert rows["base"].count("n/a") == 2  # cd-eval has no row for the plain base
    counts = json.loads((out / "quality.json").read_text())["pairs"][0]["counts"]
    # one image per prompt: each concept's 3 prompts and its companion prompt, 3 pair prompts, 8 ordinary
    assert counts["constrained"]["presence0"][1] == counts["constrained"]["presence1"][1] == 4
    assert (counts["constrained"]["both"][1], counts["constrained"]["ordinary"][1]) == (3, 8)
    assert counts["single"]["ordinary"][1] == 16 and "both" not in counts["single"]  # both singles pooled
    grid = Image.open(out / f"grid-{'+'.join(benchmark.PAIRS[0])}.png")
    assert grid.width > 5 * 32 * 3 and grid.height > 5 * 32 * 3  # 5 columns, 5 models, upscaled
    assert Image.open(out / "quality.png").width > 500
    assert "1 pairs in" in capsys.readouterr().out


def test_the_benchmark_samples_with_dpm_solver_and_can_keep_the_base_sampler():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    assert isinstance(benchmark.sampling_pipeline().scheduler, DPMSolverMultistepScheduler)
    assert isinstance(benchmark.sampling_pipeline(dpm_solver=False).scheduler, DDIMScheduler)
