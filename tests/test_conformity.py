"""Every optimizer metaopt exports behaves like a torch.optim optimizer.

The checks follow PyTorch's own optimizer suite (test/optim/test_optim.py, TestOptimRenewed):
state_dict format and round trips, hooks, copies, add_param_group, parameters without
gradients, step() without a closure, LR schedulers, torch.distributed.checkpoint. Each is run
on torch.optim.Adam and torch.optim.SGD as controls, which must pass the same checks.

The model is two linear layers that both read the input (so IDBD/Autostep, which need one
linear layer per param group and the input batch, fit too); loss = half squared error.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from metaopt.optim import (IDBD, SGDHD, SLRLA, AdamHD, Autostep, LearnedOptimizer, Lookahead,
                           Lookbehind)
from metaopt.rules import RULES, make_rule

DT = torch.float64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=-1)


def _net(seed=0):
    torch.manual_seed(seed)
    return Net().to(DT)


def _batch(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, 5, generator=g, dtype=DT)


def _loss(model, x, y, only_a=False):
    if only_a:  # layer b is not used: its grads stay None after zero_grad()
        return 0.5 * ((model.a(x) - y[:, :3]) ** 2).sum(-1).mean()
    out = model(x)
    return 0.5 * ((out - y) ** 2).sum(-1).mean()


def _groups(model, names=True):
    def ps(m):
        return list(m.named_parameters(prefix="")) if names else list(m.parameters())
    if names:
        return [{"params": [(f"a.{n}", p) for n, p in model.a.named_parameters()]},
                {"params": [(f"b.{n}", p) for n, p in model.b.named_parameters()]}]
    return [{"params": list(model.a.parameters())}, {"params": list(model.b.parameters())}]


def _default_kwargs(model):
    """The shipped default rule: pass model= only if it needs activations."""
    from metaopt.rules.io import load_rule, resolve_rule_path
    rule, _, _ = load_rule(resolve_rule_path("default"))
    return {"model": model} if rule.needs_activations else {}


# name -> (factory(params, model), needs_closure, lr_scales_step, needs_inputs)
CASES = {
    "torch.Adam": (lambda ps, m: torch.optim.Adam(ps, lr=1e-2), False, True, False),
    "torch.SGD": (lambda ps, m: torch.optim.SGD(ps, lr=0.05, momentum=0.9), False, True, False),
    "LearnedOptimizer[default]": (lambda ps, m: LearnedOptimizer(ps, **_default_kwargs(m)),
                                  False, True, False),
    "LearnedOptimizer[adam]": (lambda ps, m: LearnedOptimizer(ps, rule=make_rule("adam", lr=1e-2)),
                               False, True, False),
    "LearnedOptimizer[mlp-loss]": (lambda ps, m: LearnedOptimizer(
        ps, rule=make_rule("mlp", hidden_size=4, loss_features=True)), False, True, False),
    "LearnedOptimizer[mlp-act]": (lambda ps, m: LearnedOptimizer(
        ps, rule=make_rule("mlp", hidden_size=4, act_features=True), model=m), False, True, False),
    "LearnedOptimizer[layerwise_lr]": (lambda ps, m: LearnedOptimizer(
        ps, rule=make_rule("layerwise_lr", lr=0.05, num_steps=4, direction="adam")), False, True, False),
    "Lookahead": (lambda ps, m: Lookahead(torch.optim.SGD(ps, lr=0.05, momentum=0.9), k=2),
                  False, True, False),
    "Lookahead[Adam,pullback]": (lambda ps, m: Lookahead(ps, inner=torch.optim.Adam, lr=1e-2, k=2,
                                                         pullback_momentum="pullback"),
                                 False, True, False),
    "Lookbehind": (lambda ps, m: Lookbehind(ps, lr=0.05, momentum=0.9, k=2), True, True, False),
    "SLRLA": (lambda ps, m: SLRLA(ps, lr=0.05, momentum=0.9, k=2, milestones=[3]),
              False, True, False),
    "SGDHD": (lambda ps, m: SGDHD(ps, lr=0.05, momentum=0.9), False, False, False),
    "AdamHD": (lambda ps, m: AdamHD(ps, lr=1e-2), False, False, False),
    "IDBD": (lambda ps, m: IDBD(ps, lr=0.05), False, False, True),
    "Autostep": (lambda ps, m: Autostep(ps, lr=0.05), False, False, True),
}
if "pertensor" in RULES:  # the per-tensor learned rule (fresh theta), when this checkout has it
    CASES["LearnedOptimizer[pertensor]"] = (
        lambda ps, m: LearnedOptimizer(ps, rule=make_rule("pertensor")), False, True, False)
NAMES = list(CASES)
#: LearnedOptimizer rebuilds its flat rule state from the loaded per-parameter entries, so
#: ``load_state_dict`` copies; torch.optim's optimizers (and the baselines built on its
#: ``load_state_dict``) keep the given tensors as their state
COPIES_ON_LOAD = {n for n in NAMES if n.startswith("LearnedOptimizer")}


def _make(name, model, names=True, groups=None):
    factory = CASES[name][0]
    return factory(groups if groups is not None else _groups(model, names), model)


def _step(name, model, opt, i, closure=True, only_a=False):
    """One training step on batch ``i``; with ``closure=False``: backward, then ``step()``."""
    _, needs_closure, _, needs_inputs = CASES[name]
    x, y = _batch(i)
    kw = {"inputs": x} if needs_inputs else {}
    if closure or needs_closure:
        def closure_fn():
            opt.zero_grad()
            loss = _loss(model, x, y, only_a)
            loss.backward()
            return loss
        return opt.step(closure_fn, **kw)
    opt.zero_grad()
    _loss(model, x, y, only_a).backward()
    return opt.step(**kw)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_params_equal(a, b, tol=1e-12):
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


def _reattach(opt, model):
    if isinstance(opt, LearnedOptimizer) and opt.rule.needs_activations:
        opt.attach(model)


def _tensor_tree_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            _tensor_tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensor_tree_equal(x, y) for x, y in zip(a, b))
    return a == b


# -- state_dict ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_format(name):
    model = _net()
    opt = _make(name, model)
    for i in range(3):
        _step(name, model, opt, i)
    sd = opt.state_dict()
    assert {"state", "param_groups"} <= set(sd)
    n = sum(1 for _ in model.parameters())
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    assert sorted(ids) == list(range(n))
    assert all(isinstance(k, int) and 0 <= k < n for k in sd["state"])
    assert sd["state"], "no per-parameter state after 3 steps"
    names = [nm for g in sd["param_groups"] for nm in g["param_names"]]
    assert names == ["a.weight", "a.bias", "b.weight", "b.bias"]
    for g in sd["param_groups"]:
        assert "lr" in g
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # no pickled objects inside
    assert _tensor_tree_equal(loaded["state"], sd["state"])


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_identically(name):
    model = _net()
    opt = _make(name, model)
    for i in range(3):
        _step(name, model, opt, i)
    sd = copy.deepcopy(opt.state_dict())
    loaded = copy.deepcopy(sd)  # the dict as it was before loading
    assert loaded["state"], "no state to load: the checks below would be vacuous"
    twin = copy.deepcopy(model)
    for i in range(3, 7):
        _step(name, model, opt, i)
    opt2 = _make(name, twin)
    opt2.load_state_dict(sd)
    for i in range(3, 7):
        _step(name, twin, opt2, i)
    _assert_params_equal(_params(model), _params(twin))
    # the param groups are always copied (torch.optim deep-copies them on load)
    assert _tensor_tree_equal(sd["param_groups"], loaded["param_groups"])
    if name in COPIES_ON_LOAD:
        # loading copied the state: the dict it was loaded from (theta, rule and per-parameter
        # state) is unchanged after opt2 stepped four times
        assert _tensor_tree_equal(sd, loaded)
    else:
        # like torch.optim: the loaded tensors became opt2's state, and moved as it stepped
        assert not _tensor_tree_equal(sd["state"], loaded["state"])


@pytest.mark.parametrize("name", NAMES)
def test_hooks_fire(name):
    model = _net()
    opt = _make(name, model)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("step_post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def sd_post(o, sd):
        calls.append("sd_post")
        sd["extra"] = 1
        return sd
    opt.register_state_dict_post_hook(sd_post)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    _step(name, model, opt, 0)
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    for event in ("step_pre", "step_post", "sd_pre", "sd_post", "load_pre", "load_post"):
        assert event in calls, event
    assert calls.index("sd_pre") < calls.index("sd_post") < calls.index("load_pre") \
        < calls.index("load_post")


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", NAMES)
def test_copies_step_like_the_original(name, how):
    model = _net()
    opt = _make(name, model)
    for i in range(2):
        _step(name, model, opt, i)
    if how == "deepcopy":
        twin, opt2 = copy.deepcopy((model, opt))
    else:
        twin, opt2 = pickle.loads(pickle.dumps((model, opt)))
    _reattach(opt2, twin)
    for i in range(2, 5):
        _step(name, model, opt, i)
        _step(name, twin, opt2, i)
    _assert_params_equal(_params(model), _params(twin))


# -- parameter groups, frozen and gradient-less parameters --------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_trains_the_new_group(name):
    model = _net()
    opt = _make(name, model, groups=[{"params": [(f"a.{n}", p) for n, p in model.a.named_parameters()]}])
    for i in range(2):
        _step(name, model, opt, i, only_a=True)
    b0 = [p.detach().clone() for p in model.b.parameters()]
    if isinstance(opt, LearnedOptimizer) and opt.rule.spec_dependent:
        with pytest.raises(ValueError, match="spec-dependent"):
            opt.add_param_group({"params": list(model.b.named_parameters(prefix="b"))})
        return
    opt.add_param_group({"params": list(model.b.named_parameters(prefix="b"))})
    a1 = [p.detach().clone() for p in model.a.parameters()]
    for i in range(2, 5):
        _step(name, model, opt, i)
    assert all(not torch.equal(p, q) for p, q in zip(b0, model.b.parameters()))
    assert all(not torch.equal(p, q) for p, q in zip(a1, model.a.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    sd = opt.state_dict()
    assert sorted(i for g in sd["param_groups"] for i in g["params"]) == [0, 1, 2, 3]


@pytest.mark.parametrize("freeze", ["grad_none", "requires_grad_false"])
@pytest.mark.parametrize("name", NAMES)
def test_parameters_without_grad_are_untouched(name, freeze):
    """Layer b gets no gradient (outside the loss, or frozen) after it has been trained: it must
    not move and its state must not change -- also across Lookahead's slow-weight syncs."""
    model = _net()
    opt = _make(name, model)
    for i in range(3):  # train everything first, so b has state and (Lookahead) slow weights
        _step(name, model, opt, i)
    if freeze == "requires_grad_false":
        model.b.requires_grad_(False)
    before_p = [p.detach().clone() for p in model.b.parameters()]
    before_state = copy.deepcopy({k: v for k, v in opt.state_dict()["state"].items() if k >= 2})
    a_before = _params(model)[:2]
    for i in range(3, 8):  # crosses syncs of the k=2 wrappers
        _step(name, model, opt, i, only_a=True)
    for p, q in zip(before_p, model.b.parameters()):
        assert torch.equal(p, q), "a parameter without a gradient moved"
    after_state = {k: v for k, v in opt.state_dict()["state"].items() if k >= 2}
    shared = {"step", "loss_mean", "loss_var"}  # the learned rule's shared scalars advance
    strip = (lambda d: {i: {k: v for k, v in e.items() if k not in shared} for i, e in d.items()}) \
        if isinstance(opt, LearnedOptimizer) else (lambda d: d)
    assert _tensor_tree_equal(strip(before_state), strip(after_state)), \
        "state of a parameter without a gradient changed"
    assert any(not torch.equal(p, q) for p, q in zip(a_before, _params(model)[:2]))


@pytest.mark.parametrize("name", NAMES)
def test_never_trained_frozen_layer_gets_no_movement(name):
    model = _net()
    model.b.requires_grad_(False)
    b0 = [p.detach().clone() for p in model.b.parameters()]
    opt = _make(name, model)
    for i in range(5):
        _step(name, model, opt, i, only_a=True)
    for p, q in zip(b0, model.b.parameters()):
        assert torch.equal(p, q)


# -- stepping ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_step_without_closure(name):
    model = _net()
    opt = _make(name, model)
    p0 = _params(model)
    if CASES[name][1]:  # needs a closure by design (like torch.optim.LBFGS): a clear error
        opt.zero_grad()
        x, y = _batch(0)
        _loss(model, x, y).backward()
        with pytest.raises(ValueError, match="closure"):
            opt.step()
        return
    grads = None
    for i in range(3):
        assert _step(name, model, opt, i, closure=False) is None
        grads = [p.grad.clone() for p in model.parameters()]
    assert all(not torch.equal(p, q) for p, q in zip(p0, _params(model)))
    # like torch.optim, .grad is not written by step()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_step_does_not_write_grads(name):
    model = _net()
    opt = _make(name, model)
    x, y = _batch(0)
    kw = {"inputs": x} if CASES[name][3] else {}
    snap = {}

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        snap["g"] = [p.grad.clone() for p in model.parameters()]
        return loss
    for _ in range(3):
        opt.step(closure, **kw)
    assert all(torch.equal(g, p.grad) for g, p in zip(snap["g"], model.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_lr_schedulers(name):
    _, _, lr_scales, _ = CASES[name]
    model = _net()
    opt = _make(name, model)
    cycle = "momentum" in opt.defaults or "betas" in opt.defaults
    if name.startswith(("Lookahead", "Lookbehind", "SLRLA", "torch")):
        assert cycle, "wrapper must expose the inner optimizer's momentum/betas"
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=10,
                                                cycle_momentum=cycle)
    lrs = []
    for i in range(4):
        _step(name, model, opt, i)
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert len(set(lrs)) > 1 or not lr_scales
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # an lr of 0 stops an optimizer whose lr scales its step
    model = _net()
    opt = _make(name, model)
    _step(name, model, opt, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0)
    p0 = _params(model)
    for i in range(1, 3):
        _step(name, model, opt, i)
    if lr_scales and not name.startswith(("Lookahead", "SLRLA")):  # syncs still move
        _assert_params_equal(p0, _params(model), tol=0)


@pytest.mark.parametrize("name", NAMES)
def test_distributed_checkpoint_state_dict(name):
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    model = _net()
    opt = _make(name, model)
    for i in range(3):
        _step(name, model, opt, i)
    osd = get_optimizer_state_dict(model, opt)
    assert set(osd["state"]) <= {"a.weight", "a.bias", "b.weight", "b.bias"} and osd["state"]
    osd = copy.deepcopy(osd)
    twin = copy.deepcopy(model)
    for i in range(3, 6):
        _step(name, model, opt, i)
    opt2 = _make(name, twin)
    if name in ("Lookbehind", "IDBD", "Autostep"):
        # torch.distributed.checkpoint materializes a fresh optimizer's state by step(closure=None)
        # with lr=0, which these cannot do (Lookbehind needs a closure; IDBD/Autostep the inputs
        # and lr > 0): load into them after one real step, or use opt.load_state_dict.
        keep = _params(twin)
        _step(name, twin, opt2, 0)
        with torch.no_grad():
            for p, q in zip(twin.parameters(), keep):
                p.copy_(q)
    set_optimizer_state_dict(twin, opt2, osd)
    for i in range(3, 6):
        _step(name, twin, opt2, i)
    _assert_params_equal(_params(model), _params(twin))


def test_sgdhd_defaults_are_safe_on_torch_quadratic():
    """PyTorch's test problem (test_forloop_goes_right_direction): SGDHD(params) with defaults."""
    for seed in range(3):
        for make in (lambda ps: SGDHD(ps), lambda ps: SGDHD(ps, momentum=0.9), lambda ps: AdamHD(ps)):
            torch.manual_seed(seed)
            w = nn.Parameter(torch.randn(10, 5))
            b = nn.Parameter(torch.randn(10))
            x = torch.randn(5)
            opt = make([w, b])

            def closure():
                opt.zero_grad()
                loss = (w.mv(x) + b).pow(2).sum()
                loss.backward()
                return loss
            start = closure().item()
            for _ in range(20):
                opt.step(closure)
            end = closure().item()
            assert end == end and end < start
            assert opt.param_groups[0]["lr"] >= 0


# -- a Lightning-style fine-tuning loop ----------------------------------------------------------------
def _finetune_run(name, model, opt, steps, start=0, unfreeze_at=3, loss_hist=None):
    """Lightning's BaseFinetuning pattern: layer b starts frozen and out of the optimizer; at
    step ``unfreeze_at`` it is unfrozen and added as a new param group."""
    for i in range(start, steps):
        if i == unfreeze_at:
            model.b.requires_grad_(True)
            opt.add_param_group({"params": list(model.b.named_parameters(prefix="b"))})
        loss = _step(name, model, opt, i)
        if loss_hist is not None:
            loss_hist.append(float(loss))


@pytest.mark.parametrize("name", NAMES)
def test_lightning_style_freeze_unfreeze_and_resume(name):
    def fresh():
        model = _net()
        model.b.requires_grad_(False)
        b0 = [p.detach().clone() for p in model.b.parameters()]
        groups = [{"params": [(f"a.{n}", p) for n, p in model.a.named_parameters()]}]
        return model, _make(name, model, groups=groups), b0

    model, opt, b0 = fresh()
    if isinstance(opt, LearnedOptimizer) and opt.rule.spec_dependent:
        pytest.skip("spec-dependent rules cannot take new parameter groups")
    _finetune_run(name, model, opt, 3)
    assert all(torch.equal(p, q) for p, q in zip(b0, model.b.parameters()))  # frozen: untouched
    _finetune_run(name, model, opt, 5, start=3)                             # unfrozen at 3
    assert all(not torch.equal(p, q) for p, q in zip(b0, model.b.parameters()))
    ckpt = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
    _finetune_run(name, model, opt, 9, start=5)

    # resume: rebuild model and optimizer as the loop would (b unfrozen, its group added), load
    model2, opt2, _ = fresh()
    model2.b.requires_grad_(True)
    opt2.add_param_group({"params": list(model2.b.named_parameters(prefix="b"))})
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    _reattach(opt2, model2)
    _finetune_run(name, model2, opt2, 9, start=5)
    _assert_params_equal(_params(model), _params(model2))
