"""The ``anchored`` rule (the shipped default's rule): a step that cannot run away.

Meta-gradient vs central finite differences (float64), fast path vs reference path, the fresh
rule against an independent hand-written reference, the invariance it keeps, and the properties
that make it robust by construction: no feedback from weight growth to step size, a small first
step, and a linear model on badly scaled inputs that keeps descending."""
import math
import warnings

import pytest
import torch

from metaopt.optim import LearnedOptimizer
from metaopt.rules import make_rule
from metaopt.rules.anchored import WARMUP_RANGE
from metaopt.tasks.base import ArrayDataset
from metaopt.tasks.mlp import MLPTask
from metaopt.types import FlatSpec
from tests.helpers import TinyFamily, controller_theta as _theta, unroll_log_loss as _unroll_loss


@pytest.mark.parametrize("max_relative,adapt_range", [(0.0, 0.0), (0.9, 0.0), (0.0, 3.0)])
def test_meta_gradient_matches_central_finite_differences(max_relative, adapt_range):
    rule = make_rule("anchored", hidden_size=8, lr_matrix=0.05, lr_vector=0.02, warmup=3.0,
                     max_relative=max_relative, adapt_range=adapt_range, adapt_down=1.0,
                     adapt_brake=0.5)
    task = TinyFamily().sample_seeded(3)
    spec = FlatSpec.from_shapes(task.param_shapes())
    theta = {k: v.requires_grad_(True) for k, v in _theta(rule, spec).items()}
    loss = _unroll_loss(rule, task, theta)
    grads = torch.autograd.grad(loss, list(theta.values()))
    gen = torch.Generator().manual_seed(5)
    eps = 1e-6
    for (k, v), g in zip(theta.items(), grads):
        assert torch.isfinite(g).all(), k
        d = torch.randn(v.shape, generator=gen, dtype=v.dtype)
        plus = {kk: (vv + eps * d if kk == k else vv).detach() for kk, vv in theta.items()}
        minus = {kk: (vv - eps * d if kk == k else vv).detach() for kk, vv in theta.items()}
        fd = (_unroll_loss(rule, task, plus) - _unroll_loss(rule, task, minus)) / (2 * eps)
        an = float((g * d).sum())
        assert abs(an - float(fd)) <= 1e-7 + 1e-5 * abs(float(fd)), (k, an, float(fd))
    # every meta-parameter matters, the warm-up's time constant included
    assert all(float(g.abs().max()) > 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("max_relative,adapt_range", [(0.0, 0.0), (0.9, 0.0), (0.0, 8.0)])
def test_fast_path_equals_reference(dtype, decay, max_relative, adapt_range):
    rule = make_rule("anchored", max_relative=max_relative, adapt_range=adapt_range,
                     adapt_down=2.0, adapt_brake=1.0)
    g = torch.Generator().manual_seed(0)
    shapes = {"c.weight": (4, 2, 3, 3), "a.weight": (7, 5), "a.bias": (7,), "n.weight": (7,),
              "b.weight": (3, 7)}
    params = {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}
    spec = FlatSpec.of(params)
    theta = _theta(rule, spec, dtype=dtype)
    st_ref, st_fast = rule.init(params), rule.init(params)
    p_ref, p_fast = dict(params), {k: v.clone() for k, v in params.items()}
    scales = [1.0, 0.5, 2.0, 1.0, 1.0]
    ctx = {"weight_decay": [0.1, 0.0, 0.5, 0.0, 2.0]} if decay else None
    for _ in range(7):
        grads = {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}
        upd, st_ref = rule.update(theta, grads, st_ref, p_ref, ctx)
        p_ref = {k: p_ref[k] + s * upd[k] for k, s in zip(spec.names, scales)}
        st_fast = rule.step_(theta, [p_fast[k] for k in spec.names], [grads[k] for k in spec.names],
                             st_fast, spec, ctx, scales=scales)
    # two code paths (flat vs per-tensor views): equal to rounding
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for k in shapes:
        torch.testing.assert_close(p_fast[k], p_ref[k], rtol=tol, atol=tol)
    for k in ("m", "v", "step", "rms0") + (("h",) if adapt_range else ()):
        torch.testing.assert_close(st_fast[k], st_ref[k], rtol=tol, atol=tol)
    if adapt_range:
        assert float(st_ref["h"].abs().max()) > 0.1   # the adaptation really moved


def test_fresh_rule_is_adam_with_anchored_rates_and_warmup():
    """Independent reference: torch-style Adam written out by hand, per tensor, with
    lr_i = lr_k * (RMS(p_0) + floor / sqrt(fan_in)) * (1 - exp(-t / warmup)) (vectors: lr_k)."""
    rule = make_rule("anchored", lr_matrix=0.05, lr_vector=0.01, floor=0.2, warmup=4.0)
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (5, 3), "b": (5,), "k": (2, 3, 2, 2)}
    params = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    theta = rule.init_theta(FlatSpec.of(params), g)
    # the rates as theta stores them (float32 logs of the constructor's values)
    lr_mat, lr_vec, floor, tau = (math.exp(float(theta[k])) for k in
                                  ("log_lr_matrix", "log_lr_vector", "log_floor", "log_warmup"))
    assert (lr_mat, lr_vec, floor, tau) == pytest.approx((0.05, 0.01, 0.2, 4.0), rel=1e-6)
    state = rule.init(params)
    ref = {k: v.clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v2 = {k: torch.zeros_like(v) for k, v in params.items()}
    rms0 = {k: float(v.pow(2).mean().sqrt()) for k, v in params.items()}
    p = dict(params)
    for t in range(1, 13):
        grads = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
        upd, state = rule.update(theta, grads, state, p)
        p = {k: p[k] + upd[k] for k in p}
        for k, gk in grads.items():
            m[k] = 0.9 * m[k] + 0.1 * gk
            v2[k] = 0.999 * v2[k] + 0.001 * gk * gk
            fan_in = math.prod(shapes[k][1:]) if len(shapes[k]) > 1 else 1
            base = lr_vec if len(shapes[k]) == 1 else lr_mat * (rms0[k] + floor / math.sqrt(fan_in))
            lr = base * (1 - math.exp(-t / tau))
            mh, vh = m[k] / (1 - 0.9 ** t), v2[k] / (1 - 0.999 ** t)
            ref[k] = ref[k] - lr * mh / (vh.sqrt() + 1e-8)
    for k in shapes:
        torch.testing.assert_close(p[k], ref[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("max_relative,adapt_range", [(0.0, 0.0), (0.9, 0.0), (0.0, 8.0)])
def test_matrix_updates_are_invariant_to_weight_reparameterization(max_relative, adapt_range):
    """w = s w': the step on w' maps to the same step on w (anchor, current scale and Adam
    direction all scale with s), up to the floor term, switched off here."""
    rule = make_rule("anchored", floor=1e-30, eps=1e-30, max_relative=max_relative,
                     adapt_range=adapt_range)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    theta = _theta(rule, FlatSpec.of({"w": w}))
    s = 7.3
    p1, p2 = {"w": w.clone()}, {"w": w / s}
    st1, st2 = rule.init(p1), rule.init(p2)
    for _ in range(8):
        gw = torch.randn(6, 5, generator=g, dtype=torch.float64)
        u1, st1 = rule.update(theta, {"w": gw}, st1, p1)
        u2, st2 = rule.update(theta, {"w": s * gw}, st2, p2)
        p1, p2 = {"w": p1["w"] + u1["w"]}, {"w": p2["w"] + u2["w"]}
    torch.testing.assert_close(s * p2["w"], p1["w"], rtol=1e-9, atol=1e-12)


def test_fresh_adaptation_is_adam_with_a_hypergradient_log_rate():
    """Independent reference for ``adapt_range``: per tensor, ``h <- clip(h + gain * cos(d_{t-1},
    g_t) - brake * relu(log(mean g^2 / mean v_hat) - 2), -down, range)`` with ``d = m_hat /
    (sqrt(v_hat) + eps)`` the last Adam direction, and the anchored rate multiplied by
    ``exp(h)``."""
    rule = make_rule("anchored", lr_matrix=0.05, lr_vector=0.01, floor=0.2, warmup=4.0,
                     adapt_range=1.5, adapt_gain=0.4, adapt_down=0.7, adapt_brake=0.8)
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (5, 3), "b": (5,)}
    params = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    theta = rule.init_theta(FlatSpec.of(params), g)
    lr_mat, lr_vec, floor, tau, gain = (math.exp(float(theta[k])) for k in (
        "log_lr_matrix", "log_lr_vector", "log_floor", "log_warmup", "log_adapt_gain"))
    state = rule.init(params)
    ref = {k: v.clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v2 = {k: torch.zeros_like(v) for k, v in params.items()}
    d_prev = {k: torch.zeros_like(v) for k, v in params.items()}
    h = {k: 0.0 for k in params}
    rms0 = float(params["w"].pow(2).mean().sqrt())
    p, clipped, braked = dict(params), False, False
    drift = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    for t in range(1, 40):   # a persistent gradient direction: the rates grow to the bound ...
        grads = {k: drift[k] + 0.3 * torch.randn(s, generator=g, dtype=torch.float64)
                 for k, s in shapes.items()}
        if t in (25, 26):    # ... until gradient spikes brake them
            grads = {k: 30 * x for k, x in grads.items()}
        upd, state = rule.update(theta, grads, state, p)
        p = {k: p[k] + upd[k] for k in p}
        for k, gk in grads.items():
            cos = float((d_prev[k] * gk).sum()) / (float(d_prev[k].norm() * gk.norm()) + 1e-300)
            m[k] = 0.9 * m[k] + 0.1 * gk
            v2[k] = 0.999 * v2[k] + 0.001 * gk * gk
            spike = math.log(float(gk.pow(2).mean() / (v2[k] / (1 - 0.999 ** t)).mean()) + 1e-8)
            braked |= spike > 2
            h[k] = min(1.5, max(-0.7, h[k] + gain * cos - 0.8 * max(0.0, spike - 2)))
            clipped |= h[k] == 1.5
            base = lr_vec if k == "b" else lr_mat * (rms0 + floor / math.sqrt(3))
            lr = base * (1 - math.exp(-t / tau)) * math.exp(h[k])
            d = (m[k] / (1 - 0.9 ** t)) / ((v2[k] / (1 - 0.999 ** t)).sqrt() + 1e-8)
            ref[k] = ref[k] - lr * d
            d_prev[k] = d
    assert clipped and braked
    torch.testing.assert_close(state["h"], torch.tensor([h["w"], h["b"]], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    for k in shapes:
        torch.testing.assert_close(p[k], ref[k], rtol=1e-12, atol=1e-14)


def test_adaptation_lowers_the_rate_when_steps_oscillate():
    """Without momentum, a rate far too large for the problem makes the iterate jump across the
    minimum every step (the gradient flips sign): cos(d_{t-1}, g_t) = -1 drives h down until the
    iterates settle (beta2 small: the steps are sign(g) times the rate)."""
    rule = make_rule("anchored", lr_vector=0.5, adapt_range=8.0, warmup=1.0, beta1=0.0, beta2=0.01)
    x = {"x": torch.full((4,), 3.2, dtype=torch.float64)}   # sign-like steps of 0.5 overshoot 0
    theta = rule.init_theta(FlatSpec.of(x), torch.Generator().manual_seed(0))
    state = rule.init(x)
    for _ in range(200):
        u, state = rule.update(theta, {"x": 50.0 * x["x"]}, state, x)
        x = {"x": x["x"] + u["x"]}
    assert float(state["h"]) < -1.0
    assert float(x["x"].abs().max()) < 1e-2
    with pytest.raises(ValueError, match="adapt_range"):
        make_rule("anchored", adapt_range=11.0)


def _step_sizes(rule_name, steps=300, **kwargs):
    """RMS of each step on a matrix pushed by a constant gradient (its weights grow ~linearly)."""
    rule = make_rule(rule_name, **kwargs)
    w = {"w": torch.full((8, 8), 0.1, dtype=torch.float64)}
    theta = rule.init_theta(FlatSpec.of(w), torch.Generator().manual_seed(0))
    state = rule.init(w)
    sizes = []
    for _ in range(steps):
        u, state = rule.update(theta, {"w": -torch.ones(8, 8, dtype=torch.float64)}, state, w)
        w = {"w": w["w"] + u["w"]}
        sizes.append(float(u["w"].pow(2).mean().sqrt()))
    return sizes, float(w["w"].pow(2).mean().sqrt())


def test_no_feedback_from_weight_growth_to_step_size():
    sizes, rms = _step_sizes("anchored")
    assert rms > 10 * 0.1                              # the weight grew more than tenfold ...
    assert sizes[-1] == pytest.approx(sizes[100], rel=1e-6)  # ... its step did not (warm-up done)
    # the relative rule's step grows with the weight (the feedback this rule removes)
    rel_sizes, _ = _step_sizes("pertensor")
    assert rel_sizes[-1] > 5 * rel_sizes[100]


def test_learned_relative_part_grows_the_step_sub_linearly():
    """max_relative r: step ~ anchor^(1-r) * current^r (fresh theta: r = max_relative / 2), so
    the step grows, but by less than the weight does -- growth stays polynomial."""
    r = 0.9 * 0.5
    sizes, _ = _step_sizes("anchored", steps=300, max_relative=0.9)
    anchored, _ = _step_sizes("anchored", steps=300)
    w = {"w": torch.full((8, 8), 0.1, dtype=torch.float64)}
    rule = make_rule("anchored", max_relative=0.9)
    theta = rule.init_theta(FlatSpec.of(w), torch.Generator().manual_seed(0))
    state = rule.init(w)
    rms, floor = [], math.exp(float(theta["log_floor"])) / math.sqrt(8)
    for _ in range(300):
        rms.append(float(w["w"].pow(2).mean().sqrt()))
        u, state = rule.update(theta, {"w": -torch.ones(8, 8, dtype=torch.float64)}, state, w)
        w = {"w": w["w"] + u["w"]}
    for t in (100, 299):   # the measured step equals the formula's, relative to the anchored one
        want = ((rms[t] + floor) / (0.1 + floor)) ** r
        assert sizes[t] / anchored[t] == pytest.approx(want, rel=1e-9)
    assert 1 < sizes[-1] / sizes[100] < rms[-1] / rms[100]


def test_first_steps_are_warmed_up():
    rule = make_rule("anchored")
    lo, hi = WARMUP_RANGE
    assert lo <= rule.warmup <= hi
    sizes, _ = _step_sizes("anchored", steps=40)
    assert sizes[0] == pytest.approx(sizes[-1] * (1 - math.exp(-1 / rule.warmup)), rel=1e-3)
    with pytest.raises(ValueError, match="warmup"):
        make_rule("anchored", warmup=0.5)


def _scaled_linear_task(loss):
    """Softmax (``ce``) or least-squares (``mse``) regression on 16 inputs whose columns are
    scaled by 1e-3 .. 4e3 (log-spaced), as raw tabular features arrive; targets from a teacher
    of the unscaled inputs."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(512, 16, generator=g)
    teacher = torch.randn(16, 3 if loss == "ce" else 1, generator=g)
    y = (z @ teacher).argmax(1) if loss == "ce" else z @ teacher + 0.1 * torch.randn(512, 1, generator=g)
    cols = torch.logspace(-3, math.log10(4e3), 16)[torch.randperm(16, generator=g)]
    return MLPTask(ArrayDataset(z * cols, y, seed=0), hidden=(), loss=loss, batch_size=32)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_shipped_default_on_a_badly_scaled_linear_model_keeps_descending(loss, seed):
    """A linear model on inputs scaled by 1e-3 .. 4e3, through the plain torch.optim API: the
    shipped default must not blow up -- its loss around step 1,000 is below its loss around
    step 100. "Around": the median of the full-batch training loss at every 10th step of
    [50, 150] and of [900, 1000], so one noisy minibatch step does not decide the test (the
    relative-step ``pertensor`` rule climbs from ~1e2 to ~1e6 here)."""
    task = _scaled_linear_task(loss)
    gen = torch.Generator().manual_seed(seed)
    params = {k: v.clone().requires_grad_(True) for k, v in task.init_params(gen).items()}
    opt = LearnedOptimizer(list(params.items()))
    full = task.full_batch("train")
    at = {}
    for t in range(1, 1001):
        opt.zero_grad()
        task.loss(params, task.sample_batch("train", gen)).backward()
        opt.step()
        if t % 10 == 0:
            with torch.no_grad():
                at[t] = float(task.loss(params, full))
    early = _median([at[t] for t in range(50, 151, 10)])
    late = _median([at[t] for t in range(900, 1001, 10)])
    assert all(math.isfinite(v) for v in at.values())
    assert late < early, (early, late)


def test_small_lr_warns_and_names_the_argument():
    w = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.warns(UserWarning, match=r"lr=0\.001 multiplies the learned step"):
        LearnedOptimizer([w], rule="anchored", lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LearnedOptimizer([w], rule="anchored")            # the default lr=1.0: no warning
        LearnedOptimizer([w], rule="anchored", lr=0.5)
