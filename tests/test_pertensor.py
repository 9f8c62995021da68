"""The ``pertensor`` rule (the shipped default's rule): meta-gradient vs finite differences,
fast path vs reference path, invariances the design relies on, and task augmentation."""
import copy
import math

import pytest
import torch
from torch.func import grad

from metaopt.rules import make_rule
from metaopt.tasks import make_family
from metaopt.tasks.mixture import ReparamTask
from metaopt.types import FlatSpec
from tests.helpers import TinyFamily, controller_theta as _theta, unroll_log_loss as _unroll_loss


def test_meta_gradient_matches_central_finite_differences():
    rule = make_rule("pertensor", hidden_size=8, lr_matrix=0.05, lr_vector=0.02)
    task = TinyFamily().sample_seeded(3)
    spec = FlatSpec.from_shapes(task.param_shapes())
    theta = {k: v.requires_grad_(True) for k, v in _theta(rule, spec).items()}
    loss = _unroll_loss(rule, task, theta)
    grads = torch.autograd.grad(loss, list(theta.values()))
    gen = torch.Generator().manual_seed(5)
    eps = 1e-6
    for (k, v), g in zip(theta.items(), grads):
        assert torch.isfinite(g).all(), k
        d = torch.randn(v.shape, generator=gen, dtype=v.dtype)  # a random direction per tensor
        plus = {kk: (vv + eps * d if kk == k else vv).detach() for kk, vv in theta.items()}
        minus = {kk: (vv - eps * d if kk == k else vv).detach() for kk, vv in theta.items()}
        fd = (_unroll_loss(rule, task, plus) - _unroll_loss(rule, task, minus)) / (2 * eps)
        an = (g * d).sum()
        assert abs(float(an) - float(fd)) <= 1e-6 + 1e-5 * abs(float(fd)), (k, float(an), float(fd))
    assert any(float(g.abs().max()) > 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_path_equals_reference(dtype):
    rule = make_rule("pertensor")
    g = torch.Generator().manual_seed(0)
    shapes = {"c.weight": (4, 2, 3, 3), "a.weight": (7, 5), "a.bias": (7,), "n.weight": (7,),
              "b.weight": (3, 7)}
    params = {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}
    spec = FlatSpec.of(params)
    theta = _theta(rule, spec, dtype=dtype)
    st_ref, st_fast = rule.init(params), rule.init(params)
    p_ref, p_fast = dict(params), {k: v.clone() for k, v in params.items()}
    scales = [1.0, 0.5, 2.0, 1.0, 1.0]
    for _ in range(7):
        grads = {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}
        upd, st_ref = rule.update(theta, grads, st_ref, p_ref)
        p_ref = {k: p_ref[k] + s * upd[k] for k, s in zip(spec.names, scales)}
        st_fast = rule.step_(theta, [p_fast[k] for k in spec.names], [grads[k] for k in spec.names],
                             st_fast, spec, scales=scales)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for k in shapes:
        torch.testing.assert_close(p_fast[k], p_ref[k], rtol=tol, atol=tol)
    for k in ("m", "v", "step"):
        torch.testing.assert_close(st_fast[k], st_ref[k], rtol=tol, atol=tol)


def test_matrix_updates_are_invariant_to_weight_reparameterization():
    """w = s w': the rule's step on w' maps to the same step on w for matrices (relative step
    size + Adam direction), up to the floor term, which we switch off here."""
    rule = make_rule("pertensor", floor=1e-30, eps=1e-30)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    theta = _theta(rule, FlatSpec.of({"w": w}))
    s = 7.3
    p1, p2 = {"w": w.clone()}, {"w": w / s}
    st1, st2 = rule.init(p1), rule.init(p2)
    for _ in range(5):
        gw = torch.randn(6, 5, generator=g, dtype=torch.float64)
        u1, st1 = rule.update(theta, {"w": gw}, st1, p1)
        u2, st2 = rule.update(theta, {"w": s * gw}, st2, p2)   # dL/dw' = s dL/dw
        p1 = {"w": p1["w"] + u1["w"]}
        p2 = {"w": p2["w"] + u2["w"]}
    torch.testing.assert_close(s * p2["w"], p1["w"], rtol=1e-9, atol=1e-12)


def test_fresh_rule_is_bounded_and_lowers_a_quadratic():
    """Defaults never diverge on a textbook problem: an ill-conditioned quadratic."""
    rule = make_rule("pertensor")
    task = make_family("quadratic", dim=10, cond=100.0, noise=0.0).sample_seeded(0)
    gen = torch.Generator().manual_seed(0)
    params = task.init_params(gen)
    theta = rule.init_theta(FlatSpec.of(params), gen)
    state = rule.init(params)
    first = float(task.loss(params, task.sample_batch("train", gen)))
    for _ in range(300):
        b = task.sample_batch("train", gen)
        g = grad(lambda p: task.loss(p, b))(params)
        upd, state = rule.update(theta, g, state, params)
        params = {k: params[k] + upd[k] for k in params}
    last = float(task.loss(params, task.sample_batch("train", gen)))
    assert math.isfinite(last) and last < 0.5 * first


def test_reparam_augmentation_leaves_the_loss_unchanged():
    base = make_family("digits_mlp", widths=[16], depths=[2], dtype=torch.float64).sample_seeded(0)
    scales = {k: 10 ** (i - 2) for i, k in enumerate(base.param_shapes())}
    aug = ReparamTask(base, scales)
    gen = torch.Generator().manual_seed(0)
    w_prime = aug.init_params(torch.Generator().manual_seed(1))
    w = aug.to_base(w_prime)
    batch = base.sample_batch("train", gen)
    torch.testing.assert_close(aug.loss(w_prime, batch), base.loss(w, batch), rtol=1e-12, atol=0)
    # the same init, the same minimizers: w'_0 * s is the base task's init
    w0 = base.init_params(torch.Generator().manual_seed(1))
    for k in w0:
        torch.testing.assert_close(w_prime[k] * scales[k], w0[k])
    # gradients are rescaled by s (what the optimizer has to be robust to)
    gp = grad(lambda p: aug.loss(p, batch))(w_prime)
    gb = grad(lambda p: base.loss(p, batch))(w)
    for k in gp:
        torch.testing.assert_close(gp[k], gb[k] * scales[k], rtol=1e-10, atol=1e-14)


def test_mixture_family_is_reproducible_and_mixes():
    from metaopt.cli.config import _default_mixture
    fam = make_family("mixture", members=_default_mixture(), reparam_prob=0.5)
    a = [repr(fam.sample_seeded(s)) for s in range(30)]
    b = [repr(fam.sample_seeded(s)) for s in range(30)]
    assert a == b
    names = {fam.sample_seeded(s).name for s in range(60)}
    assert {"digits_mlp", "digits_ae"} <= names and len(names) >= 4
    assert any(isinstance(fam.sample_seeded(s), ReparamTask) for s in range(30))
    with pytest.raises(ValueError, match="members.digits_mlp"):
        make_family("mixture", members={"digits_mlp": {"widthz": [3]}})
    with pytest.raises(ValueError, match="reparam_prob"):
        make_family("mixture", members={"digits_mlp": {}}, reparam_prob=2.0)


def test_fresh_rule_is_adam_with_relative_learning_rates():
    """The fresh rule (zero output layer: a = c = 0) is Adam with a per-tensor learning rate
    exp(log_lr_k) * scale_i: for matrices scale = RMS(p) + exp(log_floor) / sqrt(fan_in) (p before
    the step), for vectors (biases, gains) scale = 1, the absolute ``log_lr_vector`` rate. Checked
    against Adam written out here, through ``update`` and through LearnedOptimizer's ``step_``."""
    from torch import nn
    from metaopt.optim import LearnedOptimizer
    rule = make_rule("pertensor", lr_matrix=0.02, lr_vector=5e-3, floor=0.1)
    theta = rule.init_theta(None, torch.Generator().manual_seed(0))
    assert not theta["w1"].any() and not theta["b1"].any()
    b1, b2, eps = 0.9, 0.999, 1e-8
    lr_m, lr_v, floor = (math.exp(float(theta[k])) for k in ("log_lr_matrix", "log_lr_vector",
                                                              "log_floor"))
    # name -> (shape, fan_in, is a vector)
    layout = {"c.weight": ((4, 2, 3, 3), 18, False), "a.weight": ((7, 5), 5, False),
              "a.bias": ((7,), 1, True), "n.weight": ((7,), 1, True)}
    g = torch.Generator().manual_seed(3)
    p0 = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, (s, _, _) in layout.items()}
    grads = [{k: torch.randn(s, generator=g, dtype=torch.float64) for k, (s, _, _) in layout.items()}
             for _ in range(8)]
    ref = {k: v.clone() for k, v in p0.items()}
    m = {k: torch.zeros_like(v) for k, v in p0.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p0.items()}
    for t, gr in enumerate(grads, start=1):
        for k, (_, fan_in, vec) in layout.items():
            p = ref[k]
            lr = lr_v if vec else lr_m * (float(p.pow(2).mean().sqrt()) + floor / math.sqrt(fan_in))
            m[k] = b1 * m[k] + (1 - b1) * gr[k]
            v2[k] = b2 * v2[k] + (1 - b2) * gr[k] ** 2
            ref[k] = p - lr * (m[k] / (1 - b1 ** t)) / ((v2[k] / (1 - b2 ** t)).sqrt() + eps)
    # the reference (differentiable) path
    p, state = dict(p0), rule.init(p0)
    for gr in grads:
        upd, state = rule.update(theta, gr, state, p)
        p = {k: p[k] + upd[k] for k in p}
    # the in-place fast path, through the optimizer
    ps = {k: nn.Parameter(v.clone()) for k, v in p0.items()}
    opt = LearnedOptimizer(list(ps.items()), rule=rule, theta=theta)
    assert opt.rule.has_step_()
    for gr in grads:
        for k, q in ps.items():
            q.grad = gr[k].clone()
        opt.step()
    for k in layout:
        assert float((ref[k] - p0[k]).abs().max()) > 1e-3, "the test should move every tensor"
        # the rule's code vs the formula written out here: equal to float64 rounding
        torch.testing.assert_close(p[k], ref[k], rtol=1e-12, atol=1e-14, msg=k)
        torch.testing.assert_close(ps[k].detach(), ref[k], rtol=1e-12, atol=1e-14, msg=k)
