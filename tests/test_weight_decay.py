"""Param-group ``weight_decay`` in :class:`LearnedOptimizer`: honoured as decoupled (AdamW-style)
decay at the learned rate for rules that support it, rejected with a one-line error otherwise;
unknown group keys and foreign state_dicts are errors, not silently ignored."""
import math

import pytest
import torch

from metaopt.optim import LearnedOptimizer
from metaopt.rules import make_rule
from metaopt.rules.io import CheckpointError


def _fresh_anchored(**kw):
    return make_rule("anchored", lr_matrix=0.05, lr_vector=0.01, floor=0.1, warmup=5.0, **kw)


@pytest.mark.parametrize("wd,lr", [(0.1, 1.0), (2.0, 0.5)])
def test_zero_gradients_shrink_weights_by_the_documented_factor(wd, lr):
    """With g = 0 the Adam direction is 0 and only the decay acts:
    p_t = p_{t-1} * (1 - lr * wd * lr_i(t)), lr_i(t) = lr_k * anchor_i * (1 - exp(-t / warmup))."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = LearnedOptimizer([w, b], rule=_fresh_anchored(), lr=lr, weight_decay=wd)
    lr_mat, lr_vec, floor, tau = (math.exp(float(opt.theta[k])) for k in
                                  ("log_lr_matrix", "log_lr_vector", "log_floor", "log_warmup"))
    assert (lr_mat, lr_vec, floor, tau) == pytest.approx((0.05, 0.01, 0.1, 5.0), rel=1e-6)
    anchor_w = float(w.detach().pow(2).mean().sqrt()) + floor / math.sqrt(4)
    ew, eb = w.detach().clone(), b.detach().clone()
    for t in range(1, 9):
        w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
        opt.step()
        warm = 1 - math.exp(-t / tau)
        ew = ew * (1 - lr * wd * lr_mat * anchor_w * warm)
        eb = eb * (1 - lr * wd * lr_vec * warm)
        torch.testing.assert_close(w.detach(), ew, rtol=1e-13, atol=0)
        torch.testing.assert_close(b.detach(), eb, rtol=1e-13, atol=0)


def test_weight_decay_zero_is_bit_identical_to_the_rule_without_decay():
    """Same code path twice (no decay term is added when every group's weight_decay is 0):
    bit-identical to a run without the key, and to the rule's own step_."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    copies = [torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
              for _ in range(2)]
    for c in copies:
        c.load_state_dict(model.state_dict())
    opts = [LearnedOptimizer(copies[0].parameters()),
            LearnedOptimizer(copies[1].parameters(), weight_decay=0.0)]
    x, y = torch.randn(32, 5), torch.randn(32, 2)
    for _ in range(15):
        for m, o in zip(copies, opts):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for p, q in zip(copies[0].parameters(), copies[1].parameters()):
        assert torch.equal(p, q)
    # and it moved: a real comparison
    assert not torch.equal(next(model.parameters()), next(copies[0].parameters()))


def test_groups_decay_independently():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt = LearnedOptimizer([{"params": [a], "weight_decay": 0.0},
                            {"params": [b], "weight_decay": 0.5}], rule=_fresh_anchored())
    for _ in range(5):
        a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
        opt.step()
    assert torch.equal(a.detach(), a0)                   # no gradient, no decay: unmoved
    ratio = b.detach() / b0
    assert float(ratio.max()) < 1.0 and torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))


def test_rules_without_weight_decay_reject_it():
    w = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"weight_decay=0.01, but rule 'adam' does not support"):
        LearnedOptimizer([w], rule=make_rule("adam"), weight_decay=0.01)
    opt = LearnedOptimizer([w], rule=make_rule("pertensor"))
    with pytest.raises(ValueError, match=r"param_groups\[1\] weight_decay=0.1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "weight_decay": 0.1})
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        LearnedOptimizer([w], weight_decay=-1.0)


@pytest.mark.parametrize("key", ["momentum", "betas", "nesterov"])
def test_unknown_group_keys_are_rejected(key):
    w = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match=rf"key '{key}' is not supported"):
        LearnedOptimizer([{"params": [w], key: 0.9}])


def test_schedulers_still_work():
    w = torch.nn.Parameter(torch.randn(3, 3))
    opt = LearnedOptimizer([w], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))   # adds initial_lr
    for _ in range(3):
        w.grad = torch.randn(3, 3)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)


def test_a_torch_adam_state_dict_is_rejected():
    w = torch.nn.Parameter(torch.randn(3, 3))
    adam = torch.optim.Adam([w])
    w.grad = torch.randn(3, 3)
    adam.step()
    opt = LearnedOptimizer([w])
    with pytest.raises(CheckpointError, match=r"param_groups'\]\[0\] has key 'amsgrad'"):
        opt.load_state_dict(adam.state_dict())
    sd = adam.state_dict()
    sd["param_groups"] = [{"params": [0], "lr": 1.0, "weight_decay": 0.0}]
    with pytest.raises(CheckpointError, match=r"state'\]\[0\] has key 'exp_avg'"):
        opt.load_state_dict(sd)
