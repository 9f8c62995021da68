"""The baselines as rules (``lookahead``, ``sgd_hd``, ``adam_hd``): step-for-step agreement with
the torch.optim versions, vmappability, and meta-gradients against finite differences."""
import copy

import pytest
import torch
from torch import nn

import metaopt.rules.hypergradient  # noqa: F401  (registers sgd_hd, adam_hd)
import metaopt.rules.lookahead  # noqa: F401  (registers lookahead)
import metaopt.rules.sgd  # noqa: F401
from metaopt.optim.hypergradient import AdamHD, SGDHD
from metaopt.optim.lookahead import Lookahead
from metaopt.rules.base import make_rule
from metaopt.types import FlatSpec


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 4, generator=g, dtype=torch.float64)
    y = torch.randn(24, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    return nn.Linear(4, 2).double(), x, y


def loss_fn(params, x, y):
    return ((x @ params["weight"].T + params["bias"] - y) ** 2).mean()


def theta64(rule, spec):
    """init_theta built in float64 (a float32 log(lr) would be off by ~1e-8 relative)."""
    spec = spec if isinstance(spec, FlatSpec) else FlatSpec.of(spec)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        th = rule.init_theta(spec, torch.Generator().manual_seed(0))
    finally:
        torch.set_default_dtype(old)
    assert all(v.dtype == torch.float64 for v in th.values())
    return th


def run_rule(rule, model, x, y, steps, theta=None):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    theta = theta64(rule, params) if theta is None else theta
    state = rule.init(params)
    traj = []
    for _ in range(steps):
        ps = {k: v.requires_grad_(True) for k, v in params.items()}
        grads = dict(zip(ps, torch.autograd.grad(loss_fn(ps, x, y), list(ps.values()))))
        updates, state = rule.update(theta, grads, state, {k: v.detach() for k, v in ps.items()})
        params = {k: (ps[k] + updates[k]).detach() for k in ps}
        traj.append(params)
    return traj, state


def run_torch(opt_factory, model, x, y, steps):
    model = copy.deepcopy(model)
    opt = opt_factory(model.parameters())
    traj = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss
        opt.step(closure)
        traj.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return traj, opt


def assert_traj_close(a, b, tol=1e-10):
    for pa, pb in zip(a, b):
        for k in pa:
            torch.testing.assert_close(pa[k], pb[k], rtol=tol, atol=tol)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_lookahead_rule_matches_torch_lookahead(momentum):
    model, x, y = problem(1)
    rule = make_rule("lookahead", inner={"name": "sgd", "lr": 0.05, "momentum": momentum},
                     k=3, alpha=0.3)
    ours, _ = run_rule(rule, model, x, y, 10)
    ref, _ = run_torch(lambda ps: Lookahead(torch.optim.SGD(ps, lr=0.05, momentum=momentum),
                                            k=3, alpha=0.3), model, x, y, 10)
    assert_traj_close(ours, ref)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_hd_rule_matches_torch_sgd_hd(momentum):
    model, x, y = problem(2)
    rule = make_rule("sgd_hd", lr0=0.05, beta=0.01, momentum=momentum)
    ours, state = run_rule(rule, model, x, y, 8)
    ref, opt = run_torch(lambda ps: SGDHD(ps, lr=0.05, hypergrad_lr=0.01, momentum=momentum),
                         model, x, y, 8)
    assert_traj_close(ours, ref)
    assert float(state["lr"]) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-10)
    assert opt.param_groups[0]["lr"] != pytest.approx(0.05)


def test_adam_hd_rule_matches_torch_adam_hd():
    model, x, y = problem(3)
    rule = make_rule("adam_hd", lr0=0.01, beta=1e-3)
    ours, state = run_rule(rule, model, x, y, 8)
    ref, opt = run_torch(lambda ps: AdamHD(ps, lr=0.01, hypergrad_lr=1e-3), model, x, y, 8)
    assert_traj_close(ours, ref)
    assert float(state["lr"]) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-10)
    assert opt.param_groups[0]["lr"] != pytest.approx(0.01)


@pytest.mark.parametrize("name,kw", [
    ("lookahead", dict(inner={"name": "adam", "lr": 0.01}, k=2, alpha=0.4)),
    ("sgd_hd", dict(lr0=0.05, beta=0.01, momentum=0.5)),
    ("adam_hd", dict(lr0=0.01, beta=1e-3)),
])
def test_rules_vmap_over_tasks_and_rebuild_from_config(name, kw):
    rule = make_rule(name, **kw)
    rebuilt = make_rule(rule.name, **rule.config())
    assert rebuilt.describe() == rule.describe()
    model, x, y = problem(4)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    theta = theta64(rule, base)
    xs = torch.stack([x, x.flip(0) * 0.5])
    ys = torch.stack([y, -y])
    ps0 = {k: torch.stack([v, v + 0.1]) for k, v in base.items()}

    def run(params, xb, yb):
        state = rule.init(params)
        for _ in range(5):
            grads = torch.func.grad(loss_fn)(params, xb, yb)
            upd, state = rule.update(theta, grads, state, params)
            params = {k: params[k] + upd[k] for k in params}
        return params

    batched = torch.func.vmap(run)(ps0, xs, ys)
    for i in range(2):
        single = run({k: v[i] for k, v in ps0.items()}, xs[i], ys[i])
        for k in single:
            torch.testing.assert_close(batched[k][i], single[k], rtol=1e-12, atol=1e-12)


# -- meta-gradients -------------------------------------------------------------------------------
def _quadratic(seed=5, n=6):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = q @ q.T / n + 0.3 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    w0 = torch.randn(n, generator=g, dtype=torch.float64)
    return a, b, w0


def unrolled_loss(rule, theta, steps=5):
    """Final loss of ``steps`` rule steps on f(w) = w'Aw/2 - b'w; inner gradients by autograd
    with create_graph, so the meta-gradient is exact through every step."""
    a, b, w0 = _quadratic()
    f = lambda w: 0.5 * w @ a @ w - b @ w  # noqa: E731
    params = {"w": w0.clone().requires_grad_(True)}
    state = rule.init(params)
    for _ in range(steps):
        (g,) = torch.autograd.grad(f(params["w"]), params["w"], create_graph=True)
        upd, state = rule.update(theta, {"w": g}, state, params)
        params = {"w": params["w"] + upd["w"]}
    return f(params["w"])


@pytest.mark.parametrize("name,kw,key", [
    ("lookahead", dict(inner={"name": "sgd", "lr": 0.1, "momentum": 0.5}, k=2, alpha=0.3),
     "alpha_logit"),
    ("lookahead", dict(inner={"name": "sgd", "lr": 0.1, "momentum": 0.5}, k=2, alpha=0.3),
     "inner.log_lr"),
    ("sgd_hd", dict(lr0=0.1, beta=0.02), "log_beta"),
    ("sgd_hd", dict(lr0=0.1, beta=0.02, momentum=0.5), "log_lr0"),
    ("adam_hd", dict(lr0=0.05, beta=1e-2), "log_beta"),
    ("adam_hd", dict(lr0=0.05, beta=1e-2), "log_lr0"),
])
def test_meta_gradient_matches_finite_differences(name, kw, key):
    rule = make_rule(name, **kw)
    theta = theta64(rule, FlatSpec.from_shapes({"w": (6,)}))
    th = dict(theta)
    th[key] = theta[key].clone().requires_grad_(True)
    (analytic,) = torch.autograd.grad(unrolled_loss(rule, th), th[key])
    eps = 1e-5
    with torch.enable_grad():
        plus = unrolled_loss(rule, {**theta, key: theta[key] + eps}).detach()
        minus = unrolled_loss(rule, {**theta, key: theta[key] - eps}).detach()
    fd = (plus - minus) / (2 * eps)
    assert torch.isfinite(analytic) and abs(float(analytic)) > 1e-6, "vacuous meta-gradient"
    rel = abs(float(analytic - fd)) / abs(float(fd))
    assert rel < 1e-4, f"{name}/{key}: autograd {float(analytic)} vs finite differences {float(fd)}"


def test_invalid_rule_hyperparameters_name_the_argument():
    for name, kw, arg in [("lookahead", dict(k=0), "k"), ("lookahead", dict(alpha=1.0), "alpha"),
                          ("lookahead", dict(inner=3), "inner"),
                          ("sgd_hd", dict(lr0=0.0), "lr0"), ("sgd_hd", dict(beta=-1.0), "beta"),
                          ("sgd_hd", dict(momentum=1.0), "momentum"),
                          ("adam_hd", dict(beta1=1.0), "beta1"), ("adam_hd", dict(eps=-1.0), "eps")]:
        with pytest.raises(ValueError, match=rf"Invalid {arg}\b"):
            make_rule(name, **kw)


def test_lookahead_rule_runs_as_learned_optimizer():
    """The rule drops into LearnedOptimizer like any trained rule and matches torch Lookahead."""
    from metaopt.optim.learned import LearnedOptimizer

    model, x, y = problem(6)
    rule = make_rule("lookahead", inner={"name": "sgd", "lr": 0.05, "momentum": 0.9}, k=3,
                     alpha=0.5)
    theta = theta64(rule, {n: p for n, p in model.named_parameters()})
    ours, _ = run_torch(lambda ps: LearnedOptimizer(ps, rule=rule, theta=theta), model, x, y, 7)
    ref, _ = run_torch(lambda ps: Lookahead(torch.optim.SGD(ps, lr=0.05, momentum=0.9), k=3,
                                            alpha=0.5), model, x, y, 7)
    assert_traj_close(ours, ref)
