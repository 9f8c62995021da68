"""Memory/time of one meta-gradient through a window of T inner steps, per meta-gradient scheme,
against the same nested computation written with higher. Run ``python benchmarks/bench_schemes.py -h``.

One digits-MLP task (64-32-10 relu, batch 32, float32), learned rule ``layerwise_lr`` (SGD
direction, theta = log_lr [num_steps, 4 tensors]), meta-loss ``valid_mean`` (mean validation loss
after each of the T steps), theta held fixed. For each window length T:

* nested           -- ``Nested(truncation=T).meta_gradient``: backprop through the T-step unroll.
* nested+ckpt      -- ``Nested(truncation=T, checkpoint=True)``: each step recomputed in backward.
* interleaved fwd  -- ``Interleaved(mode="forward")`` called T times (one inner step each, slot
                      params/state/sensitivities written back as the MetaTrainer does): its T
                      per-step exact meta-gradients. Time and peak memory are over all T calls.
* continuous adj.  -- ``Continuous(window=T, method=..., gradient="adjoint", substeps=1,
                      store_every=...)`` (torchdiffeq.odeint_adjoint).
* higher           -- ``higher.innerloop_ctx`` + ``torch.optim.SGD`` with one param group per
                      tensor, per-step rates via ``diffopt.step(loss, override={"lr": [...]})``
                      (as in bench_core.py), then ``torch.autograd.grad`` of the mean valid loss.
* ``valid_last`` rows -- the meta-loss of the last step only: nested, the continuous adjoint with
                      ``store_every=T`` (it stores the window's two ends; the scheme keeps only
                      the last validation batch) and higher (its last step's valid loss).
                      Their peak/higher is against higher valid_last. A second continuous row
                      uses ``store_every=--store-every`` (10): over hundreds of steps the
                      float32 backward reconstruction from the window's two ends can overflow
                      (its grad err column shows nan), re-anchoring every 10 steps keeps it finite.

metaopt's calls draw their window of batches inside the call (counted in their peak; for the
continuous adjoint with valid_last the training batches are redrawn on demand in blocks of
~sqrt(T) steps and only the last validation batch is kept); higher is fed the same batches drawn
beforehand (not counted).

Peak memory: one extra (untimed) call per method under ``torch.profiler.profile(
profile_memory=True)``; every CPU allocation/free the profiler records is attributed to the op that
made it (``self_cpu_memory_usage``, plus the profiler's bare ``[memory]`` events); the running sum
of those in event start order is the live tensor memory allocated since the call began, and its
maximum is the reported peak (MB = 2**20 bytes). It counts tensor storage only (not Python
objects) and sees a net figure per op (a transient inside a single op is not resolved).
Times are wall clock without the profiler, median of ``--repeats`` after one warm-up.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import header, median, peak_mb, set_threads  # noqa: E402

import higher  # noqa: E402

from metaopt.meta.continuous import Continuous  # noqa: E402
from metaopt.meta.interleaved import Interleaved  # noqa: E402
from metaopt.meta.engine import sample_window  # noqa: E402
from metaopt.meta.nested import Nested  # noqa: E402
from metaopt.meta.slots import new_slot  # noqa: E402
from metaopt.rules import make_rule  # noqa: E402
from metaopt.tasks import make_family  # noqa: E402
from metaopt.types import FlatSpec  # noqa: E402

META_LOSS = "valid_mean"
GOAL = 0.25  # at T=200: forward-mode and adjoint peak memory <= 1/4 of higher's


class Problem:
    def __init__(self, T, rule_steps, width, batch_size, seed):
        self.T = T
        family = make_family("digits_mlp", widths=[width], depths=[1], activations=["relu"],
                             batch_sizes=[batch_size])
        self.rule = make_rule("layerwise_lr", lr=0.1, num_steps=rule_steps, direction="sgd")
        self.slot = new_slot(family, self.rule, seed, horizon=10 ** 9)
        self.params0 = {k: v.clone() for k, v in self.slot.params.items()}
        self.state0 = {k: v.clone() for k, v in self.slot.state.items()}
        self.gen0 = self.slot.gen.get_state()
        self.batches = sample_window(self.slot, T, True)  # what Nested/Continuous draw
        self.reset()
        spec = FlatSpec.of(self.params0)
        g = torch.Generator().manual_seed(seed + 1)
        log_lr = math.log(0.1) + 0.3 * torch.randn(rule_steps, spec.num_tensors, generator=g)
        self.theta = {"log_lr": log_lr.requires_grad_(True)}
        self.module = copy.deepcopy(self.slot.task.module)
        for p in self.module.parameters():
            p.requires_grad_(True)
        if [n for n, _ in self.module.named_parameters()] != list(spec.names):
            raise RuntimeError("parameter order differs between the module and the flat spec")

    def reset(self):
        s = self.slot
        s.params = {k: v.clone() for k, v in self.params0.items()}
        s.state = {k: v.clone() for k, v in self.state0.items()}
        s.gen.set_state(self.gen0)
        s.extra, s.step = {}, 0


def run_scheme(P: Problem, scheme, meta_loss: str = META_LOSS):
    P.reset()
    return scheme.meta_gradient(P.rule, P.theta, [P.slot], meta_loss).grads["log_lr"]


def run_interleaved(P: Problem, scheme: Interleaved):
    P.reset()
    s, total = P.slot, None
    for _ in range(P.T):  # theta fixed: each call is one inner step and its exact meta-gradient
        out = scheme.meta_gradient(P.rule, P.theta, [s], META_LOSS)
        s = out.slots[0]
        g = out.grads["log_lr"]
        total = g if total is None else total + g
    return total / P.T


def run_higher(P: Problem, last_only: bool = False):
    log_lr = P.theta["log_lr"]
    lrs = torch.exp(log_lr)
    n_rows = lrs.shape[0]
    module = P.module
    opt = torch.optim.SGD([{"params": [p]} for p in module.parameters()], lr=0.1)
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(P.params0[n])
    tb, vb = P.batches
    with higher.innerloop_ctx(module, opt, copy_initial_weights=True) as (fmodel, diffopt):
        losses = []
        for t in range(P.T):
            loss = fmodel(tb[0][t], tb[1][t])
            diffopt.step(loss, override={"lr": list(lrs[min(t, n_rows - 1)].unbind())})
            if not last_only or t == P.T - 1:
                losses.append(fmodel(vb[0][t], vb[1][t]))
        total = torch.stack(losses).mean()
    return torch.autograd.grad(total, log_lr)[0]


def time_median(fn, repeats) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--windows", default="10,50,200", help="window lengths T, comma separated")
    ap.add_argument("--rule-steps", type=int, default=10,
                    help="layerwise_lr num_steps (rows of log_lr; step t uses row min(t, n-1)); "
                         "0 = T. Forward mode costs one JVP per meta-parameter (4 x this)")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--method", default="euler", choices=("euler", "rk4"),
                    help="continuous scheme's fixed-grid solver (substeps=1)")
    ap.add_argument("--store-every", type=int, default=10,
                    help="second continuous valid_last row: keep the solution every n steps (with "
                         "store_every=T the float32 backward reconstruction over long windows can "
                         "give NaN; re-anchoring every n steps keeps it finite)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    windows = [int(x) for x in args.windows.split(",")]
    print(header("metaopt meta-gradient schemes: memory and time vs window (benchmarks/bench_schemes.py)",
                 threads))
    print(f"one digits-MLP task 64-{args.width}-10 relu, batch {args.batch_size}, float32; rule "
          f"layerwise_lr (sgd), meta-loss {META_LOSS}, theta fixed")
    print("peak MB: torch.profiler(profile_memory=True), max over the call of the running sum of "
          "per-op net CPU tensor allocations (self_cpu_memory_usage) in event start order; "
          "tensor storage only, one untimed call")
    print(f"time: wall clock without the profiler, median of {args.repeats} after 1 warm-up; "
          "interleaved = all T one-step calls; grad err = max|g - g_nested| / max|g_nested| "
          "(interleaved: mean of its T per-step gradients; it draws its batches per step, in a "
          "different order, so no error is shown)")
    rows = {}
    for T in windows:
        rs = args.rule_steps or T
        P = Problem(T, rs, args.width, args.batch_size, args.seed)
        cont = Continuous(window=T, method=args.method, gradient="adjoint", substeps=1,
                          store_every=1)
        cont_last = Continuous(window=T, method=args.method, gradient="adjoint", substeps=1,
                               store_every=T)
        se = min(args.store_every, T)
        cont_last_k = Continuous(window=T, method=args.method, gradient="adjoint", substeps=1,
                                 store_every=se)
        # name -> (call, meta-loss it computes)
        methods = {
            "nested (backprop)": (lambda: run_scheme(P, Nested(truncation=T)), META_LOSS),
            "nested checkpoint": (lambda: run_scheme(P, Nested(truncation=T, checkpoint=True)),
                                  META_LOSS),
            "interleaved forward": (lambda: run_interleaved(P, Interleaved(mode="forward")),
                                    META_LOSS),
            f"continuous adjoint {args.method}": (lambda: run_scheme(P, cont), META_LOSS),
            "higher": (lambda: run_higher(P), META_LOSS),
            "nested valid_last": (lambda: run_scheme(P, Nested(truncation=T), "valid_last"),
                                  "valid_last"),
            f"cont. adj. {args.method} valid_last": (
                lambda: run_scheme(P, cont_last, "valid_last"), "valid_last"),
            f"  same, store_every={args.store_every}": (
                lambda: run_scheme(P, cont_last_k, "valid_last"), "valid_last"),
            "higher valid_last": (lambda: run_higher(P, last_only=True), "valid_last"),
        }
        refs = {META_LOSS: methods["nested (backprop)"][0](),
                "valid_last": methods["nested valid_last"][0]()}
        print(f"\nT = {T}  (theta log_lr [{rs}, 4] = {4 * rs} meta-parameters; continuous: "
              f"method={args.method}, substeps=1; store_every=1 for {META_LOSS} (the adjoint "
              f"stores the solution at every step), store_every=T={T} for valid_last (only the "
              f"window's two ends))")
        print(f"  {'method':32s} {'meta-loss':>10s} {'time ms':>10s} {'peak MB':>9s} "
              f"{'peak/higher':>12s} {'grad err':>9s}")
        res = {}
        for name, (fn, ml) in methods.items():
            g = fn()
            ref = refs[ml]
            err = ("-" if name.startswith("interleaved")
                   else f"{float((g - ref).abs().max()) / float(ref.abs().max()):.1e}")
            res[name] = (time_median(fn, args.repeats), peak_mb(fn), err, ml)
        for name, (t, m, err, ml) in res.items():
            hp = res["higher valid_last" if ml == "valid_last" else "higher"][1]
            print(f"  {name:32s} {ml:>10s} {t * 1e3:10.1f} {m:9.2f} {m / hp:11.2f}x {err:>9s}")
        rows[T] = res
    print(f"\nproject goal: at T=200 forward-mode sensitivities and the continuous adjoint use "
          f"<= 1/4 of higher's peak memory (each against higher on the same meta-loss)")
    if 200 not in rows:
        print("  not evaluated: T=200 not among --windows")
    else:
        res = rows[200]
        for name, ref in (("interleaved forward", "higher"),
                          (f"continuous adjoint {args.method}", "higher"),
                          (f"cont. adj. {args.method} valid_last", "higher valid_last"),
                          (f"  same, store_every={args.store_every}", "higher valid_last")):
            r = res[name][1] / res[ref][1]
            print(f"  {name:32s} {res[name][1]:8.2f} MB / {ref} {res[ref][1]:.2f} MB = {r:.3f}  "
                  f"{'MET' if r <= GOAL else 'MISSED'}")
    if len(rows) > 1:
        print("peak MB vs T (flat = independent of the window length):")
        for name in ("interleaved forward", f"continuous adjoint {args.method}",
                     f"cont. adj. {args.method} valid_last", f"  same, store_every={args.store_every}",
                     "higher", "higher valid_last"):
            print(f"  {name:32s} " + "  ".join(f"T={T}: {rows[T][name][1]:.2f}" for T in rows))

if __name__ == "__main__":
    main()
