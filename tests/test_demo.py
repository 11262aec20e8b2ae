"""`make demo` runs mergekit_cd.demo: it must keep working, offline, and say what it did."""

from __future__ import annotations

from mergekit_cd import demo


def test_demo_merges_the_built_in_example_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MERGEKIT_CD_CACHE", str(tmp_path / "cache"))
    demo.main()
    out = capsys.readouterr().out
    assert "$ cd-merge" in out and "renamed to <new2>" in out and "held-out drift" in out
    assert "--relative-ridge 1e-3" in out and "$ cd-inspect" in out
    assert "constrained (solve_hard)" in out
    assert (tmp_path / "demo-output" / "merged.safetensors").is_file()
    assert (tmp_path / "demo-output" / "merged-ridge" / "pytorch_custom_diffusion_weights.safetensors").is_file()
