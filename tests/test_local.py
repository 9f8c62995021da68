"""Local per-layer losses (metaopt/tasks/local.py, metaopt/meta/local.py), float64.

The local meta-gradient is checked against references built from plain autograd: per block, a
full unroll in which every other block's update is detached (so only that block's trajectory
depends on theta), and central finite differences of a run whose blocks each use their own copy
of theta.
"""
import pytest
import torch
from torch.func import grad_and_value

from metaopt.meta import Interleaved, Nested, make_scheme
from metaopt.meta.local import LocalMeta, block_index, slice_state
from metaopt.meta.slots import new_slot
from metaopt.meta.unroll import get_meta_loss
from metaopt.rules import make_rule
from metaopt.tasks import make_family
from metaopt.tasks.local import LocalFamily, LocalTask, SequentialModule
from metaopt.types import FlatSpec
from tests.helpers import needs_extra_for

D = torch.float64


def mlp_family(depth, width=6):
    return make_family("digits_mlp", widths=[width], depths=[depth], activations=["tanh"],
                       batch_sizes=[8], dtype=D)


def random_theta(rule, params, seed=0, scale=0.1):
    """The rule's theta plus noise (a fresh pertensor theta has a zero output layer, which would
    leave the first layer's meta-gradient zero and the test weaker)."""
    g = torch.Generator().manual_seed(seed)
    th = rule.init_theta(FlatSpec.of(params), g)
    return {k: (v.to(D) + scale * torch.randn(v.shape, generator=g, dtype=D)).requires_grad_(True)
            for k, v in th.items()}


def slots_for(family, rule, seeds=(0, 1)):
    return [new_slot(family, rule, s, 100, D) for s in seeds]


def windows(slots, T, ml):
    """The batches the engine will draw for each slot (from a copy of its generator)."""
    out = []
    for s in slots:
        gen = torch.Generator()
        gen.set_state(s.gen.get_state())
        tb = s.task.sample_batches("train", T, gen)
        vb = s.task.sample_batches("valid", T, gen) if ml.needs_valid else None
        out.append((tb, vb))
    return out


# -- one block: local is global ------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["nested", "interleaved"])
def test_one_block_local_equals_global(scheme):
    base = mlp_family(depth=1)
    fam = LocalFamily(base, inner="local")
    rule = make_rule("pertensor")
    local_slots, base_slots = slots_for(fam, rule), slots_for(base, rule)
    assert local_slots[0].task.num_blocks == 1
    theta = random_theta(rule, base_slots[0].params)
    mk = (lambda: Nested(truncation=3)) if scheme == "nested" else \
        (lambda: Interleaved(mode="one_step"))
    out_g = mk().meta_gradient(rule, theta, base_slots, "valid_log_mean")
    out_l = LocalMeta(mk(), "local").meta_gradient(rule, theta, local_slots, "valid_log_mean")
    for pg, pl in zip(out_g.params, out_l.params):  # the inner trajectory
        for k in pg:
            torch.testing.assert_close(pl["net." + k], pg[k], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(torch.tensor(out_l.meta_losses), torch.tensor(out_g.meta_losses))
    assert any(float(v.abs().max()) > 0 for v in out_g.grads.values())
    for k in theta:
        torch.testing.assert_close(out_l.grads[k], out_g.grads[k], rtol=1e-9, atol=1e-12)


# -- several blocks: the sum of per-block autograd meta-gradients ------------------------------------
def blockwise_reference(task, rule, theta, params, state, tb, vb, T, ml, l):
    """d M_l / d theta by plain autograd through the whole network's unroll, with every other
    block's update (params and its rule-state coordinates) detached."""
    names = set(task.block_names(l))
    n = FlatSpec.of(params).numel
    mask = torch.zeros(n, dtype=torch.bool)
    mask[block_index(params, [k for k in params if k in names])] = True
    p, s, metas = dict(params), dict(state), []
    for t in range(T):
        batch = (tb[0][t], tb[1][t])
        grads, loss = grad_and_value(lambda q: task.apply(q, task.buffers, batch))(p)
        upd, s2 = rule.update(theta, grads, s, p, {"loss": loss, "act": None})
        p = {k: p[k] + (upd[k] if k in names else upd[k].detach()) for k in p}
        s = {k: torch.where(mask, v, v.detach()) if v.shape[-1:] == (n,) else v
             for k, v in s2.items()}
        if ml.reads(t, T):
            x, y = (vb[0][t], vb[1][t]) if ml.needs_valid else batch
            x_in = task.block_inputs(p, task.buffers, x)[l]
            v = task.block_loss(l, p, task.buffers, x_in, y)
            metas.append(torch.log(v) if ml.log else v)
    M = task.block_weight(l) * torch.stack(metas).mean()
    return torch.autograd.grad(M, list(theta.values())), float(M.detach()), (p, s)


@pytest.mark.parametrize("inner,meta_loss,rule_name", [
    ("local", "valid_mean", "pertensor"), ("local", "train_log_mean", "adam"),
    ("global", "valid_log_mean", "pertensor"), ("mixed", "valid_last", "pertensor")])
def test_local_meta_gradient_is_sum_of_blockwise_autograd(inner, meta_loss, rule_name):
    fam = LocalFamily(mlp_family(depth=3), inner=inner, weights=[0.5, 2.0])
    rule = make_rule(rule_name)
    slots = slots_for(fam, rule)
    task = slots[0].task
    assert task.num_blocks == 3
    theta = random_theta(rule, slots[0].params)
    ml, T = get_meta_loss(meta_loss), 3
    wins = windows(slots, T, ml)
    out = LocalMeta(Nested(truncation=T), "local").meta_gradient(rule, theta, slots, ml)
    ref = [torch.zeros_like(v) for v in theta.values()]
    for s, (tb, vb), m, p_out, s_out in zip(slots, wins, out.meta_losses, out.params, out.states):
        total = 0.0
        for l in range(task.num_blocks):
            g, M, (p_end, s_end) = blockwise_reference(s.task, rule, theta, s.params, s.state, tb, vb, T,
                                              ml, l)
            ref = [r + gi / len(slots) for r, gi in zip(ref, g)]
            total += M
        assert m == pytest.approx(total, rel=1e-10)
        # the slot advanced along the actual (whole-network) trajectory: params and rule state
        for got, want in ((p_out, p_end), (s_out, s_end)):
            for k in want:
                torch.testing.assert_close(got[k], want[k].detach(), rtol=1e-10, atol=1e-12)
    assert any(float(r.abs().max()) > 0 for r in ref)
    for k, r in zip(theta, ref):
        torch.testing.assert_close(out.grads[k], r, rtol=1e-9, atol=1e-12)


# -- inner local: no gradient from block l+1 into block l ---------------------------------------------
@pytest.mark.parametrize("family", ["mlp", "conv"])
def test_inner_local_blocks_get_no_gradient_from_above(family):
    base = mlp_family(depth=3) if family == "mlp" else make_family(
        "digits_conv", channels=[4], depths=[2], activations=["relu"], batch_sizes=[8], dtype=D)
    gen = torch.Generator().manual_seed(0)
    results = {}
    for inner in ("local", "global", "mixed"):
        task = LocalTask(base.sample_seeded(3), inner=inner)
        p = task.init_params(torch.Generator().manual_seed(1))
        batch = task.sample_batch("train", torch.Generator().manual_seed(2))
        changed = {}
        for l in range(task.num_blocks - 1):
            mine = task.block_names(l)
            above = {k for m in range(l + 1, task.num_blocks) for k in task.block_names(m)}
            q = {k: v + (torch.randn(v.shape, generator=gen, dtype=D) if k in above else 0)
                 for k, v in p.items()}
            g1 = torch.func.grad(lambda z: task.apply(z, task.buffers, batch))(p)
            g2 = torch.func.grad(lambda z: task.apply(z, task.buffers, batch))(q)
            changed[l] = max(float((g1[k] - g2[k]).abs().max()) for k in mine)
            if inner == "local":  # block l's gradient is its own local loss's, whatever is above
                x_in = task.block_inputs(p, task.buffers, batch[0])[l]
                own = torch.func.grad(lambda z: task.block_weight(l) * task.block_loss(
                    l, z, task.buffers, x_in, batch[1]))({k: p[k] for k in mine})
                for k in mine:
                    torch.testing.assert_close(g1[k], own[k], rtol=1e-12, atol=1e-14)
        results[inner] = changed
    assert all(v == 0.0 for v in results["local"].values())
    assert all(v > 1e-6 for v in results["global"].values())   # control: end-to-end backprop
    assert all(v > 1e-6 for v in results["mixed"].values())


# -- finite differences of the local meta-loss ---------------------------------------------------
def per_block_theta_run(task, rule, thetas, params, state, tb, vb, T, ml):
    """Plain run whose block l is updated by its own theta copy ``thetas[l]``; returns [M_l]."""
    L = task.num_blocks
    n = FlatSpec.of(params).numel
    names = [[k for k in params if k in set(task.block_names(l))] for l in range(L)]
    idx = [block_index(params, nm) for nm in names]
    p, s, metas = dict(params), dict(state), [[] for _ in range(L)]
    for t in range(T):
        batch = (tb[0][t], tb[1][t])
        grads, loss = grad_and_value(lambda q: task.apply(q, task.buffers, batch))(p)
        new_p, parts = {}, []
        for l in range(L):
            pl = {k: p[k] for k in names[l]}
            upd, sl = rule.update(thetas[l], {k: grads[k] for k in names[l]},
                                  slice_state(s, idx[l], n), pl, {"loss": loss, "act": None})
            new_p.update({k: pl[k] + upd[k] for k in pl})
            parts.append(sl)
        s_new = {}
        for k, v in s.items():
            if v.shape[-1:] == (n,):
                out = torch.zeros_like(v)
                for l in range(L):
                    out = out.index_copy(-1, idx[l], parts[l][k])
                s_new[k] = out
            else:
                s_new[k] = parts[0][k]
        p, s = {k: new_p[k] for k in p}, s_new
        if ml.reads(t, T):
            x, y = (vb[0][t], vb[1][t]) if ml.needs_valid else batch
            xs = task.block_inputs(p, task.buffers, x)
            for l in range(L):
                v = task.block_loss(l, p, task.buffers, xs[l], y)
                metas[l].append(torch.log(v) if ml.log else v)
    return [task.block_weight(l) * torch.stack(m).mean() for l, m in enumerate(metas)]


def test_local_meta_gradient_matches_finite_differences():
    fam = LocalFamily(mlp_family(depth=3, width=5), inner="local", weights=[1.0, 0.7])
    rule = make_rule("pertensor")
    slot = slots_for(fam, rule, seeds=(4,))
    task = slot[0].task
    theta = random_theta(rule, slot[0].params, seed=3, scale=0.3)
    ml, T = get_meta_loss("valid_log_mean"), 4
    (tb, vb), = windows(slot, T, ml)
    out = LocalMeta(Nested(truncation=T), "local").meta_gradient(rule, theta, slot, ml)
    th0 = {k: v.detach() for k, v in theta.items()}
    g = torch.Generator().manual_seed(9)
    eps = 1e-6
    for _ in range(2):
        d = {k: torch.randn(v.shape, generator=g, dtype=D) for k, v in th0.items()}
        fd = 0.0
        for l in range(task.num_blocks):
            def M_l(sign):
                ths = [th0] * task.num_blocks
                ths = ths[:l] + [{k: v + sign * eps * d[k] for k, v in th0.items()}] + ths[l + 1:]
                return float(per_block_theta_run(task, rule, ths, slot[0].params, slot[0].state,
                                                 tb, vb, T, ml)[l])
            fd += (M_l(1) - M_l(-1)) / (2 * eps)
        an = sum(float((out.grads[k] * d[k]).sum()) for k in th0)
        assert an == pytest.approx(fd, rel=1e-6, abs=1e-9)
    # and its value is the local meta-loss the scheme reports
    Ms = per_block_theta_run(task, rule, [th0] * task.num_blocks, slot[0].params, slot[0].state,
                             tb, vb, T, ml)
    assert out.meta_losses[0] == pytest.approx(float(sum(Ms)), rel=1e-10)


# -- other families, mixed meta, errors ------------------------------------------------------------
def test_conv_charlm_and_sequential_heads():
    conv = make_family("digits_conv", channels=[4], depths=[2], batch_sizes=[8], dtype=D)
    lm = make_family("char_lm", seq_len=8, d_model=8, n_layers=2, n_heads=2, batch_size=4, dtype=D)
    for fam in (conv, lm):
        base = fam.sample_seeded(0)
        task = LocalTask(base, inner="local")
        assert task.num_blocks == 2
        p = task.init_params(torch.Generator().manual_seed(0))
        batch = base.sample_batch("train", torch.Generator().manual_seed(1))
        bp = {k[4:]: v for k, v in p.items() if k.startswith("net.")}
        torch.testing.assert_close(task.end_loss(p, task.buffers, batch),
                                   base.apply(bp, base.buffers, batch))
        assert torch.isfinite(task.apply(p, task.buffers, batch))
    # a user's layered model
    from tests.helpers import tiny_data
    from metaopt.tasks.base import Task
    body = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh()),
                               torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()))
    mod = SequentialModule(body, torch.nn.Linear(6, 3), torch.nn.functional.cross_entropy).to(D)
    base = Task("seq", mod, tiny_data(), batch_size=8)
    task = LocalTask(base, inner="local", kind="recon")
    assert task.num_blocks == 2 and "heads.0.weight" in task.param_shapes()
    assert task.param_shapes()["heads.0.weight"] == (5, 6)  # reconstructs the block's input


def test_mixed_meta_is_the_blend():
    fam = LocalFamily(mlp_family(depth=2), inner="local")
    rule = make_rule("pertensor")
    theta = random_theta(rule, slots_for(fam, rule)[0].params)
    grads = {m: LocalMeta(Nested(truncation=2), m, mix=0.25).meta_gradient(
        rule, theta, slots_for(fam, rule), "valid_mean").grads for m in ("global", "local", "mixed")}
    for k in theta:
        torch.testing.assert_close(grads["mixed"][k],
                                   0.75 * grads["global"][k] + 0.25 * grads["local"][k])


def test_continuous_scheme_rejects_local_meta_losses():
    needs_extra_for("continuous")
    with pytest.raises(ValueError, match=r"local.meta='mixed' is not supported by scheme='continuous'"):
        LocalMeta(make_scheme("continuous"), "mixed")


def test_one_line_errors():
    with pytest.raises(ValueError, match=r"local.meta='local' is not supported by scheme='es'"):
        LocalMeta(make_scheme("es"), "local")
    LocalMeta(make_scheme("es"), "global")  # the end loss works with any scheme
    fam = LocalFamily(mlp_family(depth=2), inner="local")
    rule = make_rule("sgd")  # one meta-parameter: interleaved mode=auto picks forward mode
    slots = slots_for(fam, rule)
    theta = {k: v.to(D).requires_grad_(True) for k, v in rule.init_theta(None).items()}
    with pytest.raises(ValueError, match=r"local.meta='local' is not supported by scheme=interleaved"):
        LocalMeta(Interleaved(), "local").meta_gradient(rule, theta, slots, "valid_mean")
    act = make_rule("mlp", act_features=True)  # activation features read other blocks
    with pytest.raises(ValueError, match=r"local.meta='local' needs a rule"):
        LocalMeta(Nested(2), "local").meta_gradient(act, theta, slots, "valid_mean")
    with pytest.raises(ValueError, match=r"local.meta"):
        LocalMeta(Nested(2), "bogus")
    base = mlp_family(depth=2).sample_seeded(0)
    with pytest.raises(ValueError, match=r"local.layers"):
        LocalTask(base, layers=[1])
    with pytest.raises(ValueError, match=r"local.inner"):
        LocalTask(base, inner="nope")
    with pytest.raises(ValueError, match=r"local.weights"):
        LocalTask(base, weights=[1.0, 2.0])


# -- the local config group ----------------------------------------------------------------------
def test_local_config_group_composes_and_builds():
    from hydra import compose, initialize_config_dir
    from metaopt.cli.common import CONF_DIR
    from metaopt.cli.config import build_family, build_local, build_scheme, register_configs
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        built = {}
        for opt in ("none", "local", "mixed", "inner_local"):
            cfg = compose(config_name="train", overrides=[
                "task=digits_mlp", "task.depths=[2]", f"local={opt}"])
            fam, scheme = build_local(cfg.local, build_family(cfg.task), build_scheme(cfg.scheme))
            built[opt] = (fam, scheme)
        assert not isinstance(built["none"][1], LocalMeta)
        assert built["local"][1].meta == "local" and built["local"][0].inner == "local"
        assert built["mixed"][1].meta == "mixed" and built["inner_local"][1].meta == "global"
        assert isinstance(built["local"][0].sample_seeded(0), LocalTask)
        cfg = compose(config_name="train", overrides=["local=local", "scheme=es"])
        with pytest.raises(ValueError, match=r"local: task .* plain layered task"):
            build_local(cfg.local, build_family(cfg.task), build_scheme(cfg.scheme))
        cfg = compose(config_name="train", overrides=["task=digits_mlp", "local=local",
                                                      "scheme=es"])
        with pytest.raises(ValueError, match=r"local.meta='local' is not supported by scheme='es'"):
            build_local(cfg.local, build_family(cfg.task), build_scheme(cfg.scheme))
