"""LearnedOptimizer is a real torch.optim.Optimizer; hand rules through it match torch.optim."""
import copy

import pytest
import torch
from torch import nn

from metaopt.rules.io import CheckpointError, save_rule
from metaopt.optim import LearnedOptimizer
from metaopt.rules import make_rule


def _model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _data(seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=g, dtype=dtype), torch.randint(0, 3, (32,), generator=g)


def _run(model, opt, steps=20):
    x, y = _data()
    losses = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
    return losses


def test_per_group_lr_matches_torch_adam_param_groups():
    """Two param groups at different ``lr``: each group's update is the rule's times its lr, so
    rule adam(lr=1e-2) with group lrs 1.0 and 0.3 is torch.optim.Adam with groups at 1e-2 and
    3e-3 (and swapping the lrs gives a different run)."""
    runs = {}
    for lrs in ((1.0, 0.3), (0.3, 1.0)):
        m1, m2 = _model(), _model()
        opt = LearnedOptimizer([{"params": m1[0].parameters(), "lr": lrs[0]},
                                {"params": m1[2].parameters(), "lr": lrs[1]}],
                               rule=make_rule("adam", lr=1e-2))
        base = float(torch.exp(opt.theta["log_lr"]))  # the rule's 1e-2, rounded to float32
        assert base == pytest.approx(1e-2, rel=1e-6)
        ref = torch.optim.Adam([{"params": m2[0].parameters(), "lr": base * lrs[0]},
                                {"params": m2[2].parameters(), "lr": base * lrs[1]}])
        _run(m1, opt)
        _run(m2, ref)
        for a, b in zip(m1.parameters(), m2.parameters()):
            # metaopt's rule vs torch's Adam kernels, float64: equal to rounding
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        runs[lrs] = [p.detach().clone() for p in m1.parameters()]
    assert all(not torch.allclose(a, b) for a, b in zip(runs[(1.0, 0.3)], runs[(0.3, 1.0)]))


@pytest.mark.parametrize("rule,kwargs,ref", [
    ("sgd", dict(lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    ("sgd", dict(lr=0.05, momentum=0.9, weight_decay=1e-3), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    ("sgd", dict(lr=0.05, momentum=0.8, dampening=0.3), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3)),
    ("adam", dict(lr=1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
    ("adam", dict(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=1e-2), lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
])
def test_hand_rules_match_torch_optim(rule, kwargs, ref):
    m1, m2 = _model(), _model()
    opt = LearnedOptimizer(m1.parameters(), rule=make_rule(rule, **kwargs))
    _run(m1, opt)
    _run(m2, ref(m2.parameters()))
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(m1.parameters(), _model().parameters()))


def test_learned_rule_trains_and_state_dict_round_trips(tmp_path):
    model = _model()
    rule = make_rule("mlp", hidden_size=8, loss_features=True, act_features=True)
    theta = rule.init_theta(None, torch.Generator().manual_seed(0))
    theta["log_scale"] = torch.tensor(3.0)
    opt = LearnedOptimizer(model.named_parameters(), rule=rule, theta=theta, model=model)
    _run(model, opt, steps=5)
    sd = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    # continue the original 5 more steps; restore a fresh optimizer on the twin and do the same
    _run(model, opt, steps=5)
    opt2 = LearnedOptimizer(twin.named_parameters(), rule=make_rule("mlp", hidden_size=8, loss_features=True, act_features=True), model=twin)
    opt2.load_state_dict(sd)
    assert int(opt2.state[next(twin.parameters())]["step"]) == 5
    _run(twin, opt2, steps=5)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_param_group_lr_scales_updates():
    m1, m2 = _model(), _model()
    o1 = LearnedOptimizer(m1.parameters(), rule=make_rule("sgd", lr=0.1), lr=0.5)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.05)
    _run(m1, o1, 3)
    _run(m2, o2, 3)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b)


def test_checkpoint_shape_mismatch_is_one_line_error(tmp_path):
    rule = make_rule("mlp", hidden_size=8)
    theta = rule.init_theta(None, torch.Generator().manual_seed(0))
    save_rule(tmp_path / "r", rule, theta)
    opt = LearnedOptimizer.from_pretrained(_model().parameters(), tmp_path / "r")
    assert opt.rule.hidden_size == 8
    theta["w0"] = torch.zeros(3, 8)
    save_rule(tmp_path / "bad", rule, theta)
    with pytest.raises(CheckpointError, match=r"theta\['w0'\] has shape \[3, 8\]") as e:
        LearnedOptimizer.from_pretrained(_model().parameters(), tmp_path / "bad")
    assert "\n" not in str(e.value)


def test_spec_dependent_checkpoint_rejects_other_model(tmp_path):
    from metaopt.types import FlatSpec
    m = _model()
    rule = make_rule("layerwise_lr", num_steps=3)
    spec = FlatSpec.of(dict(m.named_parameters()))
    save_rule(tmp_path / "lw", rule, rule.init_theta(spec), spec)
    LearnedOptimizer.from_pretrained(m.named_parameters(), tmp_path / "lw")
    other = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    with pytest.raises(CheckpointError, match="shape"):
        LearnedOptimizer.from_pretrained(other.named_parameters(), tmp_path / "lw")


def test_loss_rule_without_closure_uses_a_neutral_loss():
    """step() without a closure (GradScaler, transformers' Trainer) works for a loss-aware rule:
    the surprise feature is 0 and the running loss statistics are left as they were."""
    m = _model()
    rule = make_rule("mlp", hidden_size=8, loss_features=True)
    opt = LearnedOptimizer(m.parameters(), rule=rule)
    _run(m, opt, steps=3)
    stats = {k: opt.rule_state[k].clone() for k in ("loss_mean", "loss_var")}
    x, y = _data()
    before = [p.detach().clone() for p in m.parameters()]
    opt.zero_grad()
    nn.functional.cross_entropy(m(x), y).backward()
    assert opt.step() is None
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))  # it stepped
    for k, v in stats.items():
        assert torch.equal(opt.rule_state[k], v)
    assert int(opt.rule_state["step"]) == 4
    # the neutral loss is exactly "no surprise": same update as passing the running mean
    twin_m, twin_o = copy.deepcopy((m, opt))  # together, so twin_o steps twin_m
    for mm, oo, closure_loss in ((m, opt, None), (twin_m, twin_o, stats["loss_mean"])):
        oo.zero_grad()
        nn.functional.cross_entropy(mm(x), y).backward()
        oo.step(None if closure_loss is None else (lambda v=closure_loss: v.clone()))
    for a, b in zip(m.parameters(), twin_m.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_activation_rule_without_model_is_a_one_line_error():
    rule = make_rule("mlp", hidden_size=8, act_features=True)
    with pytest.raises(ValueError, match="model=") as e:
        LearnedOptimizer(_model().parameters(), rule=rule)
    assert "\n" not in str(e.value)
