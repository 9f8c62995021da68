"""One rank of a multi-process meta-training run, for tests/test_distributed.py.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m tests.dist_worker OUT STEPS
        [--scheme nested|pes] [--die-at STEP] [--resume]

``--die-at`` kills this process (SIGKILL, no clean-up) when it reaches that outer step: the test's
stand-in for a machine dying mid-run.
"""
import argparse
import os
import signal

import torch

from metaopt.meta import MetaTrainer, TrainConfig, make_scheme
from metaopt.meta.distributed import Distributed
from metaopt.rules import make_rule
from tests.helpers import TinyFamily

SCHEMES = {"nested": dict(truncation=4), "pes": dict(truncation=4, num_samples=2, sigma=0.05)}


def build(out, steps, scheme, dist=None, meta_batch=4, family="tiny"):
    torch.set_num_threads(1)
    if family == "poison":  # every third task has a NaN input: slots diverge and are reset
        from tests.test_trainer import PoisonFamily
        fam = PoisonFamily()
    else:
        fam = TinyFamily()
    cfg = TrainConfig(outer_steps=steps, meta_batch=meta_batch, horizon=8, outer_lr=1e-2, seed=3,
                      checkpoint_every=2, progress=False, dtype="float64")
    return MetaTrainer(make_rule("mlp", hidden_size=8), fam, make_scheme(scheme, **SCHEMES[scheme]),
                       cfg, out, dist=dist)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("steps", type=int)
    ap.add_argument("--scheme", default="nested")
    ap.add_argument("--die-at", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--family", default="tiny")
    a = ap.parse_args()
    dist = Distributed.from_env("gloo", timeout_s=60)
    trainer = build(a.out, a.steps, a.scheme, dist, family=a.family)
    if a.resume:
        trainer.load_checkpoint()
    if a.die_at:
        real = trainer.train_step

        def step():
            if trainer.outer_step + 1 == a.die_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real()
        trainer.train_step = step
    trainer.run()
    dist.shutdown()


if __name__ == "__main__":
    main()
