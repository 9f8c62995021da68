"""Local vs global meta-gradients: peak memory and time of one meta-gradient, side by side.

    python benchmarks/bench_local.py                      # 4-block MLP (width 256) on digits, T=20,50,100
    python benchmarks/bench_local.py --truncations 20 --repeats 1

Contenders (same rule ``pertensor``, same slot, same window of batches, ``valid_mean`` meta-loss):

* ``global``       -- today's nested scheme on the plain MLP (end loss, backprop through the window);
* ``global+ckpt``  -- the same with ``checkpoint=True`` (each inner step recomputed in backward);
* ``local``        -- ``local.inner=local local.meta=local``: heads after hidden layers 1-3, the
  window run once without a graph, then each block's part re-run and backpropagated in turn.

Peak memory: one extra (untimed) call under ``torch.profiler.profile(profile_memory=True)``; the
running sum of the per-op net CPU tensor allocations in event start order, its maximum (MB =
2**20 bytes) -- the method of benchmarks/bench_schemes.py (tensor storage only; a transient
inside one op is not resolved). CPU only. Times: wall clock without the profiler, median of ``--repeats`` after one warm-up.
The goal: local peak <= 1/2 of global at T=50, growing no faster than global's with T.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import header, peak_mb, set_threads  # noqa: E402

from metaopt.meta import Nested  # noqa: E402
from metaopt.meta.local import LocalMeta  # noqa: E402
from metaopt.meta.slots import new_slot  # noqa: E402
from metaopt.rules import make_rule  # noqa: E402
from metaopt.tasks import make_family  # noqa: E402
from metaopt.tasks.local import LocalFamily  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--truncations", type=int, nargs="+", default=[20, 50, 100])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    threads = set_threads(a.threads)
    dev = torch.device("cpu")
    print(header("local vs global meta-gradients (benchmarks/bench_local.py)", threads))
    print(f"task: digits MLP, {a.blocks} hidden layers of width {a.width} (= {a.blocks} blocks), "
          f"batch {a.batch_size}, float32, device {dev}; rule pertensor; meta-loss valid_mean")
    base = make_family("digits_mlp", widths=[a.width], depths=[a.blocks], activations=["relu"],
                       batch_sizes=[a.batch_size])
    local = LocalFamily(base, inner="local")
    rule = make_rule("pertensor")

    def slot_of(fam):
        return new_slot(fam, rule, 0, 10 ** 6)

    theta = {k: v.requires_grad_(True) for k, v in
             rule.init_theta(None, torch.Generator().manual_seed(0)).items()}
    print(f"peak MB: torch.profiler running sum of CPU tensor allocations"
          f"; time: median of {a.repeats} after a warm-up")
    print(f"{'T':>4s} {'method':12s} {'time s':>8s} {'peak MB':>9s} {'peak/global':>12s} "
          f"{'time/global':>12s}")
    rows = {}
    for T in a.truncations:
        cont = {"global": (Nested(T), base), "global+ckpt": (Nested(T, checkpoint=True), base),
                "local": (LocalMeta(Nested(T), "local"), local)}
        res = {}
        for name, (scheme, fam) in cont.items():
            slot = slot_of(fam)

            def call():
                # the slot's generator is rewound: every call draws the same window
                slot.gen.manual_seed(123)
                return scheme.meta_gradient(rule, theta, [slot], "valid_mean")
            call()
            ts = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                call()
                ts.append(time.perf_counter() - t0)
            res[name] = (statistics.median(ts), peak_mb(call))
        for name, (t, mb) in res.items():
            print(f"{T:4d} {name:12s} {t:8.3f} {mb:9.1f} {mb / res['global'][1]:12.3f} "
                  f"{t / res['global'][0]:12.3f}", flush=True)
        rows[T] = res
    if 50 in rows:
        r = rows[50]["local"][1] / rows[50]["global"][1]
        print(f"goal at T=50: local peak <= 1/2 global: {r:.3f} -> {'met' if r <= 0.5 else 'NOT met'}")
    if len(rows) > 1:
        Ts = sorted(rows)
        g = rows[Ts[-1]]["global"][1] / rows[Ts[0]]["global"][1]
        loc = rows[Ts[-1]]["local"][1] / rows[Ts[0]]["local"][1]
        print(f"growth T={Ts[0]}->{Ts[-1]}: global peak x{g:.2f}, local peak x{loc:.2f} -> "
              f"local grows {'no faster' if loc <= g * 1.05 else 'FASTER'} than global")
    return rows


if __name__ == "__main__":
    main()
