"""learned_optimization's speedup-over-tuned-Adam metric, and the held-out suite command."""
import math
import subprocess
import sys

import pytest
import torch

from metaopt.meta.speedup import Curve, envelope, iqm, speedup, train_curve
from metaopt.tasks import HELDOUT, make_family


def test_envelope_is_the_pointwise_min_of_running_mins():
    a = Curve("a", "t", 0, [0, 10, 20, 30], [4.0, 2.0, 3.0, 1.0])   # running min 4 2 2 1
    b = Curve("b", "t", 0, [0, 10, 20, 30], [4.0, 3.0, 1.5, 5.0])   # running min 4 3 1.5 1.5
    steps, env = envelope([a, b])
    assert steps == [0, 10, 20, 30] and env == [4.0, 2.0, 1.5, 1.0]
    # reaching 1.5 takes the envelope 20 steps: an optimizer there at S = 10 is 2x faster
    assert speedup(1.5, steps, env, S=10) == 2.0
    assert speedup(2.0, steps, env, S=20) == 0.5
    assert speedup(0.5, steps, env, S=10) == 3.0      # never reached: capped at k = 30 / 10
    assert speedup(math.inf, steps, env, S=10) == 0.0
    with pytest.raises(ValueError):
        envelope([a, Curve("c", "t", 0, [0, 5], [1.0, 1.0])])


def test_tuned_adam_scores_at_most_one():
    # the envelope at S is <= every single curve's running min at S
    c1 = Curve("1", "t", 0, [0, 1, 2, 3, 4], [5, 4, 3, 2, 1])
    c2 = Curve("2", "t", 0, [0, 1, 2, 3, 4], [5, 2, 1.5, 1.4, 1.3])
    steps, env = envelope([c1, c2])
    for c in (c1, c2):
        assert speedup(c.loss_at(2), steps, env, S=2) <= 1.0


def test_iqm_drops_the_outer_quarters():
    assert iqm([0.0, 1.0, 1.0, 100.0]) == 1.0
    assert iqm([1.0, 2.0, 3.0]) == 2.0
    assert iqm(list(range(10))) == pytest.approx(sum(range(2, 8)) / 6)


def test_train_curve_flags_divergence():
    task = make_family("suite", problem="wine_mlp").sample_seeded(0)

    class Poison(torch.optim.SGD):        # a NaN weight from step 12 on
        def step(self, closure=None):
            loss = super().step(closure)
            self.n = getattr(self, "n", 0) + 1
            if self.n >= 12:
                with torch.no_grad():
                    self.param_groups[0]["params"][0].fill_(float("nan"))
            return loss

    c = train_curve(task, lambda named: Poison([p for _, p in named], lr=0.01),
                    steps=30, seed=0, eval_every=5)
    assert c.diverged and c.steps == [0, 5, 10, 15, 20, 25, 30]
    assert math.isfinite(c.losses[2]) and all(math.isinf(v) for v in c.losses[3:])
    ok = train_curve(task, lambda named: torch.optim.Adam([p for _, p in named], lr=1e-2),
                     steps=30, seed=0, eval_every=5, valid_steps=(30,))
    assert not ok.diverged and ok.loss_at(30) < ok.losses[0] and "30" in ok.valid_at


@pytest.mark.parametrize("problem", sorted(HELDOUT))
def test_heldout_problems_build_and_train(problem):
    task = make_family("suite", problem=problem).sample_seeded(0)
    c = train_curve(task, lambda named: torch.optim.Adam([p for _, p in named], lr=3e-3),
                    steps=6, seed=0, eval_every=3, eval_examples=64)
    assert not c.diverged and all(math.isfinite(v) for v in c.losses)
    assert c.losses[-1] < c.losses[0]


def test_suite_command_writes_table_and_figures(tmp_path):
    out = tmp_path / "suite"
    cmd = [sys.executable, "-m", "metaopt.cli.evaluate", "--config-name=suite",
           "checkpoint=default", "speedup.steps=20", "speedup.k=2", "speedup.eval_every=5",
           "speedup.adam_lrs=[0.001,0.01]", "speedup.problems=[wine_mlp,digits_linear]",
           "speedup.eval_examples=128", f"speedup.cache_dir={tmp_path / 'cache'}",
           f"hydra.run.dir={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "IQM speedup" in r.stdout and "| learned |" in r.stdout
    for f in ("speedup.csv", "curves.csv", "summary.md", "speedup.png", "curves.png"):
        assert (out / f).stat().st_size > 0, f
    assert len(list((tmp_path / "cache").glob("adam_*.json"))) == 4  # 2 problems x 2 lrs
    bad = subprocess.run(cmd[:4] + ["speedup.problems=[nope]", f"hydra.run.dir={out}2"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "speedup.problems" in bad.stderr.strip().splitlines()[-1]
