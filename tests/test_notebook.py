"""notebooks/quickstart.ipynb runs top to bottom on the tiny model (its code cells, in order)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MERGEKIT_CD_CACHE", str(tmp_path / "cache"))
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 5
    namespace: dict = {"__name__": "__main__"}
    for index, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{NOTEBOOK.name}, code cell {index + 1}", "exec"), namespace)
    report = namespace["report"]
    assert max(c.residual for c in report.concepts) < 1e-5
    assert report.drift < report.sum_drift
    fidelities = [f for _, f in namespace["curve"]]
    assert fidelities[-1] > fidelities[0]  # larger weights keep the concepts better
    for name in ("merged.safetensors", "tradeoff.png", "grid.png"):
        assert (tmp_path / "quickstart-output" / name).is_file()
