"""Read a ``metaopt-train -m`` multirun directory: one :class:`SweepRun` per run (a directory
with metrics.csv), labelled by the overrides that differ between the runs."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import yaml

__all__ = ["SweepRun", "find_runs", "load_sweep", "run_overrides", "short_labels"]


@dataclass
class SweepRun:
    path: Path
    label: str
    overrides: List[str]
    metrics: List[Dict[str, float]] = field(repr=False)
    config: Optional[dict] = field(default=None, repr=False)

    def column(self, key: str) -> np.ndarray:
        return np.array([r.get(key, math.nan) for r in self.metrics], dtype=float)

    @property
    def final_meta_loss(self) -> float:
        """Mean of the last 10% of the finite meta-losses (NaN if none)."""
        v = [x for x in self.column("meta_loss") if math.isfinite(x)]
        tail = v[-max(1, len(v) // 10):]
        return sum(tail) / len(tail) if tail else math.nan


def find_runs(sweep_dir) -> List[Path]:
    return sorted(p.parent for p in Path(sweep_dir).rglob("metrics.csv"))


def run_overrides(run: Path) -> List[str]:
    """The run's hydra overrides (hydra.* left out), or [] when it has none recorded."""
    ov = Path(run) / ".hydra" / "overrides.yaml"
    if ov.exists():
        return [o for o in (yaml.safe_load(ov.read_text()) or []) if not str(o).startswith("hydra.")]
    return []


def short_labels(overrides: List[List[str]], fallback: List[str]) -> List[str]:
    """Label each run by its overrides minus those every run shares."""
    common = set.intersection(*map(set, overrides)) if len(overrides) > 1 else set()
    return [",".join(x for x in ov if x not in common) or ",".join(ov) or fb
            for ov, fb in zip(overrides, fallback)]


def _read_metrics(run: Path) -> List[Dict[str, float]]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in r.items() if v not in (None, "")} for r in csv.DictReader(f)]


def load_sweep(sweep_dir) -> List[SweepRun]:
    """Every run of a ``metaopt-train -m`` sweep directory as a :class:`SweepRun` (label,
    overrides, metrics.csv rows, resolved config), sorted by path."""
    runs = find_runs(sweep_dir)
    ovs = [run_overrides(r) for r in runs]
    labels = short_labels(ovs, [r.name for r in runs])
    out = []
    for run, ov, lab in zip(runs, ovs, labels):
        cfg_path = run / "checkpoints" / "last" / "config.yaml"
        cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else None
        out.append(SweepRun(run, lab, ov, _read_metrics(run), cfg))
    return out
