"""Does a torch.compile'd training step work with each optimizer, and does it
match eager? Prints, per optimizer and dtype, the max |param_compiled - param_eager| after N
steps (same init, same batches), and the same for torch.optim.Adam/SGD as controls, so a
deviation can be attributed: if the control deviates as much, it is inductor's arithmetic
(reassociation/fused kernels in float32), not ours.

    python benchmarks/compile_optimizers.py [--steps 3] [--backend inductor]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from metaopt.optim import SGDHD, SLRLA, AdamHD, LearnedOptimizer, Lookahead
from metaopt.rules import make_rule

torch.set_num_threads(1)


def cases(model):
    return {
        "torch.Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
        "torch.SGD(momentum)": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        "LearnedOptimizer(adam)": lambda ps: LearnedOptimizer(ps, rule=make_rule("adam", lr=1e-2)),
        "LearnedOptimizer(sgd)": lambda ps: LearnedOptimizer(ps, rule=make_rule("sgd", lr=0.05, momentum=0.9)),
        "LearnedOptimizer(mlp)": lambda ps: LearnedOptimizer(ps, rule=make_rule("mlp", hidden_size=8)),
        "Lookahead(SGD)": lambda ps: Lookahead(torch.optim.SGD(ps, lr=0.05, momentum=0.9), k=2),
        "SLRLA(SGD)": lambda ps: SLRLA(ps, lr=0.05, momentum=0.9, k=2),
        "SGDHD": lambda ps: SGDHD(ps, lr=0.05),
        "AdamHD": lambda ps: AdamHD(ps, lr=1e-2),
    }


def run(name, make, dtype, steps, backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 8, generator=g, dtype=dtype), torch.randn(32, 4, generator=g, dtype=dtype))
            for _ in range(steps)]
    results = []
    for m, compiled in ((model, False), (twin, True)):
        opt = make(m.parameters())

        def train_step(x, y):
            opt.zero_grad()
            loss = ((m(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            return loss
        fn = torch.compile(train_step, backend=backend) if compiled else train_step
        torch._dynamo.reset()
        t0 = time.perf_counter()
        try:
            for x, y in data:
                fn(x, y)
        except Exception as e:  # report, do not hide
            return f"FAILS: {type(e).__name__}: {str(e).splitlines()[0][:80]}", None
        results.append(time.perf_counter() - t0)
    dev = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), twin.parameters()))
    return f"{dev:.2e}", results[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--only", default=None, help="substring filter on optimizer names")
    args = ap.parse_args()
    print(f"max |compiled - eager| over all params after {args.steps} steps (backend={args.backend})")
    print(f"| optimizer | float32 | float64 |")
    print(f"|---|---|---|")
    for name, make in cases(None).items():
        if args.only and args.only not in name:
            continue
        row = [run(name, make, dt, args.steps, args.backend)[0] for dt in (torch.float32, torch.float64)]
        print(f"| {name} | {row[0]} | {row[1]} |", flush=True)


if __name__ == "__main__":
    main()
