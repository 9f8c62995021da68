"""Fast paths equal the pure code they replace.

* ``Rule.step_`` (in-place, no-grad; adam, sgd, mlp) == ``params + scale * update(...)``, float64,
  several steps, per-tensor scales != 1, and through ``LearnedOptimizer`` (param groups).
* ``LayerwiseLR.update``'s per-tensor SGD shortcut == its general flat path.
* the vmap-friendly cross entropy of supervised tasks == ``F.cross_entropy``.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from metaopt.optim import LearnedOptimizer
from metaopt.rules import make_rule
from metaopt.rules.base import Rule
from metaopt.rules.mlp import _windows
from metaopt.tasks.mlp import supervised_loss
from metaopt.types import FlatSpec

DT = torch.float64
# a matrix, vectors, a scalar, a 3-d tensor and a non-contiguous (transposed) matrix
SHAPES = {"l1.weight": (40, 30), "l1.bias": (30,), "l2.weight": (7, 30), "l2.bias": (7,),
          "gain": (), "conv.weight": (3, 5, 4), "l3.weight": (6, 9)}
NAMES = list(SHAPES)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {n: torch.randn(s, generator=g, dtype=DT) for n, s in SHAPES.items()}
    out["l3.weight"] = torch.randn(9, 6, generator=g, dtype=DT).t()  # non-contiguous
    return out


def _grads(step):
    g = torch.Generator().manual_seed(100 + step)
    out = {n: torch.randn(s, generator=g, dtype=DT) for n, s in SHAPES.items()}
    out["l1.bias"][:5] = 0.0  # dead units: g = v = 0 exactly
    return out


def _ctx(step):
    g = torch.Generator().manual_seed(200 + step)
    return {"loss": torch.tensor(2.0 - 0.1 * step + 0.3 * (step % 2), dtype=DT),
            # activation statistics for some tensors only (the others get zeros)
            "act": {n: torch.randn(2, generator=g, dtype=DT) for n in NAMES[:3]}}


def _theta(rule, spec):
    theta = rule.init_theta(spec, torch.Generator().manual_seed(1))
    if "log_scale" in theta:
        theta["log_scale"] = torch.tensor(2.5)  # visible steps
    return theta


def _compare(rule, steps=5, scales=None, rtol=1e-12):
    """Run ``update`` and ``step_`` side by side; return the max relative error of the total
    parameter change and of the state."""
    p_ref = _params()
    spec = FlatSpec.of(p_ref)
    theta = _theta(rule, spec)
    p_fast = [v.clone() if v.is_contiguous() else v.t().clone().t() for v in p_ref.values()]
    assert not p_fast[-1].is_contiguous()
    p0 = {n: v.clone() for n, v in p_ref.items()}
    st_ref = rule.init(p_ref)
    st_fast = {k: v.clone() for k, v in st_ref.items()}
    sc = [1.0] * len(NAMES) if scales is None else scales
    for t in range(steps):
        grads, ctx = _grads(t), _ctx(t)
        upd, st_ref = rule.update(theta, grads, st_ref, p_ref, ctx)
        p_ref = {n: p_ref[n] + s * upd[n] for n, s in zip(NAMES, sc)}
        st_fast = rule.step_(theta, p_fast, [grads[n] for n in NAMES], st_fast, spec, ctx, scales)
    assert set(st_fast) == set(st_ref)
    for k in st_ref:
        torch.testing.assert_close(st_fast[k], st_ref[k], rtol=rtol, atol=1e-14, msg=f"state {k}")
    for n, pf in zip(NAMES, p_fast):
        change_ref, change_fast = p_ref[n] - p0[n], pf - p0[n]
        assert change_ref.abs().max() > 1e-6, "the test should move every parameter"
        scale = change_ref.abs().max()
        err = (change_fast - change_ref).abs().max() / scale
        assert err < rtol, f"{n}: relative error {float(err):.2e}"


SCALES = [0.5, 1.0, 2.0, 1.0, 3.0, 1.0, 0.25]

ADAM = [dict(lr=1e-2), dict(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=1e-2)]
SGD = [dict(lr=0.1), dict(lr=0.05, weight_decay=1e-2), dict(lr=0.05, momentum=0.9),
       dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
       dict(lr=0.05, momentum=0.8, dampening=0.3)]
MLP = [dict(), dict(hidden_size=8), dict(num_layers=1, hidden_size=16),
       dict(act_features=True), dict(loss_features=True),
       dict(act_features=True, loss_features=True, decays=(0.3, 0.7, 0.95))]


@pytest.mark.parametrize("scales", [None, SCALES], ids=["scale1", "scales"])
@pytest.mark.parametrize("name,kwargs", [("adam", k) for k in ADAM] + [("sgd", k) for k in SGD]
                         + [("mlp", k) for k in MLP])
def test_step_inplace_equals_update(name, kwargs, scales):
    rule = make_rule(name, **kwargs)
    assert rule.has_step_()
    _compare(rule, scales=scales)


@pytest.mark.parametrize("rows", [1, 7, 64, 250, 1 << 20])
def test_mlp_step_inplace_any_window_size(rows):
    """Windows inside one tensor, windows spanning several tensors, one window for all."""
    rule = make_rule("mlp", act_features=True, loss_features=True, hidden_size=8)
    rule.chunk_rows = rows
    _compare(rule, steps=3, scales=SCALES)


def test_windows_cover_the_layout():
    numels = (5, 0, 17, 1, 40)
    for rows in (1, 3, 16, 100):
        cover = []
        for a, b, pieces in _windows(numels, rows):
            assert 0 < b - a <= rows and sum(e - s for _, s, e in pieces) == b - a
            cover += [(t, i) for t, s, e in pieces for i in range(s, e)]
        assert cover == [(t, i) for t, n in enumerate(numels) for i in range(n)]


def test_has_step_respects_overridden_update():
    class Tweaked(type(make_rule("adam"))):
        def update(self, *a, **k):
            return super().update(*a, **k)

    assert make_rule("adam").has_step_() and make_rule("mlp").has_step_()
    assert not Tweaked().has_step_()  # inherited step_ would not implement the new update
    assert not make_rule("layerwise_lr").has_step_()
    assert Rule.step_ is None


# -- through LearnedOptimizer ------------------------------------------------------------------
def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _run(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(32, 6, generator=g, dtype=DT), torch.randint(0, 3, (32,), generator=g)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)


def _groups(model, lr_second=0.3):
    return [{"params": list(model[0].parameters())},
            {"params": list(model[2].parameters()), "lr": lr_second}]


@pytest.mark.parametrize("name,kwargs", [("adam", dict(lr=1e-2, weight_decay=1e-2)),
                                         ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True)),
                                         ("mlp", dict(hidden_size=8, loss_features=True,
                                                      act_features=True))])
def test_learned_optimizer_fast_path_equals_pure(name, kwargs, monkeypatch):
    theta = _theta(make_rule(name, **kwargs), FlatSpec.of(dict(_model().named_parameters())))
    models, opts = [], []
    for fast in (True, False):
        m = _model()
        rule = make_rule(name, **kwargs)
        if not fast:
            monkeypatch.setattr(rule, "has_step_", lambda: False)
        opt = LearnedOptimizer(_groups(m), rule=rule, theta=theta, model=m)
        models.append(m)
        opts.append(opt)
    calls = []
    real = opts[0].rule.step_
    monkeypatch.setattr(opts[0].rule, "step_", lambda *a, **k: calls.append(1) or real(*a, **k))
    for m, opt in zip(models, opts):
        _run(m, opt, 6)
    assert len(calls) == 6  # the fast path ran
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for k, v in opts[1].state["rule"].items():
        torch.testing.assert_close(opts[0].state["rule"][k], v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,kwargs", [("adam", dict(lr=1e-2)),
                                         ("sgd", dict(lr=0.1, momentum=0.9)),
                                         ("mlp", dict(hidden_size=8, loss_features=True))])
def test_state_dict_round_trip_with_fast_path(name, kwargs):
    model = _model()
    theta = _theta(make_rule(name, **kwargs), FlatSpec.of(dict(model.named_parameters())))
    opt = LearnedOptimizer(_groups(model), rule=make_rule(name, **kwargs), theta=theta)
    assert opt.rule.has_step_()
    _run(model, opt, 4)
    sd = opt.state_dict()
    snapshot = copy.deepcopy(sd)
    twin = copy.deepcopy(model)
    _run(model, opt, 4, seed=2)
    opt2 = LearnedOptimizer(_groups(twin), rule=make_rule(name, **kwargs))
    opt2.load_state_dict(snapshot)
    _run(twin, opt2, 4, seed=2)
    assert int(opt2.state["rule"]["step"]) == 8
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # loading copies the state: stepping opt2 did not touch the dict it was loaded from
    opt3 = LearnedOptimizer(_groups(copy.deepcopy(twin)), rule=make_rule(name, **kwargs))
    before = copy.deepcopy(snapshot["state"])  # per-parameter state since LearnedOptimizer 8e55d92
    opt3.load_state_dict(snapshot)
    _run(twin, opt3, 2)
    assert before.keys() == snapshot["state"].keys() and before
    for i, st in before.items():
        for k, v in st.items():
            assert torch.equal(snapshot["state"][i][k], v) if torch.is_tensor(v) else \
                snapshot["state"][i][k] == v


def test_mixed_dtypes_fall_back_to_update():
    model = _model()
    model[2].float()
    opt = LearnedOptimizer(model.parameters(), rule=make_rule("adam", lr=1e-2))
    before = [p.detach().clone() for p in model.parameters()]
    model[2](model[0](torch.randn(4, 6, dtype=DT)).float()).sum().backward()
    plist = [p for g in opt.param_groups for p in g["params"]]
    assert not opt._can_step_(plist, opt._rule_state(dict(enumerate(plist))))
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -- LayerwiseLR SGD shortcut ------------------------------------------------------------------
def test_layerwise_sgd_shortcut_equals_general_path():
    params, spec = _params(), FlatSpec.of(_params())
    fast = make_rule("layerwise_lr", num_steps=4, direction="sgd")
    general = make_rule("layerwise_lr", num_steps=4, direction="sgd", act_features=True)
    theta = fast.init_theta(spec)
    theta["log_lr"] = torch.randn(4, spec.num_tensors, generator=torch.Generator().manual_seed(3))
    theta_g = {**theta, "w_act": torch.zeros(2)}
    st_f, st_g = fast.init(params), general.init(params)
    for t in range(6):
        grads = _grads(t)
        uf, st_f = fast.update(theta, grads, st_f, params, None)
        ug, st_g = general.update(theta_g, grads, st_g, params, _ctx(t))
        assert list(uf) == NAMES
        for n in NAMES:
            assert uf[n].shape == params[n].shape
            # two code paths (per-tensor shortcut vs flat general path): equal to float64 rounding
            torch.testing.assert_close(uf[n], ug[n], rtol=1e-12, atol=1e-15)
        assert torch.equal(st_f["step"], st_g["step"])


def test_layerwise_sgd_shortcut_meta_gradient_under_vmap():
    spec = FlatSpec.of(_params())
    rule = make_rule("layerwise_lr", num_steps=3)
    log_lr = torch.randn(3, spec.num_tensors, dtype=DT, requires_grad=True)
    params = {n: torch.stack([v, 2 * v]) for n, v in _params().items()}
    grads = {n: torch.stack([g, -g]) for n, g in _grads(0).items()}
    steps = torch.tensor([0.0, 2.0], dtype=DT)

    def one(p, g, s):
        u, _ = rule.update({"log_lr": log_lr}, g, {"step": s}, p)
        return sum((p[n] + u[n]).pow(2).sum() for n in p)

    out = vmap(one)(params, grads, steps).sum()
    (d,) = torch.autograd.grad(out, log_lr)
    lr = log_lr.detach().exp()
    ref = torch.zeros_like(d)
    for b, s in enumerate((0, 2)):
        for i, n in enumerate(NAMES):
            p, g = params[n][b], grads[n][b]
            # d/dlog_lr of ||p - lr g||^2 = -2 lr <p - lr g, g>
            ref[s, i] += -2 * lr[s, i] * ((p - lr[s, i] * g) * g).sum()
    torch.testing.assert_close(d, ref, rtol=1e-12, atol=1e-14)


# -- cross entropy -------------------------------------------------------------------------------
def test_ce_equals_torch_cross_entropy_value_grad_vmap():
    g = torch.Generator().manual_seed(0)
    out = 5 * torch.randn(4, 16, 10, generator=g, dtype=DT)
    y = torch.randint(0, 10, (4, 16), generator=g)
    for o, t in zip(out, y):
        torch.testing.assert_close(supervised_loss("ce", o, t), F.cross_entropy(o, t),
                                   rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(vmap(lambda o, t: supervised_loss("ce", o, t))(out, y),
                               torch.stack([F.cross_entropy(o, t) for o, t in zip(out, y)]),
                               rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(vmap(grad(lambda o, t: supervised_loss("ce", o, t)))(out, y),
                               vmap(grad(lambda o, t: F.cross_entropy(o, t)))(out, y),
                               rtol=1e-12, atol=1e-14)
    # one formulation everywhere: no query of whether a tensor is batched (a private torch API)
    import inspect
    import metaopt.tasks.mlp
    assert "_functorch" not in inspect.getsource(metaopt.tasks.mlp)
