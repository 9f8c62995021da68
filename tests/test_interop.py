"""torchopt and higher interop: equal updates to metaopt's own path, equal meta-gradients."""
import copy

import higher
import pytest
import torch
import torchopt
from torch import nn
from torch.func import functional_call

import metaopt.interop.higher  # noqa: F401  (registers LearnedOptimizer with higher)
from metaopt.interop.torchopt import rule_transform, torchopt_rule
from metaopt.optim import LearnedOptimizer
from metaopt.rules import make_rule

DT = torch.float64


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def _batch(i):
    g = torch.Generator().manual_seed(10 + i)
    return torch.randn(16, 5, generator=g, dtype=DT), torch.randn(16, 3, generator=g, dtype=DT)


def _mse(out, y):
    return ((out - y) ** 2).mean()


RULES = {
    "adam": lambda: make_rule("adam", lr=1e-2, weight_decay=1e-3),
    "sgd": lambda: make_rule("sgd", lr=0.1, momentum=0.9, nesterov=True),
    "mlp": lambda: make_rule("mlp", hidden_size=8),
    "mlp-loss": lambda: make_rule("mlp", hidden_size=8, loss_features=True),
}


def _theta(rule):
    theta = rule.init_theta(None, torch.Generator().manual_seed(0))
    if "log_scale" in theta:
        theta["log_scale"] = torch.tensor(2.0)  # visible steps
    return {k: v.to(DT) for k, v in theta.items()}


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("name", list(RULES))
def test_rule_transform_matches_learned_optimizer(name, clip):
    """torchopt functional loop (optionally chained after gradient clipping) == LearnedOptimizer
    with torch's clip_grad_norm_ before each step()."""
    rule, theta = RULES[name](), _theta(RULES[name]())
    m1, m2 = _model(), _model()
    opt = LearnedOptimizer(m1.parameters(), rule=rule, theta=theta)
    tx = rule_transform(RULES[name](), theta)
    if clip is not None:
        tx = torchopt.chain(torchopt.clip.clip_grad_norm(max_norm=clip), tx)
    params = tuple(p.detach().clone() for p in m2.parameters())
    names = [n for n, _ in m2.named_parameters()]
    state = tx.init(params)
    for i in range(6):
        x, y = _batch(i)
        opt.zero_grad()
        _mse(m1(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(m1.parameters(), clip)
        opt.step()
        ps = tuple(p.requires_grad_() for p in params)
        loss = _mse(functional_call(m2, dict(zip(names, ps)), (x,)), y)
        grads = torch.autograd.grad(loss, ps)
        updates, state = tx.update(grads, state, params=ps, inplace=False)
        params = tuple(p.detach() for p in torchopt.apply_updates(ps, updates, inplace=False))
    for a, b in zip(m1.parameters(), params):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-9)
    assert not torch.equal(params[0], next(_model().parameters()))


def _unroll_meta_grad(rule, theta0, steps=4):
    """metaopt's own path: a functional unroll of rule.update, differentiated w.r.t. theta."""
    theta = {k: v.clone().requires_grad_() for k, v in theta0.items()}
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    state = rule.init({k: v.detach() for k, v in params.items()})
    for i in range(steps):
        x, y = _batch(i)
        loss = _mse(functional_call(model, params, (x,)), y)
        grads = dict(zip(names, torch.autograd.grad(loss, list(params.values()), create_graph=True)))
        upd, state = rule.update(theta, grads, state, params, {"loss": loss, "act": None})
        params = {k: params[k] + upd[k] for k in names}
    x, y = _batch(99)
    meta = _mse(functional_call(model, params, (x,)), y)
    return torch.autograd.grad(meta, list(theta.values())), list(theta)


@pytest.mark.parametrize("name", ["adam", "mlp", "mlp-loss"])
def test_higher_innerloop_meta_gradient_equals_unroll(name):
    rule, theta0 = RULES[name](), _theta(RULES[name]())
    ref, keys = _unroll_meta_grad(RULES[name](), theta0)
    model = _model()
    opt = LearnedOptimizer(model.parameters(), rule=rule, theta=theta0)
    opt.theta = {k: v.clone().requires_grad_() for k, v in theta0.items()}
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for i in range(4):
            x, y = _batch(i)
            diffopt.step(_mse(fmodel(x), y))
        x, y = _batch(99)
        meta = _mse(fmodel(x), y)
        got = torch.autograd.grad(meta, [opt.theta[k] for k in keys])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert any(float(g.abs().sum()) > 0 for g in got)


def test_torchopt_metaoptimizer_meta_gradient_equals_unroll():
    name = "mlp"
    theta0 = _theta(RULES[name]())
    ref, keys = _unroll_meta_grad(RULES[name](), theta0)
    theta = {k: v.clone().requires_grad_() for k, v in theta0.items()}
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    mo = torchopt.MetaOptimizer(model, rule_transform(RULES[name](), theta, names=names))
    for i in range(4):
        x, y = _batch(i)
        mo.step(_mse(model(x), y))
    x, y = _batch(99)
    got = torch.autograd.grad(_mse(model(x), y), [theta[k] for k in keys])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("make", [lambda: torchopt.adam(1e-2), lambda: torchopt.sgd(0.05, momentum=0.9),
                                  lambda: torchopt.rmsprop(1e-2), lambda: torchopt.adamw(1e-2)])
def test_torchopt_alias_as_metaopt_rule(make):
    """LearnedOptimizer(rule=torchopt_rule(tx)) == torchopt's own functional loop with tx."""
    m1, m2 = _model(), _model()
    o1 = LearnedOptimizer(m1.parameters(), rule=torchopt_rule(make()))
    tx = make()
    params = tuple(p.detach().clone() for p in m2.parameters())
    state = tx.init(params)
    names = [n for n, _ in m2.named_parameters()]
    for i in range(6):
        x, y = _batch(i)
        o1.zero_grad()
        _mse(m1(x), y).backward()
        o1.step()
        ps = tuple(p.requires_grad_() for p in params)
        grads = torch.autograd.grad(_mse(functional_call(m2, dict(zip(names, ps)), (x,)), y), ps)
        updates, state = tx.update(grads, state, params=ps, inplace=False)
        params = tuple(p.detach() for p in torchopt.apply_updates(ps, updates, inplace=False))
    for a, b in zip(m1.parameters(), params):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-9)
    assert not torch.equal(params[0], next(_model().parameters()))


def test_activation_rules_are_rejected_with_one_line_errors():
    rule = make_rule("mlp", hidden_size=4, act_features=True)
    with pytest.raises(ValueError, match="activation"):
        rule_transform(rule, _theta(rule))
    model = _model()
    opt = LearnedOptimizer(model.parameters(), rule=rule, model=model)
    with pytest.raises(ValueError, match="activation"):
        with higher.innerloop_ctx(model, opt):
            pass
