"""``metaopt-report <sweep dir>``: compare the runs of a ``metaopt-train -m`` sweep (or merge
the jobs of a ``metaopt-eval -m optimizer=...`` sweep into one table).

For every run directory (one with metrics.csv) it reads the meta-training curve, evaluates the
run's final rule on held-out tasks of its own training family (fresh seeds, the same tasks for
every run), and writes

* ``report.csv`` -- one row per run: overrides, scheme, local mode (``local.inner``/``local.meta``), final meta-loss, wall time, inner steps,
  held-out validation loss of the learned rule (mean over tasks) and of Adam(1e-3) on the same tasks;
* ``meta_loss_vs_time.png``, ``meta_loss_vs_inner_steps.png`` (meta-loss curves, final meta-loss
  per run, held-out losses: :func:`metaopt.viz.plot_sweep`), ``heldout.png``;

and prints the table as markdown. For an eval sweep it writes the merged ``report.csv``,
``curves.csv`` and ``curves.png`` (validation loss vs step per family, mean and min..max over
tasks).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Dict, List

import yaml


from metaopt.viz.sweep import find_runs, run_overrides, short_labels


def evaluate_run(run: Path, steps: int, tasks: int, seed: int) -> Dict[str, float]:
    import torch
    from omegaconf import OmegaConf
    from metaopt.cli.config import DTYPES, build_family
    from metaopt.rules.io import load_rule
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
    # label runs by what differs between them (overrides shared by every run say nothing)
    labels = short_labels([run_overrides(r) for r in runs], [r.name for r in runs])
    rows = []
    for run, label in zip(runs, labels):
        m = read_metrics(run)
        finite = [r["meta_loss"] for r in m if math.isfinite(r["meta_loss"])]
        tail = finite[-max(1, len(finite) // 10):] if finite else [math.nan]
        cfg_path = run / "checkpoints" / "last" / "config.yaml"
        run_cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
        scheme = run_cfg["scheme"]["name"] if run_cfg else "?"
        loc = run_cfg.get("local") or {}
        row = {"run": label, "scheme": scheme,
               "local": f"inner={loc.get('inner', 'global')},meta={loc.get('meta', 'global')}",
               "outer_steps": int(m[-1]["outer_step"]) if m else 0,
               "final_meta_loss": sum(tail) / len(tail),
               "wall_time_s": m[-1]["wall_time"] if m else math.nan,
               "inner_steps": int(m[-1]["inner_steps"]) if m else 0,
               "nonfinite": int(m[-1]["nonfinite"]) if m else 0}
        if cfg_path.exists() and eval_steps > 0:
            row.update(evaluate_run(run, eval_steps, eval_tasks, seed))
        rows.append(row)
    with open(sweep_dir / "report.csv", "w", newline="") as f:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    _figures(sweep_dir, rows)
    return rows


def _figures(out: Path, rows) -> None:
    """The sweep's figures, as PNG next to report.csv."""
    from metaopt.viz import load_sweep, plot_heldout, plot_sweep
    runs = load_sweep(out)
    heldout = {r["run"]: (r["heldout_learned"], r.get("heldout_adam_1e-3", math.nan))
               for r in rows if "heldout_learned" in r}
    plot_sweep(runs, out / "meta_loss_vs_time.png", x="wall_time", heldout=heldout)
    plot_sweep(runs, out / "meta_loss_vs_inner_steps.png", x="inner_steps", heldout=heldout)
    if heldout:
        plot_heldout(heldout, out / "heldout.png")


def to_markdown(rows: List[Dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def eval_sweep_table(sweep_dir: Path) -> str:
    """An ``metaopt-eval -m optimizer=...`` sweep: merge the jobs' results.csv into one table
    (rows shared by every job -- the learned rule, Adam at the reference lr -- counted once)."""
    from metaopt.meta.evaluate import summarize, write_csv
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
    write_csv(sweep_dir / "report.csv", rows)
    curves = []
    for path in sorted(sweep_dir.rglob("curves.csv")):
        if path.parent == sweep_dir:
            continue
        with open(path, newline="") as f:
            curves += list(csv.DictReader(f))
    if curves:  # each job's curves; rows shared by jobs (same family, seed, optimizer) once
        seen, merged = set(), []
        for r in curves:
            key = (r["family"], r["task_seed"], r["optimizer"], r["step"])
            if key not in seen:
                seen.add(key)
                merged.append(r)
        write_csv(sweep_dir / "curves.csv", merged)
        from metaopt.viz import plot_eval_curves
        plot_eval_curves(merged, sweep_dir / "curves.png")
    return summarize(rows)


DESCRIPTION = """Compare the runs of a sweep directory.

A metaopt-train -m sweep (run directories with metrics.csv): one row per run with its overrides,
scheme, final meta-loss, wall time and inner steps, plus the held-out validation loss of its final
rule and of Adam(1e-3) on the same fresh tasks of its training family; figures
meta_loss_vs_time.png, meta_loss_vs_inner_steps.png and heldout.png.
A metaopt-eval -m sweep (job directories with results.csv): the jobs' tables merged into one,
with curves.png. Writes report.csv and report.md into the sweep directory and prints the table."""

EPILOG = """examples:
  metaopt-report runs/schemes --eval-steps 200 --eval-tasks 3
  metaopt-report runs/baselines"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="metaopt-report", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", type=Path,
                   help="the sweep directory (hydra.sweep.dir of the multirun)")
    p.add_argument("--eval-steps", type=int, default=200,
                   help="inner steps per held-out task (0: skip the held-out evaluation; "
                        "default: %(default)s)")
    p.add_argument("--eval-tasks", type=int, default=3,
                   help="held-out tasks per run, the same for every run (default: %(default)s)")
    p.add_argument("--seed", type=int, default=2_000_000_000,
                   help="seed of the first held-out task; seeds seed, seed+1, ... are never "
                        "drawn in meta-training (default: %(default)s)")
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
