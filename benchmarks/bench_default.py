"""The shipped default learned optimizer vs torch.optim.Adam, on the same ~1M-parameter MLP.

(1) ``optimizer.step()`` alone (gradients set once), (2) a full training step: forward +
backward + step on a batch of 128. Both printed as ratios over ``torch.optim.Adam(foreach=True)``
in one run. Goals: (1) <= 2x, (2) <= 1.2x.

    python benchmarks/bench_default.py [--threads 1] [--arch 784,1024,256,10]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import make_mlp  # noqa: E402
from common import header, median, ms, set_threads, spread, time_calls  # noqa: E402

from metaopt.optim import LearnedOptimizer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arch", default="784,1024,256,10")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rule", default="default", help="shipped name or checkpoint dir")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    print(header("default learned optimizer vs Adam (benchmarks/bench_default.py)", threads))
    dims = [int(d) for d in args.arch.split(",")]
    model = make_mlp(dims)
    n = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, dims[0], generator=g)
    y = torch.randint(0, dims[-1], (args.batch_size,), generator=g)
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    probe = LearnedOptimizer.from_pretrained(model.parameters(), args.rule)
    print(f"MLP {'-'.join(map(str, dims))}: {n:,} params in {len(grads)} tensors, float32, "
          f"batch {args.batch_size}; rule {args.rule!r} = {probe.rule!r}")
    opts = {
        "torch.optim.Adam(foreach=True)": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True),
        f"LearnedOptimizer.from_pretrained({args.rule!r})":
            lambda m: LearnedOptimizer.from_pretrained(m.parameters(), args.rule),
    }

    def fresh(make_opt):
        m = copy.deepcopy(model)
        for p, gr in zip(m.parameters(), grads):
            p.grad = gr.clone()
        return m, make_opt(m)

    def train_step(m, opt):
        def fn():
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        return fn

    rows = {}
    for name, make in opts.items():   # one optimizer at a time: no cache eviction by the other
        m, opt = fresh(make)
        step_t = time_calls(opt.step, args.repeats, args.warmup)
        m, opt = fresh(make)
        full_t = time_calls(train_step(m, opt), args.repeats, args.warmup)
        rows[name] = (step_t, full_t)
    base_s, base_f = (median(t) for t in rows["torch.optim.Adam(foreach=True)"])
    print(f"\n  {'optimizer':44s} {'step()':>12s} {'[min..max]':>14s} {'ratio':>7s}   "
          f"{'fwd+bwd+step':>12s} {'[min..max]':>14s} {'ratio':>7s}")
    for name, (st, ft) in rows.items():
        rs, rf = median(st) / base_s, median(ft) / base_f
        print(f"  {name:44s} {ms(median(st))} {spread(st):>14s} {rs:6.2f}x   "
              f"{ms(median(ft))} {spread(ft):>14s} {rf:6.2f}x")
    rs = median(rows[list(rows)[1]][0]) / base_s
    rf = median(rows[list(rows)[1]][1]) / base_f
    print(f"\n  goals: step() <= 2x Adam: {'met' if rs <= 2 else 'MISSED'} ({rs:.2f}x); "
          f"full training step <= 1.2x Adam: {'met' if rf <= 1.2 else 'MISSED'} ({rf:.2f}x)")


if __name__ == "__main__":
    main()
