"""MetaTrainer: resume reaches the uninterrupted theta; non-finite losses never reach theta."""
import math

import pytest
import torch

from metaopt.meta import MetaTrainer, TrainConfig, make_scheme
from metaopt.meta.checkpoint import load_rule
from metaopt.rules import make_rule
from metaopt.tasks.base import Task, TaskFamily
from tests.helpers import TinyClassifier, TinyFamily, tiny_data


def _trainer(out, steps, rule_name="mlp", family=None, **kw):
    rule = make_rule(rule_name, **({"hidden_size": 8} if rule_name == "mlp" else {}))
    cfg = TrainConfig(outer_steps=steps, meta_batch=3, horizon=8, outer_lr=1e-2, seed=3,
                      checkpoint_every=2, progress=False, dtype="float64", **kw)
    return MetaTrainer(rule, family or TinyFamily(), make_scheme("nested", truncation=4), cfg, out)


def test_resume_after_interrupt_reaches_uninterrupted_theta(tmp_path):
    full = _trainer(tmp_path / "full", 6)
    full.run()
    # a run killed during outer step 5: its last checkpoint is the one from step 4
    killed = _trainer(tmp_path / "run", 6)
    real_step = killed.train_step

    def step_then_die():
        if killed.outer_step == 4:
            raise KeyboardInterrupt
        return real_step()
    killed.train_step = step_then_die
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    resumed = _trainer(tmp_path / "run", 6)
    resumed.load_checkpoint()
    assert resumed.outer_step == 4
    resumed.run()
    for k in full.theta:
        assert torch.equal(full.theta[k].detach(), resumed.theta[k].detach()), k
    for a, b in zip(full.slots, resumed.slots):  # the inner runs match too, not only theta
        assert a.seed == b.seed and a.step == b.step
        for k in a.params:
            assert torch.equal(a.params[k], b.params[k])
    _, theta, _ = load_rule(tmp_path / "run" / "checkpoints" / "last")
    for k in theta:
        assert torch.equal(theta[k], full.theta[k].detach())
    import csv
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["outer_step"]) for r in rows] == [1, 2, 3, 4, 5, 6]


class PoisonFamily(TaskFamily):
    """Every third task's training inputs contain a NaN."""
    name = "poison"

    def sample(self, generator):
        seed = int(torch.randint(0, 1000, (1,), generator=generator))
        data = tiny_data(seed)
        if seed % 3 == 0:
            data.x["train"][0, 0] = float("nan")
        return Task("tiny", TinyClassifier().double(), data, batch_size=120, structure=(6,))


def test_nonfinite_inner_loss_is_skipped_counted_and_reset(tmp_path):
    tr = _trainer(tmp_path / "p", 12, family=PoisonFamily())
    tr.run()
    assert tr.nonfinite > 0
    for v in tr.theta.values():
        assert torch.isfinite(v).all()
    import csv
    rows = list(csv.DictReader(open(tmp_path / "p" / "metrics.csv")))
    assert len(rows) == 12
    skipped = [r for r in rows if not math.isfinite(float(r["meta_loss"]))]
    assert skipped and all(r["grad_norm"] == "nan" for r in skipped)
    # after a skipped step theta is exactly what it was before it
    assert int(rows[-1]["nonfinite"]) == tr.nonfinite


def test_spec_dependent_rule_rejects_mixed_architectures(tmp_path):
    with pytest.raises(ValueError, match="share one parameter spec"):
        _trainer(tmp_path / "x", 2, rule_name="layerwise_lr", family=TinyFamily(hiddens=[4, 5, 6, 7]))
