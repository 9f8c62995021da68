"""Merge suite evaluations that ran separately (e.g. the learned rule in one run, the no-tuning
peers in another, on the same problems and seeds) into one speedup table with the head-to-head
comparison, as ``metaopt-eval --config-name=suite`` prints it for a single run.

    python benchmarks/suite_report.py runs/final_learned runs/final_peers --out benchmarks/results/suite_final

Each argument is a run directory holding ``speedup.csv`` (``metaopt-eval --config-name=suite``);
rows of the first directory come first (its first optimizer is the one compared head to head).
Rows repeated across directories (``adam(tuned)``, the same reference in both) are kept once.
Writes ``speedup.csv`` and ``summary.md`` to ``--out`` and prints the summary.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from metaopt.cli.evaluate import summarize_speedup

FLOATS = ("loss_at_S", "speedup", "valid_at_S", "adam_valid_at_S", "adam_lr_valid",
          "adam_best_loss_at_S", "adam_lr_train")


def read_rows(run_dir: Path):
    path = Path(run_dir) / "speedup.csv"
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist (run metaopt-eval --config-name=suite first)")
    rows = []
    for r in csv.DictReader(open(path)):
        r = dict(r)
        for k in FLOATS:
            r[k] = float(r[k])
        r["seed"] = int(r["seed"])
        r["diverged"] = r["diverged"] in ("True", "true", "1")
        rows.append(r)
    return rows


def merge(dirs):
    seen, out = set(), []
    for d in dirs:
        for r in read_rows(d):
            key = (r["problem"], r["seed"], r["optimizer"])
            if key not in seen:
                seen.add(key)
                out.append(r)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="suite run directories (speedup.csv)")
    ap.add_argument("--out", type=Path, required=True, help="where speedup.csv and summary.md go")
    ap.add_argument("--steps", type=int, default=1000, help="S, the step budget of the runs")
    args = ap.parse_args(argv)
    rows = merge(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "speedup.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = summarize_speedup(rows, args.steps)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
