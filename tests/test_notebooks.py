"""Notebooks run top to bottom (their code cells, in order, in one namespace)."""
import json
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
NB = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NB, ids=[p.name for p in NB])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = {}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{path.name}", "exec"), ns)
