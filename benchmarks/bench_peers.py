"""Seconds per outer step of meta-training, metaopt vs google/learned_optimization (JAX), on the
same problem. Run ``python benchmarks/bench_peers.py -h``.

The problem: meta-train a per-parameter MLP learned optimizer (hidden 32, 2 layers;
metaopt's ``mlp`` rule, the peer's ``MLPLOpt``) on an MLP 64-32-10 (relu) classifying sklearn's
8x8 digits, batch 64; 8 tasks (slots) x 20-step truncations of 500-step inner runs (random
initial offsets); meta-loss = loss on a fresh validation batch after each inner step, averaged
over the window; outer optimizer Adam; float32. One outer step =

* nested truncated backprop -- metaopt ``Nested(truncation=20)``; peer ``TruncatedGrad``
  (``unroll_length=20, steps_per_jit=20``).
* PES -- one antithetic pair per task (16 perturbed runs), sigma 0.01: metaopt
  ``PES(truncation=20, num_samples=1)``, with ``theta_run=False`` (2 runs per slot; the pair mean
  is the logged run) and with the default ``theta_run=True`` (a third, unperturbed run per slot
  for exact logging); ``--compile`` adds ``theta_run=False, compile=True``; peer
  ``TruncatedPES(trunc_length=20, steps_per_jit=20, std=0.01)``.

metaopt is timed through ``MetaTrainer.train_step`` (scheme + outer Adam + slot resets), the peer
through ``SingleMachineGradientLearner.update`` over a ``VectorizedLOptTruncatedStep`` (its own
data pipeline: numpy batches from a Python iterator, as its tasks do). Both get one CPU thread
(``torch.set_num_threads(1)``; ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1``). Contenders are timed round-robin (one outer step of each per
repeat, medians), after warm-up (the peer's jit compile, metaopt's first calls).

The peer runs in this process when ``jax`` and ``learned_optimization`` import (install: see
``PEER_INSTALL``); otherwise its figures are read from ``PEER_JSON`` (written by
``--write-peer-json`` on a machine where it ran), whose ratios are then across runs, not
interleaved. Differences that remain: the peer's MLPLOpt has 19 inputs per coordinate (6
momenta, 11 time features), metaopt's ``mlp`` 21 (4 momenta, 8 time features); its data come from
a Python iterator per task and step, metaopt's from per-slot torch generators.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median, set_threads, spread  # noqa: E402

from metaopt.meta import make_scheme  # noqa: E402
from metaopt.meta.trainer import MetaTrainer, TrainConfig  # noqa: E402
from metaopt.rules import make_rule  # noqa: E402
from metaopt.tasks import make_family  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PEER_JSON = os.path.join(HERE, "results", "peers_learned_optimization.json")
PEER_COMMIT = "32186aa46a96f26ba0625755f93c55659adcd523"
PEER_INSTALL = ("pip install jax flax dm-haiku optax chex gin-config && "
                "pip install --no-deps -e <google/learned_optimization at " + PEER_COMMIT[:7] + ">")
GOAL = 2.0  # metaopt >= 2x faster than the peer, nested and PES
TASKS, TRUNC, HORIZON, BATCH, HIDDEN = 8, 20, 500, 64, 32


# ---------------------------------------------------------------------------------------------
# metaopt
# ---------------------------------------------------------------------------------------------
def metaopt_step(scheme_name: str, seed: int, **scheme_kw):
    """A zero-argument callable: one outer step of a MetaTrainer on the problem."""
    family = make_family("digits_mlp", widths=[HIDDEN], depths=[1], activations=["relu"],
                         batch_sizes=[BATCH])
    cfg = TrainConfig(meta_batch=TASKS, horizon=HORIZON, outer_lr=3e-3, meta_loss="valid_mean",
                      seed=seed, progress=False, dtype="float32")
    tr = MetaTrainer(make_rule("mlp", hidden_size=HIDDEN, num_layers=2), family,
                     make_scheme(scheme_name, truncation=TRUNC, **scheme_kw), cfg,
                     tempfile.mkdtemp(prefix="bench_peers_"))
    return tr.train_step


# ---------------------------------------------------------------------------------------------
# google/learned_optimization, built from its own pieces
# ---------------------------------------------------------------------------------------------
class _Stub(types.ModuleType):
    """Stand-in for tensorflow / tensorflow_datasets: the peer's summary and dataset modules import
    them at top level; nothing here calls into them."""

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Stub(f"{self.__name__}.{attr}")

    def __call__(self, *args, **kwargs):
        return None


def import_peer():
    """(jax, modules) or raises ImportError with the reason."""
    import jax
    import flax  # noqa: F401
    import flax.io  # noqa: F401  (probes for tensorflow: import before the stand-ins)
    import flax.training.checkpoints  # noqa: F401
    import flax.training.prefetch_iterator  # noqa: F401
    for name in ("tensorflow", "tensorflow.compat", "tensorflow.compat.v2", "tensorflow_datasets"):
        sys.modules.setdefault(name, _Stub(name))
    if not hasattr(jax, "tree_map"):  # removed from newer jax; the peer still calls it
        jax.tree_map = jax.tree_util.tree_map
    import logging
    logging.getLogger("absl").setLevel(logging.ERROR)  # "Oryx not found", "no tensorflow" notices
    from learned_optimization.learned_optimizers import mlp_lopt
    from learned_optimization.optimizers import base as opt_base
    from learned_optimization.outer_trainers import (gradient_learner, lopt_truncated_step,
                                                     truncated_grad, truncated_pes,
                                                     truncation_schedule)
    from learned_optimization.tasks import base as tasks_base
    from learned_optimization.tasks.datasets import base as datasets_base
    return jax, dict(mlp_lopt=mlp_lopt, opt_base=opt_base, gradient_learner=gradient_learner,
                     lopt_truncated_step=lopt_truncated_step, truncated_grad=truncated_grad,
                     truncated_pes=truncated_pes, truncation_schedule=truncation_schedule,
                     tasks_base=tasks_base, datasets_base=datasets_base)


def peer_step(jax, m, estimator: str, seed: int):
    import haiku as hk
    import jax.numpy as jnp
    import numpy as np
    from sklearn.datasets import load_digits

    X, Y = load_digits(return_X_y=True)
    X, Y = (X / 16.0).astype(np.float32), Y.astype(np.int32)

    def batches(s):
        rng = np.random.RandomState(s)
        while True:
            idx = rng.randint(0, len(X), BATCH)
            yield {"image": X[idx], "label": Y[idx]}

    class DigitsMLP(m["tasks_base"].Task):
        datasets = m["datasets_base"].Datasets(batches(seed), batches(seed + 1),
                                               batches(seed + 2), batches(seed + 3))

        def __init__(self):
            self._mod = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([HIDDEN, 10])(x)))

        def init(self, key):
            return self._mod.init(key, jnp.zeros([1, 64]))

        def loss(self, params, key, data):
            logits = self._mod.apply(params, data["image"])
            onehot = jax.nn.one_hot(data["label"], 10)
            return jnp.mean(-jnp.sum(onehot * jax.nn.log_softmax(logits), -1))

    family = m["tasks_base"].single_task_to_family(DigitsMLP())
    lopt = m["mlp_lopt"].MLPLOpt(hidden_size=HIDDEN, hidden_layers=2, compute_summary=False)
    step = m["lopt_truncated_step"].VectorizedLOptTruncatedStep(
        family, lopt, m["truncation_schedule"].ConstantTruncationSchedule(HORIZON),
        num_tasks=TASKS, random_initial_iteration_offset=HORIZON, meta_loss_split="outer_valid")
    if estimator == "pes":
        est = m["truncated_pes"].TruncatedPES(step, trunc_length=TRUNC, std=0.01,
                                              steps_per_jit=TRUNC)
    else:
        est = m["truncated_grad"].TruncatedGrad(step, unroll_length=TRUNC, steps_per_jit=TRUNC)
    learner = m["gradient_learner"].SingleMachineGradientLearner(lopt, [est],
                                                                 m["opt_base"].Adam(3e-3))
    box = [learner.init(jax.random.PRNGKey(seed))]
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 1_000_000))

    def one():
        box[0], loss, _ = learner.update(box[0], next(keys), with_metrics=False)
        jax.block_until_ready(loss)
    return one


# ---------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9, help="timed outer steps per contender")
    ap.add_argument("--warmup", type=int, default=2, help="untimed outer steps first (jit etc.)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-peer", action="store_true", help="do not import the peer: use PEER_JSON")
    ap.add_argument("--compile", action="store_true",
                    help="also time PES with compile=True (torch.compile of the single-task step; "
                         "its compile happens in the warm-up)")
    ap.add_argument("--write-peer-json", action="store_true",
                    help=f"store the peer's medians in {os.path.relpath(PEER_JSON)}")
    args = ap.parse_args(argv)
    threads = set_threads(1)
    load = os.getloadavg()
    print("== metaopt vs google/learned_optimization: seconds per outer step "
          "(benchmarks/bench_peers.py) ==")
    print(f"torch {torch.__version__} | torch threads {threads} | cpu cores {os.cpu_count()} | "
          f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"problem: MLP 64-{HIDDEN}-10 relu on digits, batch {BATCH}; rule per-parameter MLP "
          f"hidden {HIDDEN} x 2; {TASKS} tasks x {TRUNC}-step truncations of {HORIZON}-step runs; "
          "meta-loss valid_mean; float32; PES: 1 antithetic pair per task, sigma 0.01")

    runs = {
        "metaopt nested": metaopt_step("nested", args.seed),
        "metaopt pes (theta_run=False)": metaopt_step("pes", args.seed, num_samples=1,
                                                      theta_run=False),
        "metaopt pes (theta_run=True)": metaopt_step("pes", args.seed, num_samples=1,
                                                     theta_run=True),
    }
    if args.compile:
        runs["metaopt pes (theta_run=False, compile)"] = metaopt_step(
            "pes", args.seed, num_samples=1, theta_run=False, compile=True)
    peer_live, peer_note = False, ""
    if not args.no_peer:
        try:
            jax, mods = import_peer()
            runs["learned_optimization TruncatedGrad"] = peer_step(jax, mods, "grad", args.seed)
            runs["learned_optimization TruncatedPES"] = peer_step(jax, mods, "pes", args.seed)
            peer_live = True
            print(f"peer: learned_optimization imported from "
                  f"{os.path.dirname(mods['tasks_base'].__file__).rsplit('/tasks', 1)[0]}, jax "
                  f"{jax.__version__} on {jax.devices()[0].platform}, "
                  f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}")
        except Exception as e:  # ImportError, or an API drift in the peer / jax
            peer_note = f"{type(e).__name__}: {e}"
            print(f"peer not runnable here ({peer_note}); using {os.path.relpath(PEER_JSON)}")

    print(f"timing: {args.warmup} warm-up outer steps each, then {args.repeats} round-robin "
          f"repeats (one outer step of every contender per repeat); median seconds")
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        for fn in runs.values():
            fn()
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: median(v) for k, v in times.items()}
    print(f"\n  {'contender':40s} {'s / outer step':>15s}  {'[min..max] ms':>18s}")
    for k, v in times.items():
        print(f"  {k:40s} {med[k]:15.4f}  {spread(v):>18s}")

    if peer_live:
        peer = {"nested": med["learned_optimization TruncatedGrad"],
                "pes": med["learned_optimization TruncatedPES"], "source": "this run (interleaved)"}
        if args.write_peer_json:
            os.makedirs(os.path.dirname(PEER_JSON), exist_ok=True)
            with open(PEER_JSON, "w") as f:
                json.dump({"peer": "google/learned_optimization", "commit": PEER_COMMIT,
                           "install": PEER_INSTALL,
                           "command": " ".join(["python benchmarks/bench_peers.py"] +
                                               list(sys.argv[1:] if argv is None else argv)),
                           "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS"),
                           "seconds_per_outer_step": {"nested_truncated_grad": peer["nested"],
                                                      "pes": peer["pes"]},
                           "metaopt_same_run": {k: med[k] for k in med if k.startswith("metaopt")},
                           "load_average_at_start": list(load),
                           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())},
                          f, indent=2)
            print(f"  (peer figures written to {os.path.relpath(PEER_JSON)})")
    else:
        with open(PEER_JSON) as f:
            rec = json.load(f)
        sec = rec["seconds_per_outer_step"]
        peer = {"nested": sec["nested_truncated_grad"], "pes": sec["pes"],
                "source": f"{os.path.relpath(PEER_JSON)} (commit {rec['commit'][:7]}, "
                          f"{rec['date_utc']}; a different run: compare with care)"}
        print(f"  {'learned_optimization TruncatedGrad':40s} {peer['nested']:15.4f}  (recorded)")
        print(f"  {'learned_optimization TruncatedPES':40s} {peer['pes']:15.4f}  (recorded)")

    print(f"\npeer figures: {peer['source']}")
    rows = [("nested", "metaopt nested"), ("pes", "metaopt pes (theta_run=False)"),
            ("pes", "metaopt pes (theta_run=True)")]
    if args.compile:
        rows.append(("pes", "metaopt pes (theta_run=False, compile)"))
    for key, name in rows:
        r = peer[key] / med[name]
        print(f"  peer / {name:34s} = {r:5.2f}x  (goal >= {GOAL:.0f}x: "
              f"{'MET' if r >= GOAL else 'MISSED'})")
    print(f"total wall time {time.perf_counter() - t0:.0f} s; load average now "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
