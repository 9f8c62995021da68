"""Figures. Each function takes plain data (rows, tensors) and writes or returns a figure."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_eval_curves(curves: List[Dict], path) -> Path:
    """Mean validation loss vs step per optimizer, one panel per task family (log y)."""
    fams = list(dict.fromkeys(r["family"] for r in curves))
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 3.8), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        by = defaultdict(lambda: defaultdict(list))
        for r in curves:
            if r["family"] == fam:
                by[r["optimizer"]][int(r["step"])].append(float(r["valid_loss"]))
        for opt, d in by.items():
            steps = sorted(d)
            ax.plot(steps, [np.mean(d[s]) for s in steps], label=opt, lw=2 if opt == "learned" else 1.2)
        ax.set_title(f"held-out {fam}")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_lr_schedule(log_lr, names: Optional[Sequence[str]] = None, ax=None, title=None):
    """A LayerwiseLR schedule: theta["log_lr"] [num_steps, num_tensors] -> one line per layer."""
    import torch
    lr = torch.as_tensor(log_lr).detach().exp().cpu().numpy()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.8))
    for j in range(lr.shape[1]):
        ax.plot(np.arange(lr.shape[0]), lr[:, j], marker=".", label=names[j] if names else f"tensor {j}")
    ax.set_xlabel("inner step")
    ax.set_ylabel("learned learning rate")
    ax.set_yscale("log")
    ax.set_title(title or "learned per-layer learning-rate schedule")
    ax.legend(fontsize=7)
    return ax


def plot_meta_training(metrics_csv, ax=None, x: str = "outer_step", label=None):
    """Meta-loss from a run's metrics.csv against outer steps, wall time or inner steps."""
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.8))
    xs = [float(r[x]) for r in rows]
    ys = [float(r["meta_loss"]) for r in rows]
    ax.plot(xs, ys, label=label)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel("meta-loss")
    return ax
