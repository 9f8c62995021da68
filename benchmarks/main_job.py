"""The README's main job: meta-train the default recipe (``metaopt-train``: 100 outer steps of
the pertensor rule on the task mixture), then its speedup over lr-tuned Adam on three held-out
problems (``metaopt-eval --config-name=suite``). Writes what the README quotes to
``benchmarks/results/main_job.json`` and prints the README's line.

    python benchmarks/main_job.py                       # runs both commands in runs/default
    python benchmarks/main_job.py --from runs/default   # only reads a finished run

``tests/test_readme.py`` checks that the README quotes this file; its slow test re-runs the job.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "main_job.json"
PROBLEMS = ["wine_mlp", "cancer_mlp_bce", "digits_wide_mlp"]
TRAIN = ["metaopt-train", "hydra.run.dir={run}"]
EVAL = ["metaopt-eval", "--config-name=suite", "checkpoint={run}/checkpoints/last",
        f"speedup.problems=[{','.join(PROBLEMS)}]", "hydra.run.dir={run}/suite"]


def run_job(run: Path, cwd: Path) -> float:
    t0 = time.time()
    for cmd in (TRAIN, EVAL):
        args = [c.format(run=run) for c in cmd]
        print("$", " ".join(args), flush=True)
        subprocess.run(args, cwd=cwd, check=True)
    return time.time() - t0


def read_job(run: Path) -> dict:
    log = (run / "train.log").read_text()
    m = re.findall(r"final meta-loss (-?[0-9.]+)", log)
    if not m:
        raise SystemExit(f"error: no 'final meta-loss' in {run / 'train.log'}")
    rows = list(csv.DictReader(open(run / "suite" / "speedup.csv", newline="")))
    learned = [r for r in rows if r["optimizer"] == "learned"]
    from metaopt.meta.speedup import iqm
    sp = {r["problem"]: float(r["speedup"]) for r in learned}
    return {"final_meta_loss": float(m[-1]), "speedup": sp,
            "iqm": iqm(list(sp.values())),
            "diverged": sum(r["diverged"] in ("True", "true", "1") for r in learned)}


def readme_line(d: dict) -> str:
    s = d["speedup"]
    return (f"final meta-loss {d['final_meta_loss']:.2f}; speedup over lr-tuned Adam "
            f"{s['wine_mlp']:.2f} on wine, {s['cancer_mlp_bce']:.2f} on cancer, "
            f"{s['digits_wide_mlp']:.2f} on the wide MLP (IQM {d['iqm']:.2f}; "
            f"{d['diverged']} diverged)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="src", type=Path, default=None,
                   help="read this finished run instead of running the job")
    p.add_argument("--run", type=Path, default=Path("runs/default"),
                   help="run directory for the job (default: %(default)s)")
    p.add_argument("--out", type=Path, default=RESULT, help="JSON to write (default: %(default)s)")
    a = p.parse_args(argv)
    wall = None
    if a.src is None:
        wall = run_job(a.run, Path.cwd())
    d = read_job(a.src or a.run)
    if wall is not None:
        d["wall_s"] = round(wall, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(d, indent=1) + "\n")
    print(readme_line(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
