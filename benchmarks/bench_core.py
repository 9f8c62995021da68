"""Core speed benchmark: metaopt's meta-gradient vs higher and torchopt, and LearnedOptimizer.step
vs torch.optim.Adam. Prints every number it quotes; run ``python benchmarks/bench_core.py -h``.

(a) One meta-gradient of a meta-batch of digits-MLP tasks (same architecture) through T inner
    steps of the learned ``layerwise_lr`` rule (a learned log learning rate per layer per step,
    SGD direction), meta-loss = mean validation loss over the window (metaopt's ``valid_mean``).
    The same computation three ways, from identical initial weights, batches and theta:

    * metaopt   -- ``Nested(truncation=T).meta_gradient`` (the public scheme call: vmapped unroll
                   over the meta-batch; also timed with ``use_vmap=False``, a loop over tasks).
                   Its time includes drawing its batches from the slots' generators (reset before
                   every call so it draws exactly the batches the others are fed); that draw is
                   timed separately and printed.
    * higher    -- ``higher.innerloop_ctx`` with ``torch.optim.SGD`` (one param group per tensor,
                   so each layer has its own lr), the learned rates passed per step through
                   ``diffopt.step(loss, override={"lr": [...]})``; a loop over tasks, as in
                   higher's MAML example.
    * torchopt  -- functional: ``torch.func.functional_call`` + ``torch.autograd.grad(...,
                   create_graph=True)``, per-layer updates ``-lr_l * g`` applied with
                   ``torchopt.apply_updates(..., inplace=False)``; a loop over tasks.

    The meta-gradients are compared once in float64; times are float32 medians.
(b) ``LearnedOptimizer.step`` over ``torch.optim.Adam(foreach=True).step`` on a ~1M-parameter MLP:
    gradients are computed once and left in ``.grad``; only ``step()`` is timed.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import header, median, ms, set_threads, spread, time_calls, time_interleaved  # noqa: E402

import higher  # noqa: E402
import torchopt  # noqa: E402

from metaopt.meta.engine import sample_window  # noqa: E402
from metaopt.meta.nested import Nested  # noqa: E402
from metaopt.meta.slots import Slot, new_slot  # noqa: E402
from metaopt.optim.learned import LearnedOptimizer  # noqa: E402
from metaopt.rules import make_rule  # noqa: E402
from metaopt.tasks import make_family  # noqa: E402
from metaopt.types import FlatSpec  # noqa: E402

GOAL_A = 3.0  # metaopt's meta-gradient >= 3x faster than higher and than torchopt
GOAL_B = 3.0  # LearnedOptimizer.step <= 3x Adam(foreach=True).step
META_LOSS = "valid_mean"


# ---------------------------------------------------------------------------------------------
# (a) the meta-gradient problem, shared by the three implementations
# ---------------------------------------------------------------------------------------------
@dataclass
class Problem:
    rule: object
    slots: List[Slot]
    gen_states: List[torch.Tensor]
    batches: List[Tuple[tuple, tuple]]     # per task: (train batches [T, ...], valid batches [T, ...])
    init_params: List[Dict[str, torch.Tensor]]
    module: nn.Module                      # the task architecture, trainable, for higher
    theta: Dict[str, torch.Tensor]         # {"log_lr": [T, num_tensors]}, requires grad
    steps: int

    @property
    def num_params(self) -> int:
        return sum(v.numel() for v in self.init_params[0].values())


def build_problem(tasks=8, steps=20, width=64, depth=2, batch_size=64, dtype=torch.float32,
                  seed=0) -> Problem:
    family = make_family("digits_mlp", widths=[width], depths=[depth], activations=["relu"],
                         batch_sizes=[batch_size], dtype=dtype)
    rule = make_rule("layerwise_lr", lr=0.1, num_steps=steps, direction="sgd")
    slots = [new_slot(family, rule, seed + i, horizon=steps) for i in range(tasks)]
    if len({s.task.signature for s in slots}) != 1:
        raise RuntimeError("benchmark tasks must share one architecture (one vmap group)")
    gen_states = [s.gen.get_state() for s in slots]
    batches = [sample_window(s, steps, True) for s in slots]  # exactly what the scheme will draw
    for s, st in zip(slots, gen_states):
        s.gen.set_state(st)
    spec = FlatSpec.of(slots[0].params)
    # Distinct rates per layer and step (around 0.1) so a layer/step mix-up would show in the check.
    g = torch.Generator().manual_seed(seed + 12345)
    log_lr = math.log(0.1) + 0.3 * torch.randn(steps, spec.num_tensors, generator=g, dtype=torch.float64)
    theta = {"log_lr": log_lr.to(dtype).requires_grad_(True)}
    module = copy.deepcopy(slots[0].task.module)
    for p in module.parameters():
        p.requires_grad_(True)
    if [n for n, _ in module.named_parameters()] != list(spec.names):
        raise RuntimeError("parameter order differs between the module and metaopt's flat spec")
    return Problem(rule, slots, gen_states, batches, [s.params for s in slots], module, theta, steps)


def _reset_generators(P: Problem):
    for s, st in zip(P.slots, P.gen_states):
        s.gen.set_state(st)


def metaopt_grad(P: Problem, scheme: Nested, rule=None, theta=None, slots=None) -> torch.Tensor:
    _reset_generators(P)
    rule = P.rule if rule is None else rule
    theta = P.theta if theta is None else theta
    out = scheme.meta_gradient(rule, theta, P.slots if slots is None else slots, META_LOSS)
    return out.grads


def higher_grad(P: Problem) -> torch.Tensor:
    log_lr = P.theta["log_lr"]
    lrs = torch.exp(log_lr)
    module = P.module
    inner_opt = torch.optim.SGD([{"params": [p]} for p in module.parameters()], lr=0.1)
    total = 0.0
    for params0, (tb, vb) in zip(P.init_params, P.batches):
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(params0[n])
        with higher.innerloop_ctx(module, inner_opt, copy_initial_weights=True) as (fmodel, diffopt):
            losses = []
            for t in range(P.steps):
                loss = fmodel(tb[0][t], tb[1][t])
                diffopt.step(loss, override={"lr": list(lrs[t].unbind())})
                losses.append(fmodel(vb[0][t], vb[1][t]))
            total = total + torch.stack(losses).mean()
    total = total / len(P.init_params)
    return torch.autograd.grad(total, log_lr)[0]


def torchopt_grad(P: Problem) -> torch.Tensor:
    log_lr = P.theta["log_lr"]
    lrs = torch.exp(log_lr)
    module = P.slots[0].task.module  # structure only; functional_call supplies the tensors
    names = list(P.init_params[0])
    total = 0.0
    for params0, (tb, vb) in zip(P.init_params, P.batches):
        params = {n: v.detach().clone().requires_grad_(True) for n, v in params0.items()}
        losses = []
        for t in range(P.steps):
            loss = functional_call(module, params, (tb[0][t], tb[1][t]))
            grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=True)
            updates = {n: -lrs[t, i] * g for i, (n, g) in enumerate(zip(names, grads))}
            params = torchopt.apply_updates(params, updates, inplace=False)
            losses.append(functional_call(module, params, (vb[0][t], vb[1][t])))
        total = total + torch.stack(losses).mean()
    total = total / len(P.init_params)
    return torch.autograd.grad(total, log_lr)[0]


def gradient_diffs(tasks=8, steps=20, width=64, depth=2, batch_size=64, seed=0) -> Dict[str, float]:
    """Max |meta-gradient - metaopt's| in float64 for higher, torchopt and metaopt's loop path."""
    P = build_problem(tasks, steps, width, depth, batch_size, torch.float64, seed)
    _reset_generators(P)
    for s, (tb, vb) in zip(P.slots, P.batches):  # the scheme will draw exactly the fed batches
        tb2, vb2 = sample_window(s, steps, True)
        assert all(torch.equal(a, b) for a, b in zip(tb + vb, tb2 + vb2))
    ref = metaopt_grad(P, Nested(truncation=steps, use_vmap=True))["log_lr"]
    loop = metaopt_grad(P, Nested(truncation=steps, use_vmap=False))["log_lr"]
    h, o = higher_grad(P), torchopt_grad(P)
    return {"higher": float((h - ref).abs().max()), "torchopt": float((o - ref).abs().max()),
            "metaopt_loop": float((loop - ref).abs().max()), "max_abs_grad": float(ref.abs().max())}


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def bench_meta_gradient(args):
    print(f"\n(a) one meta-gradient: {args.tasks} digits-MLP tasks x {args.steps} inner steps")
    P = build_problem(args.tasks, args.steps, args.width, args.depth, args.batch_size,
                      torch.float32, args.seed)
    arch = "-".join(str(d) for d in [64] + [args.width] * args.depth + [10])
    print(f"    MLP {arch} relu ({P.num_params} params/task), batch {args.batch_size}, rule "
          f"layerwise_lr (SGD direction, theta log_lr {list(P.theta['log_lr'].shape)}), "
          f"meta-loss {META_LOSS}; float32; median of {args.repeats} round-robin repeats after "
          f"{args.warmup} warm-up")

    def draw():
        _reset_generators(P)
        for s in P.slots:
            sample_window(s, P.steps, True)

    runs = {
        "metaopt  Nested (vmap)": lambda: metaopt_grad(P, Nested(truncation=P.steps, use_vmap=True)),
        "metaopt  Nested (use_vmap=False)": lambda: metaopt_grad(P, Nested(truncation=P.steps, use_vmap=False)),
        "higher   innerloop_ctx, loop": lambda: higher_grad(P),
        "torchopt functional, loop": lambda: torchopt_grad(P),
    }
    times = time_interleaved(runs, args.repeats, args.warmup)
    t_draw = median(time_calls(draw, args.repeats, 1))
    base = median(times["metaopt  Nested (vmap)"])
    print(f"    {'implementation':36s} {'median':>12s}  {'[min..max] ms':>16s}  time / metaopt(vmap)")
    for name, ts in times.items():
        print(f"    {name:36s} {ms(median(ts))}  {spread(ts):>16s}  {median(ts) / base:6.2f}x")
    print(f"    (metaopt's times include drawing its batches from the slot generators: {ms(t_draw).strip()})")
    r_h = median(times["higher   innerloop_ctx, loop"]) / base
    r_o = median(times["torchopt functional, loop"]) / base
    r_v = median(times["metaopt  Nested (use_vmap=False)"]) / base
    print(f"    higher/metaopt   = {r_h:5.2f}x   (goal >= {GOAL_A:.0f}x: {verdict(r_h >= GOAL_A)})")
    print(f"    torchopt/metaopt = {r_o:5.2f}x   (goal >= {GOAL_A:.0f}x: {verdict(r_o >= GOAL_A)})")
    print(f"    what vmap buys: metaopt loop/vmap = {r_v:5.2f}x")

    d = gradient_diffs(args.tasks, args.steps, args.width, args.depth, args.batch_size, args.seed)
    print(f"    float64 check, max |meta-grad - metaopt(vmap)|: higher {d['higher']:.2e}, "
          f"torchopt {d['torchopt']:.2e}, metaopt loop {d['metaopt_loop']:.2e} "
          f"(max |meta-grad| = {d['max_abs_grad']:.3e})")

    if not args.no_mlp_rule:
        rule = make_rule("mlp")  # hidden 32, 2 layers: the default learned rule
        theta = {k: v.requires_grad_(True) for k, v in
                 rule.init_theta(None, torch.Generator().manual_seed(args.seed)).items()}
        slots = [dataclasses.replace(s, state=rule.init(s.params)) for s in P.slots]
        tm = time_interleaved({
            "vmap": lambda: metaopt_grad(P, Nested(truncation=P.steps), rule, theta, slots),
            "loop": lambda: metaopt_grad(P, Nested(truncation=P.steps, use_vmap=False), rule, theta, slots),
        }, args.repeats, args.warmup)
        t_v, t_l = tm["vmap"], tm["loop"]
        print(f"    context, rule mlp (hidden 32 x 2, no higher/torchopt equivalent), same tasks/batches:")
        print(f"    {'metaopt  Nested (vmap)':36s} {ms(median(t_v))}  {spread(t_v):>16s}  "
              f"{median(t_v) / base:6.2f}x")
        print(f"    {'metaopt  Nested (use_vmap=False)':36s} {ms(median(t_l))}  {spread(t_l):>16s}  "
              f"{median(t_l) / base:6.2f}x")


# ---------------------------------------------------------------------------------------------
# (b) LearnedOptimizer.step vs torch.optim.Adam.step
# ---------------------------------------------------------------------------------------------
def make_mlp(dims, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def bench_step(args):
    dims = [int(d) for d in args.arch.split(",")]
    model = make_mlp(dims, args.seed)
    n = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(128, dims[0], generator=g)
    y = torch.randint(0, dims[-1], (128,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()  # once; reused by every step below
    grads = [p.grad.detach().clone() for p in model.parameters()]
    print(f"\n(b) optimizer.step() only: MLP {'-'.join(map(str, dims))} ({n:,} params, "
          f"{len(grads)} tensors), float32; grads set once; median of {args.step_repeats} after "
          f"{args.step_warmup} warm-up steps")

    def fresh(make_opt):
        m = copy.deepcopy(model)
        for p, gr in zip(m.parameters(), grads):
            p.grad = gr.clone()
        return make_opt(m)

    def learned(rule):
        return lambda m: LearnedOptimizer(m.named_parameters(), rule=rule)

    opts = {
        "torch.optim.Adam(foreach=True)": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True),
        "torch.optim.Adam(foreach=False)": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, foreach=False),
        "LearnedOptimizer(rule adam)": learned(make_rule("adam", lr=1e-3)),
        "LearnedOptimizer(rule mlp h32x2)": learned(make_rule("mlp")),
        "LearnedOptimizer(rule mlp h8x2)": learned(make_rule("mlp", hidden_size=8)),
    }
    # One optimizer at a time (not round-robin): a 100 MB mlp-rule step between two Adam steps
    # would evict Adam's state from cache and flatter the ratio.
    times = {name: time_calls(fresh(make).step, args.step_repeats, args.step_warmup)
             for name, make in opts.items()}
    base = median(times["torch.optim.Adam(foreach=True)"])
    print(f"    {'optimizer':36s} {'median':>12s}  {'[min..max] ms':>16s}  time / Adam(foreach)")
    for name, ts in times.items():
        r = median(ts) / base
        goal = f"   (goal <= {GOAL_B:.0f}x: {verdict(r <= GOAL_B)})" if name.startswith("Learned") else ""
        print(f"    {name:36s} {ms(median(ts))}  {spread(ts):>16s}  {r:6.2f}x{goal}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.add_argument_group("(a) meta-gradient")
    a.add_argument("--tasks", type=int, default=8, help="meta-batch size")
    a.add_argument("--steps", type=int, default=20, help="inner steps (truncation)")
    a.add_argument("--width", type=int, default=64)
    a.add_argument("--depth", type=int, default=2, help="hidden layers")
    a.add_argument("--batch-size", type=int, default=64)
    a.add_argument("--repeats", type=int, default=7)
    a.add_argument("--warmup", type=int, default=1)
    a.add_argument("--no-mlp-rule", action="store_true", help="skip the mlp-rule context rows")
    b = ap.add_argument_group("(b) optimizer step")
    b.add_argument("--arch", default="784,1024,256,10", help="MLP layer sizes")
    b.add_argument("--step-repeats", type=int, default=30)
    b.add_argument("--step-warmup", type=int, default=5)
    ap.add_argument("--only", choices=("a", "b"), help="run one part only")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    print(header("metaopt core benchmark (benchmarks/bench_core.py)", threads))
    if args.only in (None, "a"):
        bench_meta_gradient(args)
    if args.only in (None, "b"):
        bench_step(args)


if __name__ == "__main__":
    main()
