"""Speedup over lr-tuned Adam of rule checkpoints on a few design-half problems (seed 0, S =
1,000): the quick check used to compare meta-training runs and their intermediate checkpoints
while choosing a recipe. Never point it at the final half.

    python benchmarks/design_probe.py wine_mlp,diabetes_mlp,cancer_mlp_bce,digits_linear CKPT [CKPT ...]
    python benchmarks/design_probe.py --seeds 0,1 PROBLEMS CKPT [CKPT ...]   (IQM over problem x seed)

Adam's reference runs come from (and go to) ``runs/adam_cache``, as for ``metaopt-eval
--config-name=suite``; each CKPT is a rule checkpoint directory or a shipped name.
"""
import sys
from pathlib import Path

import torch

from metaopt.meta.speedup import ADAM_GRID, adam_curves, envelope, iqm, speedup, train_curve
from metaopt.optim import LearnedOptimizer
from metaopt.tasks import make_family
from metaopt.tasks.suite import HELDOUT


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    seeds = [0]
    if argv[:1] == ["--seeds"]:
        seeds, argv = [int(x) for x in argv[1].split(",")], argv[2:]
    if len(argv) < 2:
        raise SystemExit(__doc__)
    torch.set_num_threads(1)
    problems, ckpts = argv[0].split(","), argv[1:]
    bad = [p for p in problems if p not in HELDOUT]
    if bad:
        raise SystemExit(f"error: {bad[0]!r} is not a design-half problem ({', '.join(HELDOUT)})")
    res = {c: [] for c in ckpts}
    for prob, seed in [(p, s) for p in problems for s in seeds]:
        task = make_family("suite", problem=prob).sample_seeded(seed)
        adams = adam_curves(task, prob, seed, 4000, ADAM_GRID, 10, 1024, 1000,
                            Path("runs/adam_cache"))
        env_steps, env_losses = envelope(adams)
        row = []
        for ck in ckpts:
            c = train_curve(task, lambda n, ck=ck: LearnedOptimizer.from_pretrained(n, ck), 1000,
                            seed, 10, 1024)
            sp = speedup(c.loss_at(1000), env_steps, env_losses, 1000)
            res[ck].append(sp)
            row.append(f"{ck}={sp:.2f}")
        print(prob if seeds == [0] else f"{prob} (seed {seed})", " ".join(row), flush=True)
    for ck in ckpts:
        print(f"{ck}: IQM {iqm(res[ck]):.3f}, min {min(res[ck]):.2f}")


if __name__ == "__main__":
    main()
