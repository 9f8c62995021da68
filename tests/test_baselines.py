"""Hand-designed baselines as torch.optim optimizers: Lookahead, Lookbehind, SLRLA, SGD-HD, Adam-HD.

Trajectories are compared in float64 against the inner optimizer, hand computations, or
straight-line re-implementations of each paper's update.
"""
import copy
import io

import pytest
import torch
from torch import nn

from metaopt.optim.hypergradient import AdamHD, SGDHD
from metaopt.optim.lookahead import Lookahead
from metaopt.optim.lookbehind import Lookbehind
from metaopt.optim.slrla import SLRLA


# -- a tiny regression problem (float64) ------------------------------------------------------
def problem(seed=0, d_in=4, d_out=2, n=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Linear(d_in, d_out).double()
    return model, x, y


def closure_for(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss
    return closure


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b, tol=1e-12):
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


def loss_grads(params, x, y):
    """Functional loss and gradients of the regression problem: params = [W, b]."""
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    loss = ((x @ ps[0].T + ps[1] - y) ** 2).mean()
    return loss.detach(), list(torch.autograd.grad(loss, ps))


# -- Lookahead --------------------------------------------------------------------------------
@pytest.mark.parametrize("inner,kw", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
                                      (torch.optim.Adam, dict(lr=0.01)),
                                      (SGDHD, dict(lr=0.05, hypergrad_lr=1e-3))])
@pytest.mark.parametrize("pullback", ["none", "pullback"])
def test_lookahead_alpha_one_equals_inner_optimizer(inner, kw, pullback):
    m1, x, y = problem()
    m2 = copy.deepcopy(m1)
    ref = inner(m1.parameters(), **kw)
    la = Lookahead(inner(m2.parameters(), **kw), k=3, alpha=1.0, pullback_momentum=pullback)
    for _ in range(11):
        ref.step(closure_for(m1, ref, x, y))
        la.step(closure_for(m2, la, x, y))
        assert_same(params_of(m1), params_of(m2))


def _reference_lookahead(params, x, y, lr, mu, k, alpha, mode, steps):
    """Algorithm 1 of Zhang et al. over SGD with heavy-ball momentum, in plain tensors."""
    fast = [p.clone() for p in params]
    slow = [p.clone() for p in params]
    buf = [None for _ in params]
    cached = [torch.zeros_like(p) for p in params]
    traj = []
    for t in range(1, steps + 1):
        _, grads = loss_grads(fast, x, y)
        for i, g in enumerate(grads):
            buf[i] = g.clone() if buf[i] is None else mu * buf[i] + g
            fast[i] = fast[i] - lr * buf[i]
        if t % k == 0:
            for i in range(len(fast)):
                slow[i] = slow[i] + alpha * (fast[i] - slow[i])
                fast[i] = slow[i].clone()
                if mode == "reset":
                    buf[i] = torch.zeros_like(buf[i])
                elif mode == "pullback":
                    buf[i] = alpha * buf[i] + (1 - alpha) * cached[i]
                    cached[i] = buf[i].clone()
        traj.append([f.clone() for f in fast])
    return traj


@pytest.mark.parametrize("mode", ["none", "reset", "pullback"])
def test_lookahead_matches_paper_algorithm(mode):
    model, x, y = problem(1)
    ref = _reference_lookahead(params_of(model), x, y, 0.05, 0.9, 3, 0.4, mode, 10)
    opt = Lookahead(model.parameters(), inner=torch.optim.SGD, lr=0.05, momentum=0.9, k=3,
                    alpha=0.4, pullback_momentum=mode)
    for t in range(10):
        opt.step(closure_for(model, opt, x, y))
        assert_same(params_of(model), ref[t])


def test_lookahead_slow_weights_context_and_param_groups_shared():
    model, x, y = problem(2)
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=5, alpha=0.5)
    assert opt.param_groups is opt.optimizer.param_groups
    with opt.slow_weights():  # before any step: nothing to swap
        pass
    for _ in range(5):
        opt.step(closure_for(model, opt, x, y))
    synced = params_of(model)
    for _ in range(2):
        opt.step(closure_for(model, opt, x, y))
    fast = params_of(model)
    with opt.slow_weights():
        assert_same(params_of(model), synced)
    assert_same(params_of(model), fast)
    # a scheduler acting on the wrapper reaches the inner optimizer
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(closure_for(model, opt, x, y))
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


# -- hypergradient descent --------------------------------------------------------------------
def test_sgd_hd_matches_hand_computed_trajectory():
    # f(w) = (w1^2 + 2 w2^2) / 2, w0 = (1, 1), alpha0 = 0.1, beta = 0.01.
    # step 1: g = (1, 2), no previous gradient: alpha = 0.1, w = (0.9, 0.8)
    # step 2: g = (0.9, 1.6), h = g.g_prev = 4.1, alpha = 0.141, w = (0.7731, 0.5744)
    # step 3: g = (0.7731, 1.1488), h = 2.53387, alpha = 0.1663387,
    #         w = (0.7731 - 0.1663387 * 0.7731, 0.5744 - 0.1663387 * 1.1488)
    expected = [(0.1, (0.9, 0.8)), (0.141, (0.7731, 0.5744)),
                (0.1663387, (0.64450355103, 0.38331010144))]
    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    opt = SGDHD([w], lr=0.1, hypergrad_lr=0.01)
    for lr, ws in expected:
        def closure():
            opt.zero_grad()
            loss = 0.5 * (a * w * w).sum()
            loss.backward()
            return loss
        opt.step(closure)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
        torch.testing.assert_close(w.detach(), torch.tensor(ws, dtype=torch.float64),
                                   rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_hd_with_momentum_uses_previous_step_direction(nesterov):
    """SGDN-HD: h_t = g_t . d_{t-1}, d the (Nesterov) momentum direction actually stepped."""
    model, x, y = problem(14)
    mu, beta = 0.9, 0.01
    opt = SGDHD(model.parameters(), lr=0.02, momentum=mu, nesterov=nesterov, hypergrad_lr=beta)
    ps, lr = params_of(model), 0.02
    buf = d_prev = None
    for _ in range(5):
        _, grads = loss_grads(ps, x, y)
        if d_prev is not None:
            lr = lr + beta * float(sum((g * d).sum() for g, d in zip(grads, d_prev)))
        buf = [g.clone() for g in grads] if buf is None else [mu * b + g for b, g in zip(buf, grads)]
        d_prev = [g + mu * b for g, b in zip(grads, buf)] if nesterov else buf
        ps = [p - lr * d for p, d in zip(ps, d_prev)]
        opt.step(closure_for(model, opt, x, y))
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
        assert_same(params_of(model), ps)


@pytest.mark.parametrize("kw", [dict(lr=0.05), dict(lr=0.05, momentum=0.9, weight_decay=0.01),
                                dict(lr=0.05, momentum=0.9, nesterov=True),
                                dict(lr=0.05, momentum=0.5, dampening=0.3)])
def test_sgd_hd_with_zero_hypergradient_rate_is_sgd(kw):
    m1, x, y = problem(3)
    m2 = copy.deepcopy(m1)
    ref = torch.optim.SGD(m1.parameters(), **kw)
    hd = SGDHD(m2.parameters(), hypergrad_lr=0.0, **kw)
    for _ in range(6):
        ref.step(closure_for(m1, ref, x, y))
        hd.step(closure_for(m2, hd, x, y))
        assert_same(params_of(m1), params_of(m2))


@pytest.mark.parametrize("kw", [dict(lr=0.01), dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6,
                                                    weight_decay=0.1)])
def test_adam_hd_with_zero_hypergradient_rate_is_adam(kw):
    m1, x, y = problem(4)
    m2 = copy.deepcopy(m1)
    ref = torch.optim.Adam(m1.parameters(), **kw)
    hd = AdamHD(m2.parameters(), hypergrad_lr=0.0, **kw)
    for _ in range(6):
        ref.step(closure_for(m1, ref, x, y))
        hd.step(closure_for(m2, hd, x, y))
        assert_same(params_of(m1), params_of(m2))


def test_adam_hd_rate_follows_paper_update():
    """alpha_t = alpha_{t-1} + beta * g_t . m_hat_{t-1} / (sqrt(v_hat_{t-1}) + eps)."""
    model, x, y = problem(5)
    opt = AdamHD(model.parameters(), lr=0.01, hypergrad_lr=1e-3)
    b1, b2, eps = 0.9, 0.999, 1e-8
    ps = params_of(model)
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    lr = 0.01
    for t in range(1, 6):
        _, grads = loss_grads(ps, x, y)
        if t > 1:
            h = sum((g * (mi / (1 - b1 ** (t - 1))) / ((vi / (1 - b2 ** (t - 1))).sqrt() + eps)).sum()
                    for g, mi, vi in zip(grads, m, v))
            lr = lr + 1e-3 * float(h)
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            ps[i] = ps[i] - lr * (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps)
        opt.step(closure_for(model, opt, x, y))
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
        assert_same(params_of(model), ps)
    assert lr != pytest.approx(0.01)  # the rate did move


def test_hypergradient_rates_are_per_parameter_group():
    model, x, y = problem(6)
    opt = SGDHD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.2}],
                lr=0.05, hypergrad_lr=0.01)
    w_prev = b_prev = None
    for _ in range(3):
        loss, (gw, gb) = loss_grads(params_of(model), x, y)
        lr_w, lr_b = opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]
        opt.step(closure_for(model, opt, x, y))
        if w_prev is not None:
            assert opt.param_groups[0]["lr"] == pytest.approx(lr_w + 0.01 * float((gw * w_prev).sum()))
            assert opt.param_groups[1]["lr"] == pytest.approx(lr_b + 0.01 * float((gb * b_prev).sum()))
        w_prev, b_prev = gw, gb


# -- Lookbehind ---------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_lookbehind_k1_rho0_equals_lookahead_over_sgd(alpha):
    m1, x, y = problem(7)
    m2 = copy.deepcopy(m1)
    la = Lookahead(m1.parameters(), inner=torch.optim.SGD, lr=0.05, momentum=0.9, k=1,
                   alpha=alpha)
    lb = Lookbehind(m2.parameters(), inner=torch.optim.SGD, lr=0.05, momentum=0.9, k=1,
                    alpha=alpha, rho=0.0)
    for _ in range(6):
        la.step(closure_for(m1, la, x, y))
        lb.step(closure_for(m2, lb, x, y))
        assert_same(params_of(m1), params_of(m2))


def test_lookbehind_adaptive_alpha_with_k1_is_the_inner_sam_step():
    """With k = 1 the first and combined descent steps coincide: cos = 1, alpha = 1."""
    m1, x, y = problem(8)
    m2 = copy.deepcopy(m1)
    fixed = Lookbehind(m1.parameters(), lr=0.05, k=1, alpha=1.0, rho=0.05)
    adaptive = Lookbehind(m2.parameters(), lr=0.05, k=1, alpha="adaptive", rho=0.05)
    for _ in range(4):
        fixed.step(closure_for(m1, fixed, x, y))
        adaptive.step(closure_for(m2, adaptive, x, y))
        assert adaptive.last_alphas == pytest.approx([1.0, 1.0])
        assert_same(params_of(m1), params_of(m2))


def _reference_lookbehind(params, x, y, lr, k, alpha, rho, variant, eta, steps):
    """Lookbehind-SAM/ASAM (Mordido et al., Alg. 1) with plain-SGD descent, in plain tensors.
    params = [W, b]: ASAM scales the weight W by |W| + eta and leaves the bias b alone."""
    slow = [p.clone() for p in params]
    traj = []
    for _ in range(steps):
        pert = [p.clone() for p in slow]
        fast = [p.clone() for p in slow]
        firsts = None
        for i in range(k):
            _, g = loss_grads(pert, x, y)
            t = [pert[0].abs() + eta, torch.ones_like(pert[1])] if variant == "asam" else \
                [torch.ones_like(p) for p in pert]
            norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
            pert = [p + rho * ti * ti * gi / norm for p, ti, gi in zip(pert, t, g)]
            _, gd = loss_grads(pert, x, y)
            fast = [f - lr * gi for f, gi in zip(fast, gd)]
            if i == 0:
                firsts = [f.clone() for f in fast]
        new = []
        for s, f, f1 in zip(slow, fast, firsts):
            if alpha == "adaptive":
                a = (torch.nn.functional.cosine_similarity((f1 - s).flatten(), (f - s).flatten(),
                                                           dim=0) + 1) / 2
            else:
                a = alpha
            new.append(s + a * (f - s))
        slow = new
        traj.append([s.clone() for s in slow])
    return traj


@pytest.mark.parametrize("variant,rho", [("sam", 0.05), ("asam", 0.5)])
@pytest.mark.parametrize("alpha", [0.5, "adaptive"])
def test_lookbehind_matches_paper_algorithm(variant, rho, alpha):
    model, x, y = problem(9)
    ref = _reference_lookbehind(params_of(model), x, y, 0.05, 3, alpha, rho, variant, 0.01, 4)
    opt = Lookbehind(list(model.named_parameters()), lr=0.05, k=3, alpha=alpha, rho=rho,
                     variant=variant, eta=0.01)
    for t in range(4):
        opt.step(closure_for(model, opt, x, y))
        assert_same(params_of(model), ref[t], tol=1e-10)


def test_lookbehind_asam_without_names_treats_matrices_as_weights():
    m1, x, y = problem(10)
    m2 = copy.deepcopy(m1)
    named = Lookbehind(list(m1.named_parameters()), lr=0.05, k=2, rho=0.5, variant="asam")
    plain = Lookbehind(m2.parameters(), lr=0.05, k=2, rho=0.5, variant="asam")
    for _ in range(3):
        named.step(closure_for(m1, named, x, y))
        plain.step(closure_for(m2, plain, x, y))
    assert_same(params_of(m1), params_of(m2))


def test_lookbehind_needs_a_closure():
    model, x, y = problem()
    opt = Lookbehind(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="closure") as err:
        opt.step()
    assert "\n" not in str(err.value)


# -- SLRLA ----------------------------------------------------------------------------------------
def test_slrla_without_regularizer_or_schedule_is_lookahead():
    m1, x, y = problem(11)
    m2 = copy.deepcopy(m1)
    la = Lookahead(m1.parameters(), inner=torch.optim.SGD, lr=0.05, momentum=0.9, k=3, alpha=0.8)
    sl = SLRLA(m2.parameters(), inner=torch.optim.SGD, lr=0.05, momentum=0.9, k=3, alpha=0.8,
               beta=0.0)
    for _ in range(8):
        la.step(closure_for(m1, la, x, y))
        sl.step(closure_for(m2, sl, x, y))
        assert_same(params_of(m1), params_of(m2))


def test_slrla_matches_regularized_lookahead_with_stagewise_lr():
    model, x, y = problem(12)
    k, alpha, beta, lr0, gamma, milestones = 3, 0.8, 0.3, 0.05, 0.5, [4, 7]
    opt = SLRLA(model.parameters(), lr=lr0, k=k, alpha=alpha, beta=beta,
                milestones=milestones, gamma=gamma)
    fast = params_of(model)
    slow = [p.clone() for p in fast]
    for t in range(10):
        lr = lr0 * gamma ** sum(t >= m for m in milestones)
        _, grads = loss_grads(fast, x, y)
        fast = [f - lr * (g + 2 * beta * (f - s)) for f, g, s in zip(fast, grads, slow)]
        if (t + 1) % k == 0:
            slow = [s + alpha * (f - s) for s, f in zip(slow, fast)]
            fast = [s.clone() for s in slow]
        opt.step(closure_for(model, opt, x, y))
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
        assert_same(params_of(model), fast)


def test_slrla_fractional_milestones():
    model, _, _ = problem()
    opt = SLRLA(model.parameters(), lr=0.1, milestones=[0.3, 0.6, 0.8], total_steps=100)
    assert opt.defaults["milestones"] == [30, 60, 80]
    with pytest.raises(ValueError, match="milestones"):
        SLRLA(model.parameters(), lr=0.1, milestones=[0.3, 0.6])


# -- checkpoints ----------------------------------------------------------------------------------
FACTORIES = {
    "lookahead": lambda ps: Lookahead(ps, inner=torch.optim.SGD, lr=0.05, momentum=0.9, k=5),
    "lookahead_pullback": lambda ps: Lookahead(ps, inner=torch.optim.Adam, lr=0.01, k=5,
                                               pullback_momentum="pullback"),
    "lookbehind": lambda ps: Lookbehind(ps, inner=torch.optim.SGD, lr=0.05, momentum=0.9,
                                        alpha="adaptive"),
    "slrla": lambda ps: SLRLA(ps, inner=torch.optim.SGD, lr=0.05, momentum=0.9, k=5,
                              milestones=[4], gamma=0.5),
    "sgd_hd": lambda ps: SGDHD(ps, lr=0.05, momentum=0.9, hypergrad_lr=0.01),
    "adam_hd": lambda ps: AdamHD(ps, lr=0.01, hypergrad_lr=1e-3),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_round_trip(name):
    m1, x, y = problem(13)
    opt1 = FACTORIES[name](m1.parameters())
    for _ in range(3):  # mid-way through a k=5 cycle
        opt1.step(closure_for(m1, opt1, x, y))
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # nothing beyond tensors and plain containers
    m2 = copy.deepcopy(m1)
    opt2 = FACTORIES[name](m2.parameters())
    opt2.load_state_dict(sd)
    for _ in range(4):  # crosses the next sync and (slrla) the lr milestone
        opt1.step(closure_for(m1, opt1, x, y))
        opt2.step(closure_for(m2, opt2, x, y))
        assert_same(params_of(m1), params_of(m2), tol=0.0)
    assert opt1.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
    if isinstance(opt2, Lookahead):
        assert opt2.param_groups is opt2.optimizer.param_groups


# -- hyperparameter validation --------------------------------------------------------------------
def _p():
    return [nn.Parameter(torch.zeros(2))]


INVALID = [
    (lambda: Lookahead(_p(), lr=0.1, k=0), "k"),
    (lambda: Lookahead(_p(), lr=0.1, k=2.5), "k"),
    (lambda: Lookahead(_p(), lr=0.1, alpha=0.0), "alpha"),
    (lambda: Lookahead(_p(), lr=0.1, alpha=1.5), "alpha"),
    (lambda: Lookahead(_p(), lr=0.1, pullback_momentum="sometimes"), "pullback_momentum"),
    (lambda: Lookahead(_p(), inner=3), "inner"),
    (lambda: Lookbehind(_p(), lr=0.1, k=0), "k"),
    (lambda: Lookbehind(_p(), lr=0.1, alpha="auto"), "alpha"),
    (lambda: Lookbehind(_p(), lr=0.1, rho=-0.1), "rho"),
    (lambda: Lookbehind(_p(), lr=0.1, variant="gsam"), "variant"),
    (lambda: Lookbehind(_p(), lr=0.1, eta=-1.0), "eta"),
    (lambda: SLRLA(_p(), lr=0.1, beta=-1.0), "beta"),
    (lambda: SLRLA(_p(), lr=0.1, gamma=0.0), "gamma"),
    (lambda: SLRLA(_p(), lr=0.1, milestones=[5, 3]), "milestones"),
    (lambda: SLRLA(_p(), lr=0.1, total_steps=0), "total_steps"),
    (lambda: SLRLA(_p(), lr=0.1, alpha=2.0), "alpha"),
    (lambda: SGDHD(_p(), lr=-0.1), "lr"),
    (lambda: SGDHD(_p(), hypergrad_lr=-1.0), "hypergrad_lr"),
    (lambda: SGDHD(_p(), momentum=1.5), "momentum"),
    (lambda: SGDHD(_p(), dampening=2.0), "dampening"),
    (lambda: SGDHD(_p(), weight_decay=-1.0), "weight_decay"),
    (lambda: SGDHD(_p(), nesterov=True), "nesterov"),
    (lambda: AdamHD(_p(), lr=-1.0), "lr"),
    (lambda: AdamHD(_p(), hypergrad_lr=-1.0), "hypergrad_lr"),
    (lambda: AdamHD(_p(), betas=(1.0, 0.999)), "betas"),
    (lambda: AdamHD(_p(), betas=(0.9, -0.1)), "betas"),
    (lambda: AdamHD(_p(), eps=-1.0), "eps"),
]


@pytest.mark.parametrize("make,arg", INVALID, ids=[f"{i}-{a}" for i, (_, a) in enumerate(INVALID)])
def test_invalid_hyperparameters_name_the_argument(make, arg):
    with pytest.raises((ValueError, TypeError), match=rf"Invalid {arg}\b"):
        make()
