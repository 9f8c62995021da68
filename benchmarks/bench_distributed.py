"""Scaling of data-parallel meta-training: outer steps per second with 1, 2, ... processes.

    python benchmarks/bench_distributed.py                      # 1 vs 2 processes, 30 outer steps
    python benchmarks/bench_distributed.py --procs 1 2 4 --steps 50 --meta-batch 16

Every run is the same meta-training (``metaopt-train`` with the overrides below: the bench_peers
problem, MLP 64-32-10 on digits, batch 64, the 32x2 per-parameter MLP rule, K slots x 20-step
truncations of 500-step runs), launched with ``torchrun --nproc_per_node=N`` (N = 1 runs plain
``metaopt-train``). Throughput is read from the run's own metrics.csv (trainer wall time, the
first outer steps dropped as warm-up), so start-up is excluded. Runs alternate over ``--repeats``
rounds and the median is reported; each process uses one torch thread. The runs also check that
every N reaches the same final meta-loss (same theta up to float summation order).
"""
from __future__ import annotations

import argparse
import csv
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def overrides(steps: int, meta_batch: int, out: Path):
    return ["task=digits_mlp", "task.widths=[32]", "task.depths=[1]", "task.batch_sizes=[64]",
            "rule=mlp", "rule.hidden_size=32", "rule.num_layers=2", "rule.act_features=false",
            "rule.loss_features=false", "scheme=nested",
            "scheme.truncation=20", f"meta.meta_batch={meta_batch}", "meta.horizon=500",
            f"meta.outer_steps={steps}", f"meta.checkpoint_every={steps}", "meta.progress=false",
            "meta.meta_loss=valid_mean", "threads=1", f"hydra.run.dir={out}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, steps: int, meta_batch: int, warmup: int):
    out = Path(tempfile.mkdtemp(prefix=f"bench_ddp{nproc}_"))
    if nproc == 1:
        cmd = [sys.executable, "-m", "metaopt.cli.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "metaopt.cli.train"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd + overrides(steps, meta_batch, out), cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"error: {nproc}-process run failed:\n{res.stderr[-2000:]}")
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    t = [float(r["wall_time"]) for r in rows]
    rate = (len(t) - warmup) / (t[-1] - t[warmup - 1])
    return rate, float(rows[-1]["meta_loss"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--meta-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    print(header("data-parallel meta-training (torchrun, gloo)", 1))
    print(f"{a.meta_batch} slots x 20-step truncations, {a.steps} outer steps "
          f"({a.warmup} dropped as warm-up), median of {a.repeats} alternating rounds")
    rates = {n: [] for n in a.procs}
    finals = {n: [] for n in a.procs}
    for _ in range(a.repeats):
        for n in a.procs:
            r, f = run(n, a.steps, a.meta_batch, a.warmup)
            rates[n].append(r)
            finals[n].append(f)
    base = statistics.median(rates[a.procs[0]])
    print(f"{'processes':>9} | {'outer steps/s':>13} | {'speedup':>7} | final meta-loss")
    for n in a.procs:
        m = statistics.median(rates[n])
        print(f"{n:>9} | {m:>13.3f} | {m / base:>6.2f}x | {finals[n][0]:.6f}")
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
