"""Schemes beside nested -- interleaved (forward-mode / one-step), continuous (torchdiffeq), ES and
PES -- checked against finite differences, against each other where they compute the same thing
(to float64 rounding: different code paths, so not to the bit), and inside MetaTrainer (NaN-free
runs, checkpoint/resume with scheme-carried slot.extra, bit-identical to the uninterrupted run).
Everything runs on small float64 quadratics."""
import csv
import math

import pytest
import torch
from omegaconf import OmegaConf

from metaopt.meta import MetaTrainer, TrainConfig, make_scheme
from metaopt.meta.continuous import Continuous
from metaopt.meta.es import ES, PES
from metaopt.meta.interleaved import Interleaved
from metaopt.meta.nested import Nested
from metaopt.meta.slots import new_slot
from metaopt.rules import make_rule
from metaopt.tasks.quadratic import QuadraticFamily
from metaopt.types import FlatSpec
from tests.helpers import TinyFamily, needs_extra_for

FAM = QuadraticFamily(dim=5, cond=(1.0, 20.0), noise=0.3, batch_size=2, dtype=torch.float64)

RULES = {
    "sgd_momentum": ("sgd", dict(lr=0.1, momentum=0.9)),
    "adam": ("adam", dict(lr=0.05)),
    "layerwise_adam": ("layerwise_lr", dict(lr=0.1, num_steps=3, direction="adam")),
    "mlp": ("mlp", dict(hidden_size=6)),
}


def rule_of(key):
    name, kw = RULES[key]
    return make_rule(name, **kw)


def make_slots(rule, k=2, seed=0, family=FAM):
    return [new_slot(family, rule, seed + 17 * i + 1, horizon=100, dtype=torch.float64)
            for i in range(k)]


def init_theta(rule, family=FAM):
    spec = FlatSpec.of(make_slots(rule, 1, family=family)[0].params)
    theta = rule.init_theta(spec, torch.Generator().manual_seed(1))
    theta = {k: v.double() for k, v in theta.items()}
    if rule.name == "mlp":  # visible steps, and ReLU inputs off the kink (see test_meta_gradients)
        theta["log_scale"] = theta["log_scale"] + 2.0
        g = torch.Generator().manual_seed(5)
        for k in theta:
            if k.startswith("b"):
                noise = torch.randn(theta[k].shape, generator=g, dtype=torch.float64)
                theta[k] = theta[k] + 0.1 * noise
    return {k: v.requires_grad_(True) for k, v in theta.items()}


def rel_err(a, b):
    """Max-norm relative error of dict a against reference dict b."""
    num = max(float((a[k] - b[k]).detach().abs().max()) for k in b)
    den = max(float(b[k].detach().abs().max()) for k in b)
    return num / den


def flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def cosine(a, b):
    a, b = flat(a), flat(b)
    return float(a @ b / (a.norm() * b.norm()))


def advance(slots, out):
    """What MetaTrainer does with a SchemeOutput when theta is held fixed."""
    assert [s.step for s in out.slots] == [s.step + out.inner_steps for s in slots]
    slots[:] = out.slots


def directional_fd_check(rule, scheme, meta_loss, eps=1e-5):
    """(analytic, finite-difference) directional derivative of the mean window meta-loss."""
    theta = init_theta(rule)
    f = lambda th: torch.stack([o[0] for o in scheme.window_losses(rule, th, make_slots(rule),
                                                                   meta_loss)]).mean()
    grads = scheme.meta_gradient(rule, theta, make_slots(rule), meta_loss).grads
    g = torch.Generator().manual_seed(2)
    d = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in theta.items()}
    analytic = float(sum((grads[k] * d[k]).sum() for k in theta))
    with torch.no_grad():
        fd = float(f({k: v + eps * d[k] for k, v in theta.items()})
                   - f({k: v - eps * d[k] for k, v in theta.items()})) / (2 * eps)
    assert abs(analytic) > 1e-6, "meta-gradient vanished; the test would be vacuous"
    return analytic, fd


# -- nested and continuous against finite differences --------------------------------------------
FD_SCHEMES = {
    "nested": lambda: Nested(truncation=4),
    "euler-backprop": lambda: Continuous(window=4, method="euler", gradient="backprop"),
    "rk4-backprop": lambda: Continuous(window=4, method="rk4", gradient="backprop", substeps=2),
    "rk4-adjoint": lambda: Continuous(window=4, method="rk4", gradient="adjoint", substeps=16),
    "dopri5-adjoint": lambda: Continuous(window=4, method="dopri5", gradient="adjoint",
                                         rtol=1e-9, atol=1e-11),
}
FD_CASES = [(s, r, "valid_mean") for s in FD_SCHEMES for r in RULES
            if not (s == "dopri5-adjoint" and r == "mlp")]  # adaptive + ReLU kinks: slow
FD_SCHEMES["rk4-adjoint-ends"] = lambda: Continuous(  # stores only the window's two ends
    window=4, method="rk4", gradient="adjoint", substeps=16, store_every=4)
FD_CASES += [("nested", "adam", "valid_last"), ("rk4-adjoint-ends", "sgd_momentum", "valid_last"),
             ("rk4-adjoint-ends", "adam", "valid_last"),
             ("rk4-backprop", "layerwise_adam", "train"),
             ("rk4-adjoint", "sgd_momentum", "valid_log_mean")]


SLOW_FD = {("dopri5-adjoint", "layerwise_adam"), ("rk4-adjoint", "mlp")}  # ~5 s each
FD_CASES = [pytest.param(s, r, m, id=f"{s}-{r}-{m}",
                         marks=[pytest.mark.slow] if (s, r) in SLOW_FD else [])
            for s, r, m in FD_CASES]


@pytest.mark.parametrize("scheme_key,rule_key,meta_loss", FD_CASES)
def test_meta_gradient_matches_finite_differences(scheme_key, rule_key, meta_loss):
    needs_extra_for("nested" if scheme_key == "nested" else "continuous")
    analytic, fd = directional_fd_check(rule_of(rule_key), FD_SCHEMES[scheme_key](), meta_loss)
    rel = abs(analytic - fd) / abs(fd)
    assert rel < 1e-4, f"analytic {analytic:.10g} vs fd {fd:.10g} (rel {rel:.2e})"


def test_euler_adjoint_is_first_order_accurate():
    """The adjoint integrates the adjoint ODE with the forward's solver: with euler its gradient
    is off by O(step) (not the discrete gradient); 16x smaller steps -> ~16x smaller error."""
    needs_extra_for("continuous")
    rule = rule_of("sgd_momentum")
    errs = []
    for sub in (1, 16):
        a, fd = directional_fd_check(rule, Continuous(window=4, method="euler", substeps=sub,
                                                      gradient="adjoint"), "valid_mean")
        errs.append(abs(a - fd) / abs(fd))
    assert errs[0] > 0.05           # coarse euler adjoint: visibly biased (measured 0.12)
    assert errs[0] / errs[1] > 8    # first order convergence (measured 12.6x)


# -- continuous-euler is nested, step for step ---------------------------------------------------
@pytest.mark.parametrize("rule_key", list(RULES))
def test_continuous_euler_reproduces_nested_gradient_descent(rule_key):
    """Euler with step eta on the velocity update/eta is the discrete rule; the outer flow's Euler
    step is SGD with lr = eps * window * eta. Params, states, losses, meta-gradients and theta
    agree after every outer step."""
    needs_extra_for("continuous")
    rule = rule_of(rule_key)
    nested = Nested(truncation=3)
    cont = Continuous(window=3, method="euler", gradient="backprop", eta=0.5)
    outer_lr = 0.02 * cont.window * cont.eta  # eps = 0.02
    th_n, th_c = init_theta(rule), init_theta(rule)
    sl_n, sl_c = make_slots(rule, 3), make_slots(rule, 3)
    for _ in range(4):
        on = nested.meta_gradient(rule, th_n, sl_n, "valid_mean")
        oc = cont.meta_gradient(rule, th_c, sl_c, "valid_mean")
        for pn, pc, sn, sc in zip(on.params, oc.params, on.states, oc.states):
            for k in pn:
                torch.testing.assert_close(pc[k], pn[k], rtol=1e-12, atol=1e-14)
            assert list(sc) == list(sn)
            for k in sn:
                torch.testing.assert_close(sc[k], sn[k], rtol=1e-12, atol=1e-14)
        assert oc.meta_losses == pytest.approx(on.meta_losses, rel=1e-12)
        assert oc.train_losses == pytest.approx(on.train_losses, rel=1e-12)
        assert rel_err(oc.grads, on.grads) < 1e-10
        advance(sl_n, on)
        advance(sl_c, oc)
        with torch.no_grad():
            for k in th_n:
                th_n[k] -= outer_lr * on.grads[k]
                th_c[k] -= outer_lr * oc.grads[k]
        for k in th_n:
            torch.testing.assert_close(th_c[k], th_n[k], rtol=1e-12, atol=1e-14)
    assert rel_err({k: v.detach() for k, v in th_n.items()}, init_theta(rule)) > 0  # theta moved


def test_continuous_euler_in_trainer_equals_nested(tmp_path):
    needs_extra_for("continuous")
    rule = rule_of("layerwise_adam")
    thetas = []
    for name, kw in [("nested", dict(truncation=3)),
                     ("continuous", dict(window=3, method="euler", gradient="backprop"))]:
        tr = MetaTrainer(rule, FAM, make_scheme(name, **kw), _cfg(5), tmp_path / name)
        tr.run()
        thetas.append(tr.theta_detached())
    for k in thetas[0]:
        torch.testing.assert_close(thetas[1][k], thetas[0][k], rtol=1e-10, atol=1e-12)


def test_continuous_higher_order_solvers_differ_from_the_discrete_rule():
    """rk4/dopri5 follow the flow (the rule's small-step limit), not the discrete steps; rk4 with
    substeps and dopri5 agree with each other."""
    needs_extra_for("continuous")
    rule = rule_of("sgd_momentum")
    theta = init_theta(rule)
    run = lambda s: s.meta_gradient(rule, theta, make_slots(rule), "valid_mean")
    eul = run(Continuous(window=4, method="euler", gradient="backprop"))
    rk = run(Continuous(window=4, method="rk4", gradient="backprop", substeps=4))
    dp = run(Continuous(window=4, method="dopri5", gradient="adjoint", rtol=1e-9, atol=1e-11))
    gap = max(float((a["w"] - b["w"]).abs().max()) for a, b in zip(eul.params, dp.params))
    agree = max(float((a["w"] - b["w"]).abs().max()) for a, b in zip(rk.params, dp.params))
    assert gap > 1e-2 and agree < 1e-4 * gap
    assert rel_err(rk.grads, dp.grads) < 1e-4


# -- interleaved ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rule_key", ["sgd_momentum", "adam", "layerwise_adam"])
def test_interleaved_forward_equals_nested_one_step_window(rule_key):
    """From fresh slots (zero sensitivity) one forward-mode step is the one-step window's gradient;
    one_step mode equals Nested(truncation=1) at every step."""
    rule = rule_of(rule_key)
    theta = init_theta(rule)
    fwd = Interleaved(mode="forward").meta_gradient(rule, theta, make_slots(rule, 3), "valid_mean")
    ref = Nested(truncation=1).meta_gradient(rule, theta, make_slots(rule, 3), "valid_mean")
    assert rel_err(fwd.grads, ref.grads) < 1e-12
    for a, b in zip(fwd.params, ref.params):  # jvp vs vjp code paths: equal to float64 rounding
        torch.testing.assert_close(a["w"], b["w"], rtol=1e-12, atol=1e-14)
    assert fwd.meta_losses == pytest.approx(ref.meta_losses, rel=1e-13)
    sl_i, sl_n = make_slots(rule, 3), make_slots(rule, 3)
    one, nest = Interleaved(mode="one_step"), Nested(truncation=1)
    for _ in range(3):
        oi = one.meta_gradient(rule, theta, sl_i, "valid_mean")
        on = nest.meta_gradient(rule, theta, sl_n, "valid_mean")
        assert rel_err(oi.grads, on.grads) < 1e-12 and oi.extras == [{}, {}, {}]
        advance(sl_i, oi)
        advance(sl_n, on)


@pytest.mark.parametrize("rule_key", list(RULES))
def test_interleaved_forward_sensitivity_equals_full_backprop(rule_key):
    """Theta held fixed: after T interleaved steps the forward-mode gradient equals backprop
    through all T steps (valid_last), and the mean of the T per-step gradients equals the
    valid_mean gradient of a T-step window -- including momentum/Adam state sensitivities. The
    one-step approximation is visibly off (its truncation bias)."""
    rule = rule_of(rule_key)
    theta = init_theta(rule)
    T = 6
    last = Nested(truncation=T).meta_gradient(rule, theta, make_slots(rule), "valid_last")
    mean = Nested(truncation=T).meta_gradient(rule, theta, make_slots(rule), "valid_mean")
    for mode in ("forward", "one_step"):
        sch, slots = Interleaved(mode=mode), make_slots(rule)
        acc = {k: torch.zeros_like(v) for k, v in theta.items()}
        for _ in range(T):
            out = sch.meta_gradient(rule, theta, slots, "valid_mean")
            advance(slots, out)
            acc = {k: acc[k] + out.grads[k] / T for k in acc}
        if mode == "forward":
            assert rel_err(out.grads, last.grads) < 1e-10
            assert rel_err(acc, mean.grads) < 1e-10
            for s, p in zip(slots, last.params):  # same inner trajectory as the T-step unroll
                torch.testing.assert_close(s.params["w"], p["w"], rtol=1e-13, atol=1e-14)
            assert any(k.startswith("sens.s.") for k in slots[0].extra)  # momenta carried too
        else:
            assert rel_err(out.grads, last.grads) > 0.3  # measured 0.67-0.83


@pytest.mark.parametrize("use_vmap", [True, False])
def test_interleaved_forward_lone_slot_path_equals_vmapped_group(use_vmap):
    """use_vmap=False runs each slot alone (the engine's plain-call path under jvp): same
    sensitivities and meta-gradient as the vmapped group, over several carried steps."""
    rule = rule_of("adam")
    theta = init_theta(rule)
    ref_slots, slots = make_slots(rule, 3), make_slots(rule, 3)
    ref, sch = Interleaved(mode="forward"), Interleaved(mode="forward", use_vmap=use_vmap)
    for _ in range(3):
        a = ref.meta_gradient(rule, theta, ref_slots, "valid_mean")
        b = sch.meta_gradient(rule, theta, slots, "valid_mean")
        assert rel_err(b.grads, a.grads) < 1e-12
        for xa, xb in zip(a.extras, b.extras):
            assert set(xa) == set(xb)
            for k in xa:
                torch.testing.assert_close(xb[k], xa[k], rtol=1e-12, atol=1e-15)
        advance(ref_slots, a)
        advance(slots, b)


def test_interleaved_auto_mode_by_number_of_meta_parameters():
    lw, mlp = rule_of("layerwise_adam"), rule_of("mlp")
    n_mlp = sum(v.numel() for v in init_theta(mlp).values())
    sch = Interleaved()
    assert sch.resolve_mode(init_theta(lw)) == "forward"
    assert sch.resolve_mode(init_theta(mlp)) == "one_step" and n_mlp > sch.max_forward_params
    assert Interleaved(max_forward_params=n_mlp).resolve_mode(init_theta(mlp)) == "forward"
    assert Interleaved(mode="one_step").resolve_mode(init_theta(lw)) == "one_step"
    # sensitivities restart from zero after a reset: empty extra == first step of a fresh run
    rule = rule_of("sgd_momentum")
    theta = init_theta(rule)
    slots = make_slots(rule)
    out = sch.meta_gradient(rule, theta, slots, "valid_mean")
    assert set(out.extras[0]) == {"sens.p.w", "sens.s.buf"}
    assert out.extras[0]["sens.p.w"].shape == (1, 5)


# -- ES / PES -------------------------------------------------------------------------------------
ES_RULE = ("layerwise_lr", dict(lr=0.1, num_steps=4))  # 4 meta-parameters


def test_es_estimate_matches_window_gradient():
    """1000 antithetic pairs per slot (4 meta-parameters): relative error < 0.2 and cosine > 0.95
    against backprop through the same window (measured: 0.11, 0.999)."""
    rule = make_rule(*ES_RULE[:1], **ES_RULE[1])
    theta = init_theta(rule)
    ref = Nested(truncation=6).meta_gradient(rule, theta, make_slots(rule), "valid_mean")
    es = ES(truncation=6, num_samples=1000, sigma=0.01)
    out = es.meta_gradient(rule, theta, make_slots(rule), "valid_mean")
    assert not any(g.requires_grad for g in out.grads.values())  # no graph: estimated, not backprop
    assert rel_err(out.grads, ref.grads) < 0.2 and cosine(out.grads, ref.grads) > 0.95
    # the slot advanced with the unperturbed theta, as nested would
    for a, b in zip(out.params, ref.params):
        torch.testing.assert_close(a["w"], b["w"], rtol=1e-12, atol=1e-14)
    assert out.meta_losses == pytest.approx(ref.meta_losses, rel=1e-12)


@pytest.mark.parametrize("theta_run", [True, False])
def test_pes_is_unbiased_over_truncations_where_truncated_es_is_not(theta_run):
    """M truncations of W steps, theta fixed: the mean PES estimate matches backprop through the
    whole M*W-step run (valid_mean), relative error < 0.2 (measured 0.08, cosine 0.997); truncated
    ES on the same truncations misses the cross-truncation effect (measured 0.52). With or
    without the extra unperturbed run (``theta_run``): PES's particles are the same either way."""
    rule = make_rule(*ES_RULE[:1], **ES_RULE[1])
    theta = init_theta(rule)
    M, W = 4, 3
    ref = Nested(truncation=M * W).meta_gradient(rule, theta, make_slots(rule), "valid_mean").grads
    means = {}
    for cls in (PES, ES):
        sch, slots = cls(truncation=W, num_samples=1000, sigma=0.01, theta_run=theta_run), make_slots(rule)
        acc = {k: torch.zeros_like(v) for k, v in theta.items()}
        for _ in range(M):
            out = sch.meta_gradient(rule, theta, slots, "valid_mean")
            advance(slots, out)
            acc = {k: acc[k] + out.grads[k] / M for k in acc}
        means[cls.name] = acc
    assert rel_err(means["pes"], ref) < 0.2 and cosine(means["pes"], ref) > 0.95
    assert rel_err(means["es"], ref) > 0.4
    assert all(not s.extra for s in slots)  # (truncated ES carries nothing across truncations)


def test_without_theta_run_the_slot_is_the_particles_mean():
    """theta_run=False: no unperturbed run; the slot's params/state/losses are the means over its
    2N particles -- the theta run up to O(sigma^2) -- and the estimate is unchanged (same noise,
    same particles)."""
    rule = make_rule(*ES_RULE[:1], **ES_RULE[1])
    theta = init_theta(rule)
    ref = Nested(truncation=3).meta_gradient(rule, theta, make_slots(rule), "valid_mean")
    for cls in (ES, PES):
        with_run = cls(truncation=3, num_samples=4, sigma=0.01).meta_gradient(
            rule, theta, make_slots(rule), "valid_mean")
        out = cls(truncation=3, num_samples=4, sigma=0.01, theta_run=False).meta_gradient(
            rule, theta, make_slots(rule), "valid_mean")
        torch.testing.assert_close(flat(out.grads), flat(with_run.grads), rtol=1e-12, atol=1e-14)
        for a, b in zip(out.params, ref.params):
            assert not torch.equal(a["w"], b["w"])          # a mean of perturbed runs, not theta's
            torch.testing.assert_close(a["w"], b["w"], rtol=1e-4, atol=1e-6)  # ... up to O(sigma^2)
        assert out.meta_losses == pytest.approx(ref.meta_losses, rel=1e-3)
        if cls is PES:
            x = out.extras[0]
            mean_w = torch.cat([x["pes.pos.p.w"], x["pes.neg.p.w"]]).mean(0)
            torch.testing.assert_close(out.params[0]["w"], mean_w, rtol=1e-14, atol=1e-15)


def test_pes_first_truncation_is_es_and_particles_are_carried():
    rule = make_rule(*ES_RULE[:1], **ES_RULE[1])
    theta = init_theta(rule)
    es = ES(truncation=3, num_samples=5).meta_gradient(rule, theta, make_slots(rule), "valid_mean")
    slots = make_slots(rule)
    pes = PES(truncation=3, num_samples=5)
    out = pes.meta_gradient(rule, theta, slots, "valid_mean")
    assert rel_err(out.grads, es.grads) < 1e-12  # xi = e on the first truncation after a reset
    x = out.extras[0]
    assert x["pes.xi"].shape == (5, 4) and x["pes.pos.p.w"].shape == (5, 5)
    assert {"pes.pos.s.step", "pes.neg.s.step"} <= set(x)
    assert not torch.equal(x["pes.pos.p.w"], x["pes.neg.p.w"])  # the particles have diverged
    advance(slots, out)
    out2 = pes.meta_gradient(rule, theta, slots, "valid_mean")
    # xi accumulates: the new sum minus the old one is this truncation's perturbation
    assert not torch.equal(out2.extras[0]["pes.xi"], x["pes.xi"])
    assert float(out2.extras[0]["pes.pos.s.step"][0]) == 6.0


def test_pes_bookkeeping_equals_the_formula():
    """xi after M truncations is the sum of the M perturbations drawn from the slot's generator
    right after its window's batches; each truncation's estimate is
    sum_i (L(pos_i) - L(neg_i)) xi_i / (2 N sigma^2), with the particles' losses recomputed here
    by unrolling each carried particle with theta +- e_i on the same batches."""
    from metaopt.meta.engine import sample_window
    from metaopt.meta.es import flatten_theta, unflatten_theta
    from metaopt.meta.unroll import unroll
    rule = make_rule(*ES_RULE[:1], **ES_RULE[1])
    theta = init_theta(rule)
    th0 = flatten_theta(theta)
    N, W, sigma = 3, 2, 0.05
    pes, slots = PES(truncation=W, num_samples=N, sigma=sigma), make_slots(rule, 1)
    xi = torch.zeros(N, th0.numel(), dtype=th0.dtype)
    pos = [dict(slots[0].params) for _ in range(N)], [dict(slots[0].state) for _ in range(N)]
    neg = [dict(slots[0].params) for _ in range(N)], [dict(slots[0].state) for _ in range(N)]
    for _ in range(3):
        s = slots[0]
        twin = torch.Generator()
        twin.set_state(s.gen.get_state())
        probe = type(s)(task=s.task, seed=s.seed, params=s.params, state=s.state, gen=twin)
        tb, vb = sample_window(probe, W, True)
        e = (torch.randn((N, th0.numel()), generator=twin, dtype=torch.float64) * sigma)
        xi = xi + e
        out = pes.meta_gradient(rule, theta, slots, "valid_mean")
        # PES's accumulation vs this test's: the same draws, summed by different code
        torch.testing.assert_close(out.extras[0]["pes.xi"], xi, rtol=1e-12, atol=1e-15)
        L = {}
        with torch.no_grad():
            for sign, (ps, ss) in (("pos", pos), ("neg", neg)):
                L[sign] = []
                for i in range(N):
                    th = unflatten_theta(th0 + (e[i] if sign == "pos" else -e[i]), theta)
                    o = unroll(rule, th, s.task.apply, ps[i], s.task.buffers, ss[i], tb, vb)
                    ps[i], ss[i] = o.params, o.state
                    L[sign].append(o.meta_loss)
                    torch.testing.assert_close(out.extras[0][f"pes.{sign}.p.w"][i], o.params["w"],
                                               rtol=1e-12, atol=1e-14)
        g = ((torch.stack(L["pos"]) - torch.stack(L["neg"]))[:, None] * xi).sum(0) / (
            2 * N * sigma ** 2)
        torch.testing.assert_close(flat(out.grads), g, rtol=1e-8, atol=1e-12)
        advance(slots, out)


# -- inside MetaTrainer ---------------------------------------------------------------------------
def _cfg(steps, **kw):
    base = dict(outer_steps=steps, meta_batch=2, horizon=6, outer_lr=1e-2, seed=3,
                checkpoint_every=2, progress=False, dtype="float64")
    base.update(kw)
    return TrainConfig(**base)


TRAINER_CASES = [
    ("nested", dict(truncation=3), "mlp"),
    ("interleaved", dict(), "layerwise_adam"),            # forward mode
    ("interleaved", dict(), "mlp"),                       # auto -> one_step
    ("continuous", dict(window=3, method="rk4"), "adam"),  # rk4 + adjoint
    ("continuous", dict(window=3, method="dopri5"), "sgd_momentum"),
    ("es", dict(truncation=3), "layerwise_adam"),
    ("pes", dict(truncation=3, num_samples=4), "mlp"),
]


@pytest.mark.parametrize("name,kw,rule_key", TRAINER_CASES,
                         ids=[f"{n}-{r}-{i}" for i, (n, _, r) in enumerate(TRAINER_CASES)])
def test_scheme_runs_in_trainer_without_nan(tmp_path, name, kw, rule_key):
    needs_extra_for(name)
    rule = rule_of(rule_key)
    tr = MetaTrainer(rule, FAM, make_scheme(name, **kw), _cfg(8), tmp_path)
    theta0 = tr.theta_detached()
    last = tr.run()
    assert math.isfinite(last) and tr.nonfinite == 0
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(rows) == 8
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("meta_loss", "grad_norm",
                                                                   "train_loss"))
    assert all(torch.isfinite(v).all() for v in tr.theta.values())
    assert rel_err(tr.theta_detached(), theta0) > 1e-4  # theta moved
    assert tr.inner_steps == 8 * 2 * tr.scheme.window


@pytest.mark.parametrize("name,kw,rule_key", [
    ("interleaved", dict(mode="forward"), "sgd_momentum"),
    ("pes", dict(truncation=2, num_samples=3), "layerwise_adam"),
])
def test_resume_with_scheme_carried_extra_reaches_uninterrupted_theta(tmp_path, name, kw, rule_key):
    rule = rule_of(rule_key)
    mk = lambda out: MetaTrainer(rule, FAM, make_scheme(name, **kw), _cfg(7, horizon=8), out)
    full = mk(tmp_path / "full")
    full.run()
    killed = mk(tmp_path / "run")
    real_step = killed.train_step

    def step_then_die():
        if killed.outer_step == 5:
            raise KeyboardInterrupt
        return real_step()
    killed.train_step = step_then_die
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    resumed = mk(tmp_path / "run")
    resumed.load_checkpoint()
    assert resumed.outer_step == 4
    assert any(s.extra for s in resumed.slots)  # the carried tensors came back from disk
    resumed.run()
    for k in full.theta:
        assert torch.equal(full.theta[k].detach(), resumed.theta[k].detach()), k
    for a, b in zip(full.slots, resumed.slots):
        assert a.seed == b.seed and a.step == b.step and set(a.extra) == set(b.extra)
        for k in a.extra:
            assert torch.equal(a.extra[k], b.extra[k]), k


# -- nested gradient checkpointing ----------------------------------------------------------------
@pytest.mark.parametrize("use_vmap", [True, False])
@pytest.mark.parametrize("name,kwargs", [
    ("sgd", dict(lr=0.1, momentum=0.9)),
    ("layerwise_lr", dict(lr=0.05, num_steps=2, direction="adam", act_features=True,
                          loss_features=True)),
    ("mlp", dict(hidden_size=6)),
])
def test_nested_checkpoint_gives_the_same_meta_gradient(name, kwargs, use_vmap):
    rule = make_rule(name, **kwargs)
    fam = TinyFamily()
    theta = init_theta(rule, family=fam)
    outs = [Nested(truncation=4, use_vmap=use_vmap, checkpoint=ck).meta_gradient(
        rule, theta, make_slots(rule, 3, family=fam), "valid_mean") for ck in (False, True)]
    assert rel_err(outs[1].grads, outs[0].grads) < 1e-12
    assert max(float(v.abs().max()) for v in outs[0].grads.values()) > 1e-6
    # the recomputed forward may take other (vmapped, CPU-dependent) kernels than the stored one:
    # equal to float64 rounding (measured up to 4e-17 on weights of size ~1), not to the bit
    for a, b in zip(outs[0].params, outs[1].params):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-12, atol=1e-14)
    assert outs[1].meta_losses == pytest.approx(outs[0].meta_losses, rel=1e-12)


# -- construction ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", [("interleaved", dict(mode="forward", max_forward_params=9)),
                                     ("continuous", dict(window=5, method="dopri5", eta=0.1)),
                                     ("es", dict(truncation=4, num_samples=3, sigma=0.1)),
                                     ("pes", dict(truncation=4, num_samples=3, sigma=0.1))])
def test_make_scheme_round_trips_config_and_hydra_nodes(name, kw):
    needs_extra_for(name)
    from metaopt.cli.config import (ContinuousConf, ESConf, InterleavedConf, PESConf, build_scheme)
    s = make_scheme(name, **kw)
    assert make_scheme(name, **s.config()).config() == s.config()
    conf = {"interleaved": InterleavedConf, "continuous": ContinuousConf, "es": ESConf,
            "pes": PESConf}[name]
    built = build_scheme(OmegaConf.merge(OmegaConf.structured(conf), kw))
    assert built.name == name and built.config() == s.config()
    from hydra.core.config_store import ConfigStore
    from metaopt.cli.config import register_configs
    register_configs()
    assert f"{name}.yaml" in ConfigStore.instance().repo["scheme"]


@pytest.mark.parametrize("name,kw,word", [("interleaved", dict(mode="reverse"), "mode"),
                                          ("continuous", dict(method="leapfrog"), "method"),
                                          ("continuous", dict(gradient="exact"), "gradient"),
                                          ("continuous", dict(eta=0.0), "eta"),
                                          ("es", dict(sigma=0.0), "sigma"),
                                          ("pes", dict(num_samples=0), "num_samples")])
def test_invalid_scheme_arguments_name_the_argument(name, kw, word):
    with pytest.raises(ValueError, match=word):
        make_scheme(name, **kw)
