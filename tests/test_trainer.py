"""MetaTrainer: resume reaches the uninterrupted theta; non-finite losses never reach theta."""
import math

import pytest
import torch

from metaopt.meta import MetaTrainer, TrainConfig, make_scheme
from metaopt.rules.io import load_rule
from metaopt.meta.nested import Nested
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
    real_step, moves = tr.train_step, []

    def step_and_record():  # theta before and after every outer step
        before = tr.theta_detached()
        row = real_step()
        moves.append((row, before, tr.theta_detached()))
        return row
    tr.train_step = step_and_record
    tr.run()
    assert tr.nonfinite > 0
    for v in tr.theta.values():
        assert torch.isfinite(v).all()
    import csv
    rows = list(csv.DictReader(open(tmp_path / "p" / "metrics.csv")))
    assert len(rows) == 12 == len(moves)
    skipped = [r for r in rows if not math.isfinite(float(r["meta_loss"]))]
    assert skipped and all(r["grad_norm"] == "nan" for r in skipped)
    assert int(rows[-1]["nonfinite"]) == tr.nonfinite
    # after a skipped step theta is exactly what it was before it; a healthy step moves it
    assert sum(not math.isfinite(row["grad_norm"]) for row, _, _ in moves) == len(skipped)
    for row, before, after in moves:
        same = all(torch.equal(before[k], after[k]) for k in before)
        assert same == (not math.isfinite(row["grad_norm"])), (row["outer_step"], same)


def test_spec_dependent_rule_rejects_mixed_architectures(tmp_path):
    with pytest.raises(ValueError, match="share one parameter spec"):
        _trainer(tmp_path / "x", 2, rule_name="layerwise_lr", family=TinyFamily(hiddens=[4, 5, 6, 7]))


class _PoisonSlot(Nested):
    """Nested, but the window of the slots listed in ``poison`` ends with a NaN weight (or, with
    ``poison_grads``, the meta-gradient overflows)."""

    def __init__(self, poison=(), poison_grads=False, **kw):
        super().__init__(**kw)
        self.poison, self.poison_grads = set(poison), poison_grads

    def estimate(self, rule, theta, slots, meta_loss):
        grads, outs = super().estimate(rule, theta, slots, meta_loss)
        for i in self.poison:
            p = dict(outs[i].params)
            k = next(iter(p))
            p[k] = p[k].detach().clone()
            p[k].view(-1)[0] = float("nan")
            outs[i] = outs[i]._replace(params=p)
        if self.poison_grads:
            grads = {k: torch.full_like(v, float("inf")) for k, v in grads.items()}
        return grads, outs


@pytest.mark.parametrize("poison,poison_grads,expect_reset", [
    ((1,), False, {1}),            # one slot diverged: only that slot is reset
    ((0, 2), False, {0, 2}),
    ((), True, {0, 1, 2}),         # the meta-gradient overflowed: no slot to blame, all reset
])
def test_skipped_nonfinite_step_keeps_theta_and_resets_exactly_the_offending_slots(
        tmp_path, poison, poison_grads, expect_reset):
    tr = _trainer(tmp_path, 3)
    tr.train_step()  # one healthy step first, so the optimizer has state and slots have moved
    tr.scheme = _PoisonSlot(poison, poison_grads, truncation=4)
    theta = tr.theta_detached()
    opt_state = {k: v.clone() for k, v in tr.opt.state_dict()["state"][0].items()}
    before = list(tr.slots)
    snap = [({k: v.clone() for k, v in s.params.items()}, s.step, s.seed) for s in before]
    row = tr.train_step()
    assert math.isnan(row["grad_norm"]) and tr.nonfinite == 1
    for k in theta:  # bit-identical, and the outer optimizer did not step either
        assert torch.equal(tr.theta[k].detach(), theta[k]), k
    for k, v in tr.opt.state_dict()["state"][0].items():
        assert torch.equal(v, opt_state[k]), k
    for i, (s, (params, step, seed)) in enumerate(zip(tr.slots, snap)):
        if i in expect_reset:
            assert s is not before[i] and s.step == 0 and s.seed != seed and not s.extra
        else:  # untouched: same object, same weights and step (the window is discarded)
            assert s is before[i] and s.step == step
            assert all(torch.equal(s.params[k], params[k]) for k in params)


def test_fixed_family_meta_trains_on_its_one_task(tmp_path):
    """FixedFamily: every seed (every slot and every reset) gets the same task object."""
    from metaopt.tasks.base import FixedFamily
    made = []

    def task_fn():
        made.append(1)
        return Task("tiny", TinyClassifier().double(), tiny_data(7), batch_size=16, structure=(6,))
    fam = FixedFamily(task_fn, name="one")
    assert fam.sample_seeded(1) is fam.sample_seeded(2) and len(made) == 1
    tr = _trainer(tmp_path, 4, rule_name="sgd", family=fam)
    theta0 = tr.theta_detached()
    last = tr.run()
    assert math.isfinite(last) and tr.nonfinite == 0 and len(made) == 1
    assert all(s.task is fam.sample_seeded(0) for s in tr.slots)
    assert not torch.equal(tr.theta["log_lr"].detach(), theta0["log_lr"])


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, betas=(0.8, 0.99)),
    lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
], ids=["adam-amsgrad", "sgd-nesterov", "adamw"])
def test_optimizer_state_dict_survives_json_and_safetensors_exactly(tmp_path, make_opt):
    """The trainer stores the outer optimizer's own state_dict: tensors to safetensors, the tree
    (int keys, tuples, None) to JSON -- no pickle -- and gets back the same dict, so a resumed
    optimizer takes bit-identical steps."""
    from metaopt.rules.io import load_tensors, read_json, save_tensors, write_json
    from metaopt.meta.trainer import tree_from_json, tree_to_json
    ps = [torch.randn(3, 2, dtype=torch.float64, requires_grad=True),
          torch.randn(4, dtype=torch.float64, requires_grad=True)]
    opt = make_opt(ps)
    for t in range(3):
        for p in ps:
            p.grad = torch.full_like(p, 0.1 * (t + 1))
        opt.step()
    tensors = {}
    write_json(tree_to_json(opt.state_dict(), tensors, "opt"), tmp_path / "o.json")
    save_tensors(tensors, tmp_path / "o.safetensors")
    back = tree_from_json(read_json(tmp_path / "o.json"), load_tensors(tmp_path / "o.safetensors"))
    sd = opt.state_dict()
    assert back["param_groups"] == sd["param_groups"]  # tuples stay tuples, None stays None
    assert back["state"].keys() == sd["state"].keys()
    for i in sd["state"]:
        for k, v in sd["state"][i].items():
            assert torch.equal(back["state"][i][k], v), k
    twins = [p.detach().clone().requires_grad_(True) for p in ps]
    opt2 = make_opt(twins)
    opt2.load_state_dict(back)
    for o, params in ((opt, ps), (opt2, twins)):
        for p in params:
            p.grad = torch.full_like(p, -0.3)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, twins))


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_clip_grad_rescales_the_meta_gradient_by_its_global_norm(tmp_path, clip):
    """meta.clip_grad = c: the outer optimizer sees g * min(1, c / ||g||) (global L2 norm over
    all of theta, computed here by hand); c = 0 hands g through unchanged; the logged grad_norm is
    the norm before clipping."""
    tr = _trainer(tmp_path, 3, clip_grad=clip)
    raw, seen = [], []
    real = tr.scheme.meta_gradient

    def record(*a, **kw):
        out = real(*a, **kw)
        raw.append({k: v.detach().clone() for k, v in out.grads.items()})
        return out
    tr.scheme.meta_gradient = record
    tr.opt.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append({k: p.grad.clone() for k, p in tr.theta.items()}))
    rows = [tr.train_step() for _ in range(3)]
    assert len(raw) == len(seen) == 3
    for g, s, row in zip(raw, seen, rows):
        norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in g.values()))
        assert row["grad_norm"] == pytest.approx(norm, rel=1e-12)
        if clip:
            assert norm > 10 * clip, "clipping would be inactive: the test would be vacuous"
        factor = min(1.0, clip / (norm + 1e-6)) if clip else 1.0
        for k in g:  # torch's clip_grad_norm_ vs this sum: the same scaling to float64 rounding
            torch.testing.assert_close(s[k], g[k] * factor, rtol=1e-12, atol=1e-15)
        if clip:
            total = math.sqrt(sum(float((v ** 2).sum()) for v in s.values()))
            assert total == pytest.approx(clip * norm / (norm + 1e-6), rel=1e-10)  # ~c
