"""Contract tests driven by the registries (optax's alias_test style).

Every rule in ``sorted(RULES)`` -- the shipped ones, any the rules package registers later, and the
toy rule registered in this file -- is checked with its default constructor on a tiny float64
MLP task:

* config round trip: ``make_rule(**rule.describe())`` rebuilds the same rule (JSON-able config);
* float32 and float64: a nested meta-gradient keeps the dtype, is finite, and agrees across them;
* vmap == loop: the vmapped meta-batch equals the slot-by-slot loop;
* meta-gradient vs central finite differences in float64, for every deterministic scheme
  (nested, continuous/euler/backprop, interleaved in its auto mode);
* ES/PES (stochastic): a finite, graph-free estimate of theta's shapes, and the slot's own run
  equals the nested run at theta;
* ``step_`` == ``update`` where a rule has the in-place fast path;
* ``state_dict`` round trip through :class:`LearnedOptimizer` resumes bit-identically;
* a declared ``state_layout`` (and ``theta_layout`` of a spec-dependent rule) covers every key,
  before and after an update, with shapes that fit it.

A rule registered with ``@register_rule`` before this module is collected is tested by default.
Structured config nodes (rule/ and scheme/ groups) are checked against the constructors' defaults.
"""
import copy
import inspect
import json
import math

import pytest
import torch
from torch import nn

from metaopt.meta import SCHEMES, make_scheme
from metaopt.meta.slots import new_slot
from metaopt.meta.unroll import META_LOSSES
from metaopt.optim import LearnedOptimizer
from metaopt.rules import RULES, Rule, make_rule, register_rule
from metaopt.types import FlatSpec
from metaopt.tasks.base import ArrayDataset, Task, TaskFamily
from tests.helpers import TinyClassifier, needs_extra_for


@register_rule
class ToyTanhSGD(Rule):
    """A rule defined outside the package: w <- w - lr * tanh(g / scale) * scale (smooth)."""
    name = "toy_tanh_sgd"

    def __init__(self, lr: float = 0.3, scale: float = 0.1):
        self.lr, self.scale = float(lr), float(scale)

    def config(self):
        return {"lr": self.lr, "scale": self.scale}

    def init_theta(self, spec, generator=None):
        return {"log_lr": torch.tensor(math.log(self.lr))}

    def init(self, params):
        return {"step": next(iter(params.values())).new_zeros(())}

    def update(self, theta, grads, state, params, ctx=None):
        lr = torch.exp(theta["log_lr"])
        updates = {k: -lr * self.scale * torch.tanh(g / self.scale) for k, g in grads.items()}
        return updates, {"step": state["step"] + 1}


RULE_NAMES = sorted(RULES)
DETERMINISTIC = {
    "nested": dict(truncation=3),
    "continuous": dict(window=3, method="euler", gradient="backprop"),
    "interleaved": dict(),  # auto: forward mode for <= 128 meta-parameters, else one-step
}
STOCHASTIC = {"es": dict(truncation=3, num_samples=3), "pes": dict(truncation=3, num_samples=3)}


def test_registries_are_covered():
    assert "toy_tanh_sgd" in RULE_NAMES  # a rule registered in a test file is in the contract
    assert set(DETERMINISTIC) | set(STOCHASTIC) == set(SCHEMES), "a scheme has no contract entry"


class CastFamily(TaskFamily):
    """Tiny classifiers whose data and initial weights are drawn in float64 and then cast, so the
    float32 and float64 problems are the same problem up to rounding."""
    name = "tiny_cast"

    def __init__(self, dtype):
        self.dtype = dtype

    def sample(self, generator):
        seed = int(torch.randint(0, 1000, (1,), generator=generator))
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(5, 3, generator=g, dtype=torch.float64)
        x = torch.randn(60, 5, generator=g, dtype=torch.float64)
        y = (x @ w + 0.5 * torch.randn(60, 3, generator=g, dtype=torch.float64)).argmax(1)
        return Task("tiny_cast", TinyClassifier(hidden=4).double(),
                    ArrayDataset(x.to(self.dtype), y, seed=seed), batch_size=8, structure=(4,))


def _slots(rule, k=2, dtype=torch.float64):
    fam = CastFamily(dtype)
    return [new_slot(fam, rule, 11 + 7 * i, horizon=100, dtype=dtype) for i in range(k)]


def _theta(rule, dtype=torch.float64):
    """The rule's init, nudged off special points (zero biases sit on ReLU kinks)."""
    spec = FlatSpec.of(_slots(rule, 1)[0].params)
    theta = rule.init_theta(spec, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(5)
    theta = {k: (v.double() + 0.05 * torch.randn(v.shape, generator=g, dtype=torch.float64))
             for k, v in theta.items()}
    return {k: v.to(dtype).requires_grad_(True) for k, v in theta.items()}


def _flat(d):
    return torch.cat([v.detach().reshape(-1).double() for v in d.values()])


# -- rule-level contracts -------------------------------------------------------------------------
@pytest.mark.parametrize("name", RULE_NAMES)
def test_config_round_trip(name):
    rule = RULES[name]()
    desc = rule.describe()
    assert desc["name"] == name
    assert json.loads(json.dumps(desc)) == desc  # JSON-able: rule.json stores it
    again = make_rule(**desc)
    assert type(again) is type(rule) and again.describe() == desc
    spec = FlatSpec.of(_slots(rule, 1)[0].params)
    a = rule.init_theta(spec, torch.Generator().manual_seed(0))
    b = again.init_theta(spec, torch.Generator().manual_seed(0))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", RULE_NAMES)
def test_float32_and_float64(name):
    rule = RULES[name]()
    outs = {}
    for dtype in (torch.float32, torch.float64):
        out = make_scheme("nested", truncation=3).meta_gradient(
            rule, _theta(rule, dtype), _slots(rule, dtype=dtype), "valid_mean")
        for d in [out.grads, *out.params, *out.states]:
            for k, v in d.items():
                if v.is_floating_point():
                    assert v.dtype == dtype, f"{k} is {v.dtype} in a {dtype} run"
                assert torch.isfinite(v).all(), k
        outs[dtype] = out
    lo, hi = outs[torch.float32], outs[torch.float64]
    assert lo.meta_losses == pytest.approx(hi.meta_losses, rel=1e-5)
    g32, g64 = _flat(lo.grads), _flat(hi.grads)
    assert float((g32 - g64).norm()) <= 1e-3 * float(g64.norm()) + 1e-6


@pytest.mark.parametrize("name", RULE_NAMES)
def test_vmap_equals_loop(name):
    rule = RULES[name]()
    theta = _theta(rule)
    a, b = (make_scheme("nested", truncation=3, use_vmap=v).meta_gradient(
        rule, theta, _slots(rule, 3), "valid_mean") for v in (True, False))
    for k in theta:
        torch.testing.assert_close(a.grads[k], b.grads[k], rtol=1e-9, atol=1e-12)
    for pa, pb in zip(a.params + a.states, b.params + b.states):
        for k in pa:
            torch.testing.assert_close(pa[k], pb[k], rtol=1e-10, atol=1e-12)
    assert a.meta_losses == pytest.approx(b.meta_losses, rel=1e-12)


def _toy_grads(spec, step, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g, dtype=dtype) for s in spec.shapes]


@pytest.mark.parametrize("name", [n for n in RULE_NAMES if RULES[n]().has_step_()])
def test_step_equals_update(name):
    """The in-place fast path has the effect of ``params + update`` (float64, several steps)."""
    rule = RULES[name]()
    params = _slots(rule, 1)[0].params
    spec = FlatSpec.of(params)
    theta = {k: v.detach() for k, v in _theta(rule).items()}
    ref = {k: v.clone() for k, v in params.items()}
    fast = [v.clone() for v in params.values()]
    st_ref = rule.init(ref)
    st_fast = {k: v.clone() for k, v in st_ref.items()}
    for t in range(4):
        grads = _toy_grads(spec, t)
        ctx = {"loss": torch.tensor(1.5 - 0.1 * t, dtype=torch.float64), "act": None}
        upd, st_ref = rule.update(theta, dict(zip(spec.names, grads)), st_ref, ref, ctx)
        ref = {k: ref[k] + upd[k] for k in ref}
        st_fast = rule.step_(theta, fast, grads, st_fast, spec, ctx)
    for n, v in zip(spec.names, fast):
        assert not torch.equal(v, params[n]), "the test should move every parameter"
        torch.testing.assert_close(v, ref[n], rtol=1e-10, atol=1e-13)
    assert set(st_fast) == set(st_ref)
    for k in st_ref:
        torch.testing.assert_close(st_fast[k], st_ref[k], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", RULE_NAMES)
def test_learned_optimizer_state_dict_round_trip(name):
    """Three steps, state_dict, a fresh optimizer on a copy of the model loads it; three more
    steps on both give bit-identical parameters."""
    rule = RULES[name]()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    kw = {"model": model} if rule.needs_activations else {}
    opt = LearnedOptimizer(model.parameters(), rule=rule, **kw)

    def run(m, o, n):
        for _ in range(n):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    run(model, opt, 3)
    twin = copy.deepcopy(model)
    opt2 = LearnedOptimizer(twin.parameters(), rule=RULES[name](),
                            **({"model": twin} if rule.needs_activations else {}))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    before = [p.detach().clone() for p in model.parameters()]
    run(model, opt, 3)
    run(twin, opt2, 3)
    for p, q, b in zip(model.parameters(), twin.parameters(), before):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


#: rules that do not declare their state layout yet (LearnedOptimizer guesses it from shapes);
#: every other rule must declare one
LAYOUT_UNDECLARED = {"toy_tanh_sgd"}
#: non-default options that change which state keys a rule keeps
LAYOUT_VARIANTS = [("sgd", dict(momentum=0.9)), ("layerwise_lr", dict(direction="adam",
                   loss_features=True, act_features=True)), ("mlp", dict(loss_features=True)),
                   ("sgd_hd", dict(momentum=0.9)), ("lookahead", dict(inner="adam")),
                   ("anchored", dict(adapt_range=1.0))]


@pytest.mark.parametrize("name,kwargs", [(n, {}) for n in RULE_NAMES] + LAYOUT_VARIANTS)
def test_declared_state_layout(name, kwargs):
    from metaopt.rules.layout import check_layout
    try:
        rule = RULES[name](**kwargs)
    except TypeError:   # an option this version of the rule does not have
        pytest.skip(f"{name} has no option {sorted(kwargs)}")
    if rule.state_layout is None:
        assert name in LAYOUT_UNDECLARED, f"rule {name!r} declares no state_layout"
        pytest.skip(f"{name} declares no state_layout yet")
    params = _slots(rule, 1)[0].params
    spec = FlatSpec.of(params)
    state = rule.init(params)
    check_layout(rule.state_layout, state, spec)
    theta = {k: v.detach() for k, v in _theta(rule).items()}
    if rule.spec_dependent:
        assert rule.theta_layout is not None, f"spec-dependent rule {name!r} declares no theta_layout"
        check_layout(rule.theta_layout, theta, spec, "theta")
    grads = dict(zip(spec.names, _toy_grads(spec, 0)))
    ctx = {"loss": torch.tensor(1.0, dtype=torch.float64),
           "act": {n: torch.zeros(2, dtype=torch.float64) for n in spec.names}}
    _, new = rule.update(theta, grads, state, params, ctx)
    assert set(new) == set(state)
    check_layout(rule.state_layout, new, spec)


def test_layout_check_names_the_bad_key():
    from metaopt.rules.layout import check_layout
    spec = FlatSpec.from_shapes({"w": (2, 3), "b": (3,)})
    check_layout({"m": "coord", "r": "tensor", "step": "global"},
                 {"m": torch.zeros(4, 9), "r": torch.zeros(2), "step": torch.zeros(())}, spec)
    with pytest.raises(ValueError, match="'m'.*last dim should be 9"):
        check_layout({"m": "coord"}, {"m": torch.zeros(2)}, spec)
    with pytest.raises(ValueError, match="'x' has no declared layout"):
        check_layout({"m": "coord"}, {"x": torch.zeros(())}, spec)


# -- rule x scheme contracts ----------------------------------------------------------------------
@pytest.mark.parametrize("scheme_name", sorted(DETERMINISTIC))
@pytest.mark.parametrize("name", RULE_NAMES)
def test_meta_gradient_matches_finite_differences(name, scheme_name):
    """Directional derivative of the mean window meta-loss, float64, central differences."""
    needs_extra_for(scheme_name)
    rule = RULES[name]()
    scheme = make_scheme(scheme_name, **DETERMINISTIC[scheme_name])
    theta = _theta(rule)
    out = scheme.meta_gradient(rule, theta, _slots(rule), "valid_mean")
    assert [s.step for s in out.slots] == [scheme.window] * 2
    g = torch.Generator().manual_seed(2)
    d = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in theta.items()}
    analytic = float(sum((out.grads[k] * d[k]).sum() for k in theta))

    def f(th):
        return sum(scheme.meta_gradient(rule, th, _slots(rule), "valid_mean").meta_losses) / 2
    eps = 1e-6
    with torch.no_grad():
        fd = (f({k: v + eps * d[k] for k, v in theta.items()})
              - f({k: v - eps * d[k] for k, v in theta.items()})) / (2 * eps)
    assert abs(fd) > 1e-7, "meta-gradient vanished; the test would be vacuous"
    assert abs(analytic - fd) <= 1e-4 * abs(fd) + 1e-9, f"analytic {analytic:.10g} vs fd {fd:.10g}"


@pytest.mark.parametrize("scheme_name", sorted(STOCHASTIC))
@pytest.mark.parametrize("name", RULE_NAMES)
def test_perturbation_estimators_run_every_rule(name, scheme_name):
    rule = RULES[name]()
    theta = _theta(rule)
    scheme = make_scheme(scheme_name, **STOCHASTIC[scheme_name])
    out = scheme.meta_gradient(rule, theta, _slots(rule), "valid_mean")
    ref = make_scheme("nested", truncation=scheme.window).meta_gradient(
        rule, theta, _slots(rule), "valid_mean")
    for k, v in theta.items():
        assert out.grads[k].shape == v.shape and torch.isfinite(out.grads[k]).all()
        assert not out.grads[k].requires_grad
    assert float(_flat(out.grads).abs().max()) > 0
    for a, b in zip(out.params, ref.params):  # the slot's own run is the nested run at theta
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)
    assert out.meta_losses == pytest.approx(ref.meta_losses, rel=1e-10)


@pytest.mark.parametrize("meta_loss", list(META_LOSSES))
@pytest.mark.parametrize("scheme_name", sorted(SCHEMES))
def test_every_meta_loss_in_every_scheme(scheme_name, meta_loss):
    """Deterministic schemes: the meta-gradient of each meta-loss matches finite differences;
    ES/PES: their slot's own run scores the window exactly as nested does."""
    needs_extra_for(scheme_name)
    rule = make_rule("sgd", lr=0.2, momentum=0.5)
    theta = _theta(rule)
    kw = {**DETERMINISTIC, **STOCHASTIC}[scheme_name]
    scheme = make_scheme(scheme_name, **kw)
    out = scheme.meta_gradient(rule, theta, _slots(rule), meta_loss)
    assert all(math.isfinite(m) for m in out.meta_losses)
    if scheme_name in STOCHASTIC:
        ref = make_scheme("nested", truncation=scheme.window).meta_gradient(
            rule, theta, _slots(rule), meta_loss)
        assert out.meta_losses == pytest.approx(ref.meta_losses, rel=1e-10)
        return
    f = lambda th: sum(scheme.meta_gradient(rule, th, _slots(rule), meta_loss).meta_losses) / 2
    eps = 1e-6
    with torch.no_grad():
        fd = (f({k: v + eps for k, v in theta.items()})
              - f({k: v - eps for k, v in theta.items()})) / (2 * eps)
    analytic = float(sum(g.sum() for g in out.grads.values()))
    assert abs(fd) > 1e-7 and abs(analytic - fd) <= 1e-4 * abs(fd) + 1e-9, (analytic, fd)


# -- structured configs agree with the constructors -----------------------------------------------
def _conf_nodes(group):
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf
    from metaopt.cli.config import register_configs
    register_configs()
    repo = ConfigStore.instance().repo[group]
    return {name[:-len(".yaml")]: OmegaConf.to_container(entry.node) for name, entry in repo.items()}


#: differences that are a deliberate recipe choice, not drift (each needs a reason)
INTENDED = {
    # the CLI's default rule is the activation- and loss-aware MLP (commit 431daf1); the Python
    # constructor keeps the plain rule, which needs no model hooks in LearnedOptimizer
    "rule/mlp.act_features", "rule/mlp.loss_features",
}


@pytest.mark.parametrize("group,registry", [("rule", RULES), ("scheme", SCHEMES)])
def test_structured_config_defaults_match_constructors(group, registry):
    """Every field of a rule/ or scheme/ config node is a constructor argument with the same
    default (a config default that differs from the Python default means `make_rule`/
    `make_scheme` users and CLI users silently get different objects)."""
    bad = []
    for conf_name, node in sorted(_conf_nodes(group).items()):
        cls = registry[node.pop("name")]
        sig = inspect.signature(cls.__init__).parameters
        for field, value in node.items():
            if field not in sig:
                bad.append(f"{group}/{conf_name}.{field}: not an argument of {cls.__name__}")
                continue
            default = sig[field].default
            if default is inspect.Parameter.empty:
                continue
            if isinstance(default, tuple):
                default = list(default)
            if isinstance(default, (Rule, dict)):  # a nested rule: its own node is checked
                continue
            if value != default and f"{group}/{conf_name}.{field}" not in INTENDED:
                bad.append(f"{group}/{conf_name}.{field}: config {value!r} vs "
                           f"{cls.__name__}({field}={default!r})")
    assert not bad, "\n".join(bad)
