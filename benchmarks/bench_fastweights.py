"""Fast-weight rules: recurrent reference vs chunkwise-parallel form, forward + backward.

For the ``sum`` (linear attention) and ``delta`` (DeltaNet) rules, times one forward + backward
(loss = sum of squared outputs, gradients w.r.t. q, k, v and beta) of
:func:`metaopt.fastweights.rules.sum_recurrent` / ``delta_recurrent`` against
``sum_chunkwise`` / ``delta_chunkwise`` at sequence lengths ``--lengths`` (256, 1024), head
size ``d = --dim`` (64), batch ``--batch`` (4), float32. Timed round-robin, medians reported, and
the ratio recurrent / chunkwise printed. Before timing, the two forms are checked equal on the same
inputs (max abs difference of outputs printed).

    python benchmarks/bench_fastweights.py
    python benchmarks/bench_fastweights.py --lengths 256 --repeats 3 --chunk 32
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import header, set_threads, time_interleaved  # noqa: E402

from metaopt.fastweights import rules as R  # noqa: E402


def make_inputs(B: int, T: int, d: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, d, generator=g, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, d, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, d, generator=g, dtype=dtype)
    beta = torch.rand(B, T, generator=g, dtype=dtype)
    return [t.requires_grad_(True) for t in (q, k, v, beta)]


def forms(rule: str, chunk: int):
    if rule == "sum":
        return {"recurrent": lambda q, k, v, b: R.sum_recurrent(q, k, v)[0],
                "chunkwise": lambda q, k, v, b: R.sum_chunkwise(q, k, v, None, chunk)[0]}
    return {"recurrent": lambda q, k, v, b: R.delta_recurrent(q, k, v, b)[0],
            "chunkwise": lambda q, k, v, b: R.delta_chunkwise(q, k, v, b, None, chunk)[0]}


def fwd_bwd(fn, inputs):
    def call():
        for t in inputs:
            t.grad = None
        fn(*inputs).pow(2).sum().backward()
    return call


def run(lengths=(256, 1024), dim=64, batch=4, chunk=64, repeats=5):
    rows = []
    for T in lengths:
        inputs = make_inputs(batch, T, dim)
        for rule in ("sum", "delta"):
            fs = forms(rule, chunk)
            with torch.no_grad():
                diff = (fs["recurrent"](*inputs) - fs["chunkwise"](*inputs)).abs().max().item()
            times = time_interleaved({k: fwd_bwd(f, inputs) for k, f in fs.items()}, repeats)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"rule": rule, "T": T, "recurrent_ms": 1e3 * med["recurrent"],
                         "chunkwise_ms": 1e3 * med["chunkwise"],
                         "ratio": med["recurrent"] / med["chunkwise"], "max_abs_diff": diff})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    threads = set_threads(a.threads)
    print(header("fast-weight rules: recurrent vs chunkwise (forward + backward)", threads))
    print(f"batch {a.batch} | d_key = d_value = {a.dim} | chunk {a.chunk} | float32 | "
          f"median of {a.repeats}")
    rows = run(a.lengths, a.dim, a.batch, a.chunk, a.repeats)
    print(f"{'rule':6} {'T':>5} {'recurrent ms':>13} {'chunkwise ms':>13} "
          f"{'recurrent/chunkwise':>20} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['rule']:6} {r['T']:>5} {r['recurrent_ms']:>13.1f} {r['chunkwise_ms']:>13.1f} "
              f"{r['ratio']:>19.1f}x {r['max_abs_diff']:>11.1e}")
    return rows


if __name__ == "__main__":
    main()
