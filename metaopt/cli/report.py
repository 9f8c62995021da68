"""``metaopt-report <sweep dir>``: compare the runs of a ``metaopt-train -m`` sweep (or merge
the jobs of a ``metaopt-eval -m optimizer=...`` sweep into one table).

For every run directory (one with metrics.csv) it reads the meta-training curve, evaluates the
run's final rule on held-out tasks of its own training family (fresh seeds, the same tasks for
every run), and writes

* ``report.csv`` -- one row per run: overrides, scheme, final meta-loss, wall time, inner steps,
  held-out validation loss of the learned rule (mean over tasks) and of Adam(1e-3) on the same tasks;
* ``meta_loss_vs_time.png``, ``meta_loss_vs_inner_steps.png``, ``heldout.png``;

and prints the table as markdown.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Dict, List

import yaml


def find_runs(sweep_dir: Path) -> List[Path]:
    return sorted(p.parent for p in sweep_dir.rglob("metrics.csv"))


def _label(run: Path) -> str:
    ov = run / ".hydra" / "overrides.yaml"
    if ov.exists():
        items = yaml.safe_load(ov.read_text()) or []
        items = [o for o in items if not o.startswith("hydra.")]
        if items:
            return ",".join(items)
    return run.name


def evaluate_run(run: Path, steps: int, tasks: int, seed: int) -> Dict[str, float]:
    import torch
    from omegaconf import OmegaConf
    from metaopt.cli.config import DTYPES, build_family
    from metaopt.meta.checkpoint import load_rule
    from metaopt.meta.evaluate import train_task
    from metaopt.optim import LearnedOptimizer

    ckpt = run / "checkpoints" / "last"
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    rule, theta, _ = load_rule(ckpt)
    dtype = DTYPES[cfg["meta"]["dtype"]]
    family = build_family(OmegaConf.create(cfg["task"]), cfg["meta"]["dtype"])
    learned, adam = [], []
    for i in range(tasks):
        task = family.sample_seeded(seed + i)
        r = train_task(task, lambda named, t: LearnedOptimizer(named, rule=rule, theta=theta,
                       model=t.module), steps, seed + i, eval_every=steps, dtype=dtype)
        a = train_task(task, lambda named, t: torch.optim.Adam([p for _, p in named], lr=1e-3),
                       steps, seed + i, eval_every=steps, dtype=dtype)
        learned.append(r.final_valid)
        adam.append(a.final_valid)
    return {"heldout_learned": sum(learned) / tasks, "heldout_adam_1e-3": sum(adam) / tasks}


def read_metrics(run: Path) -> List[Dict[str, float]]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def make_report(sweep_dir: Path, eval_steps: int = 200, eval_tasks: int = 3,
                seed: int = 2_000_000_000) -> List[Dict]:
    runs = find_runs(sweep_dir)
    if not runs:
        raise ValueError(f"sweep_dir: no runs (no metrics.csv) under {sweep_dir}")
    rows, curves = [], {}
    for run in runs:
        m = read_metrics(run)
        finite = [r["meta_loss"] for r in m if math.isfinite(r["meta_loss"])]
        tail = finite[-max(1, len(finite) // 10):] if finite else [math.nan]
        cfg_path = run / "checkpoints" / "last" / "config.yaml"
        scheme = yaml.safe_load(cfg_path.read_text())["scheme"]["name"] if cfg_path.exists() else "?"
        row = {"run": _label(run), "scheme": scheme, "outer_steps": int(m[-1]["outer_step"]) if m else 0,
               "final_meta_loss": sum(tail) / len(tail),
               "wall_time_s": m[-1]["wall_time"] if m else math.nan,
               "inner_steps": int(m[-1]["inner_steps"]) if m else 0,
               "nonfinite": int(m[-1]["nonfinite"]) if m else 0}
        if cfg_path.exists() and eval_steps > 0:
            row.update(evaluate_run(run, eval_steps, eval_tasks, seed))
        rows.append(row)
        curves[row["run"]] = m
    # label runs by what differs between them (overrides shared by every run say nothing)
    parts = [r["run"].split(",") for r in rows]
    common = set.intersection(*map(set, parts)) if len(rows) > 1 else set()
    for r, p in zip(rows, parts):
        short = ",".join(x for x in p if x not in common) or r["run"]
        curves[short] = curves.pop(r["run"])
        r["run"] = short
    with open(sweep_dir / "report.csv", "w", newline="") as f:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    _figures(sweep_dir, rows, curves)
    return rows


def _figures(out: Path, rows, curves) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for x, name in (("wall_time", "meta_loss_vs_time.png"), ("inner_steps", "meta_loss_vs_inner_steps.png")):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for label, m in curves.items():
            ax.plot([r[x] for r in m], [r["meta_loss"] for r in m], label=label)
        ax.set_xlabel("wall time (s)" if x == "wall_time" else "inner steps consumed (all slots)")
        ax.set_ylabel("meta-loss")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    if any("heldout_learned" in r for r in rows):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        labels = [r["run"] for r in rows]
        ax.bar(range(len(rows)), [r.get("heldout_learned", math.nan) for r in rows], label="learned rule")
        ax.plot(range(len(rows)), [r.get("heldout_adam_1e-3", math.nan) for r in rows], "k_", ms=30,
                label="Adam(1e-3), same tasks")
        ax.set_xticks(range(len(rows)), labels, rotation=20, fontsize=7, ha="right")
        ax.set_ylabel("held-out validation loss")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "heldout.png", dpi=110)
        plt.close(fig)


def to_markdown(rows: List[Dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def eval_sweep_table(sweep_dir: Path) -> str:
    """An ``metaopt-eval -m optimizer=...`` sweep: merge the jobs' results.csv into one table
    (rows shared by every job -- the learned rule, Adam at the reference lr -- counted once)."""
    from metaopt.cli.evaluate import summarize, _write_csv
    seen, rows = set(), []
    for path in sorted(sweep_dir.rglob("results.csv")):
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                key = (r["family"], r["task_seed"], r["optimizer"])
                if key in seen:
                    continue
                seen.add(key)
                r["final_valid"], r["final_test"] = float(r["final_valid"]), float(r["final_test"])
                r["lr"] = float(r["lr"]) if r["lr"] not in ("", "None") else None
                rows.append(r)
    if not rows:
        raise ValueError(f"sweep_dir: no runs (no metrics.csv or results.csv) under {sweep_dir}")
    _write_csv(sweep_dir / "report.csv", rows)
    return summarize(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="metaopt-report", description=__doc__.split("\n")[0])
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--eval-steps", type=int, default=200, help="inner steps per held-out task (0: skip)")
    p.add_argument("--eval-tasks", type=int, default=3)
    p.add_argument("--seed", type=int, default=2_000_000_000)
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    try:
        if not a.sweep_dir.is_dir():
            raise ValueError(f"sweep_dir: {a.sweep_dir} is not a directory")
        if not find_runs(a.sweep_dir) and any(a.sweep_dir.rglob("results.csv")):
            table = eval_sweep_table(a.sweep_dir)
        else:
            table = to_markdown(make_report(a.sweep_dir, a.eval_steps, a.eval_tasks, a.seed))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (a.sweep_dir / "report.md").write_text(table + "\n")
    print(table)
    print(f"wrote {a.sweep_dir / 'report.csv'}, {a.sweep_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
