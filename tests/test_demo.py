"""`make demo` runs mergekit_cd.demo: it must keep working, offline, and say what it did."""

from __future__ import annotations

import json
import re

from mergekit_cd import demo


def test_demo_trains_merges_samples_and_evaluates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MERGEKIT_CD_CACHE", str(tmp_path / "cache"))
    demo.main()
    out = capsys.readouterr().out
    for command in ("$ cd-train", "$ cd-merge", "$ cd-sample", "$ cd-eval"):
        assert command in out
    assert "held-out drift" in out and "naive sum" in out
    output = tmp_path / "demo-output"
    for name in ("toy/delta.safetensors", "pot/diffusers", "merged.safetensors", "naive-sum.safetensors",
                 "grid.png", "eval.json", "eval.png"):
        assert (output / name).exists(), name
    rows = {row["label"]: row for row in json.loads((output / "eval.json").read_text())["rows"]}
    # the constrained merge (the --merged row) meets its constraints, keeps both concepts and changes
    # the base less than the naive sum and the average; an average in its place would fail here
    assert rows["merged"]["max_residual"] < 1e-6 < 1e-3 < rows["sum"]["max_residual"]
    assert rows["merged"]["mean_fidelity"] > rows["sum"]["mean_fidelity"]
    assert rows["merged"]["preservation"] < rows["sum"]["preservation"]
    assert rows["merged"]["preservation"] < rows["average"]["preservation"]
    drift = re.search(r"held-out drift: ([\d.e+-]+) \(naive sum: ([\d.e+-]+)\)", out)
    assert drift and float(drift[1]) < float(drift[2]), out
    assert re.search(r"K/V changes have cosine -?[\d.]+", out)
