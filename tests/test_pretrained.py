"""The shipped rules load, and really train models they never saw, the torch.optim way; the README
example runs; the shipped recipe still reproduces the recorded run of the default rule."""
import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.meta.evaluate import train_task
from metaopt.optim import LearnedOptimizer
from metaopt.optim.learned import PRETRAINED_DIR
from metaopt.rules.io import load_rule
from metaopt.tasks import make_family

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"


@pytest.mark.parametrize("name,rule_name", [("default", "anchored"), ("pertensor", "pertensor")])
def test_shipped_per_tensor_rules_need_parameters_only(name, rule_name):
    rule, theta, _ = load_rule(PRETRAINED_DIR / name)
    assert rule.name == rule_name and not rule.needs_activations and not rule.needs_loss
    files = list((PRETRAINED_DIR / name).iterdir())
    assert sum(f.stat().st_size for f in files) < 16_000
    fresh = rule.init_theta(None, torch.Generator().manual_seed(0))
    assert any(not torch.equal(theta[k], fresh[k]) for k in ("w1", "log_lr_matrix"))  # trained


def test_default_trains_an_unseen_model_from_parameters_alone_without_closure():
    """A model it never saw (a GRU regressor, not in the meta-training mixture or the suite):
    ``from_pretrained(model.parameters(), "default")``, then ``loss.backward(); opt.step()``."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 16, batch_first=True)
            self.norm = nn.LayerNorm(16)
            self.out = nn.Linear(16, 1)

        def forward(self, x):
            return self.out(self.norm(self.rnn(x)[0][:, -1]))

    model = Net()
    x = torch.randn(256, 10, 3)
    y = x[:, :, 0].cumsum(1)[:, -1:] * 0.3 + torch.sin(x[:, -1, 1:2])
    opt = LearnedOptimizer.from_pretrained(model.parameters(), "default")
    first = None
    for step in range(150):
        i = torch.randint(0, 256, (32,))
        loss = F.mse_loss(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    with torch.no_grad():
        final = float(F.mse_loss(model(x), y))
    assert final < 0.3 * first, (first, final)


@pytest.mark.parametrize("fam,kw,seed,bound", [
    ("digits_mlp", dict(widths=[48], depths=[2]), 123_456, 0.5),
    ("digits_conv", {}, 654_321, 0.8),
    ("logreg_cancer", {}, 7, 0.3)])
def test_shipped_rules_lower_heldout_losses(fam, kw, seed, bound):
    task = make_family(fam, **kw).sample_seeded(seed)
    for name in ("default", "mlp_act"):   # mlp_act: the activation-aware rule, needs model=
        extra = {"model": task.module} if name == "mlp_act" else {}
        run = train_task(task, lambda named, t: LearnedOptimizer.from_pretrained(
            named, name, **extra), steps=150, seed=seed, eval_every=150)
        before, after = run.valid_losses[0], run.final_valid
        assert after < bound < before, (name, fam, before, after)


def test_activation_rule_without_model_is_a_one_line_error():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="model="):
        LearnedOptimizer.from_pretrained(model.parameters(), "mlp_act")


def test_readme_example_runs():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    assert "model=" not in code  # the plain torch.optim call
    ns = {}
    exec(compile(code, "README example", "exec"), ns)
    assert float(ns["loss"].detach()) < 1.0


#: outer steps of the recorded run the slow tier reproduces (~1.5 s each on 2 cores)
REPRO_STEPS = 20
#: the first steps agree to float32 rounding (measured <= 3e-7 relative through step 6; the
#: recording was made on another machine and commit); after that the run's sensitivity to
#: rounding amplifies the differences about 2x per step (measured 1e-5 at step 9, 1.5e-3 at 20)
EXACT_STEPS = 6


@pytest.mark.slow
def test_shipped_recipe_reproduces_the_recorded_run(tmp_path):
    """The documented command (conf/shipped_pertensor.yaml, the recipe of the pertensor default)
    still produces the recorded run, benchmarks/results/shipped_default_metrics.csv: the same
    inner steps and skipped steps at every outer step, every logged value to float32 rounding
    over the first EXACT_STEPS outer steps, and the meta-loss curve within 1% (each step) and
    0.1% (its mean) over REPRO_STEPS."""
    r = subprocess.run([sys.executable, "-m", "metaopt.cli.train", "--config-name=shipped_pertensor",
                        f"meta.outer_steps={REPRO_STEPS}", f"hydra.run.dir={tmp_path}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    want = list(csv.DictReader(open(ROOT / "benchmarks/results/shipped_default_metrics.csv")))
    assert len(got) == REPRO_STEPS and len(want) >= REPRO_STEPS, (len(got), len(want))
    want = want[:REPRO_STEPS]
    for i, (g, w) in enumerate(zip(got, want)):
        assert int(g["outer_step"]) == int(w["outer_step"]) == i + 1
        assert int(g["inner_steps"]) == int(w["inner_steps"]) and g["nonfinite"] == w["nonfinite"], (g, w)
        keys = ("meta_loss", "train_loss", "grad_norm") if i < EXACT_STEPS else ("meta_loss",)
        rel = 1e-5 if i < EXACT_STEPS else 1e-2
        for k in keys:
            assert float(g[k]) == pytest.approx(float(w[k]), rel=rel), (k, g, w)
    mean = lambda rows: sum(float(x["meta_loss"]) for x in rows) / len(rows)
    assert mean(got) == pytest.approx(mean(want), rel=1e-3)
