"""Every notebook executes top to bottom in a real Jupyter kernel (nbclient) with its tiny
settings (METAOPT_NB_SMALL=1); a cell error fails the test. The same runner regenerates the
stored notebooks: ``python notebooks/run_all.py``."""
import importlib.util
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="nbclient not installed (pip install -e '.[dev]')")
nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (pip install -e '.[dev]')")
pytest.importorskip("ipykernel", reason="ipykernel not installed (pip install -e '.[dev]')")

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("nb_run_all", ROOT / "notebooks" / "run_all.py")
run_all = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_all)

NB = run_all.notebooks()
SLOW = {"03_discretizations.ipynb"}  # a hydra multirun + metaopt-report in subprocesses (25-55 s): --run-slow


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW else p
                                  for p in NB], ids=[p.name for p in NB])
def test_notebook_executes(path, tmp_path):
    nb = run_all.execute(path, small=True, workdir=tmp_path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


def test_notebooks_stored_with_outputs_and_figures():
    assert [p.name for p in NB] == ["01_quickstart.ipynb", "02_learned_rate_schedules.ipynb",
                                    "03_discretizations.ipynb", "04_new_task.ipynb", "05_fast_weights.ipynb",
                                    "06_plastic_transformers.ipynb"]
    for path in NB:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.outputs for c in code if "fig" in c.source), f"{path.name}: figure cells without output"
        assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), path.name
        # notebooks hold no library code: no function or class definitions beyond a task's module
        for c in code:
            assert "\ndef " not in "\n" + c.source, path.name
    tagged = {name for p in NB for name in run_all.figures(nbformat.read(p, as_version=4))}
    for name in tagged:
        assert (ROOT / "docs" / "figures" / f"{name}.png").exists(), name


def test_broken_cell_fails(tmp_path):
    nb = nbformat.read(NB[0], as_version=4)  # a temporary copy of 01 with a failing first cell
    nb.cells.insert(0, nbformat.v4.new_code_cell("raise RuntimeError('deliberately broken cell')"))
    broken = tmp_path / "99_broken.ipynb"
    nbformat.write(nb, broken)
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="deliberately broken"):
        run_all.execute(broken, small=True, workdir=tmp_path)


def test_small_setting_reaches_the_kernel(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os; print(os.environ.get('METAOPT_NB_SMALL'))")]
    path = tmp_path / "env.ipynb"
    nbformat.write(nb, path)
    out = run_all.execute(path, small=True, workdir=tmp_path)
    assert out.cells[0].outputs[0]["text"].strip() == "1"
