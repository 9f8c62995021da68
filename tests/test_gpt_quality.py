"""Smoke test of benchmarks/gpt_quality.py: a tiny model, a few steps, all outputs written."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    path = ROOT / "benchmarks" / "gpt_quality.py"
    spec = importlib.util.spec_from_file_location("gpt_quality", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpt_quality_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    mod = _load()
    out = tmp_path / "gq"
    mod.main(["--steps", "3", "--batch", "2", "--ctx", "16", "--d-model", "16", "--layers", "1",
              "--heads", "2", "--val-windows", "4", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["optimizer"] for r in data["runs"]] == [
        "learned/default", "AdamW lr=0.001", "AdamW lr=0.003", "AdamW lr=0.01"]
    for r in data["runs"]:
        assert r["steps_done"] == 3
        assert [s for s, _ in r["val_curve"]] == [0, 3]
        assert r["final_val_bpc"] == pytest.approx(r["final_val_loss"] / 0.6931471805599453)
    # same init: every run starts from the same validation loss
    v0 = {r["val_curve"][0][1] for r in data["runs"]}
    assert len(v0) == 1
    assert "| learned/default |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
