"""The procedurally drawn meta-training families (metaopt/tasks/synthetic.py): reproducible,
trainable, vmappable, and unchanged in loss under the Celo-style reparameterization."""
import math

import pytest
import torch
from torch.func import vmap

from metaopt.tasks import make_family
from metaopt.tasks.mixture import ReparamTask
from metaopt.tasks.synthetic import VAEModule, smooth_target

FAMILIES = {
    "regression": dict(in_dims=[2], widths=[16], depths=[1]),
    "raw_features": dict(in_dims=[8], hidden=[0]),
    "vae": dict(dims=[8], hidden=[16], latents=[2]),
    "matfac": dict(users=[32], items=[24], dims=[4]),
    "resmlp": dict(widths=[16], depths=[2]),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_reproducible_and_trainable(name):
    torch.manual_seed(0)
    fam = make_family(name, **FAMILIES[name])
    a, b = fam.sample_seeded(3), fam.sample_seeded(3)
    assert a.signature == b.signature
    ba = a.sample_batch("train", torch.Generator().manual_seed(0))
    bb = b.sample_batch("train", torch.Generator().manual_seed(0))
    for x, y in zip(ba, bb):
        assert torch.equal(x, y)                       # same seed: same data (same code path)
    gen = torch.Generator().manual_seed(1)
    params = {k: v.clone().requires_grad_(True) for k, v in a.init_params(gen).items()}
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    full = a.full_batch("train")
    with torch.no_grad():
        first = float(a.loss(params, full))
    for _ in range(60):
        opt.zero_grad()
        a.loss(params, a.sample_batch("train", gen)).backward()
        opt.step()
    with torch.no_grad():
        last = float(a.loss(params, full))
    assert math.isfinite(last) and last < 0.8 * first, (first, last)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_vmap_equals_loop(name):
    """Tasks of one drawn architecture (different data) vmap together; vmap and the loop are
    different kernels, so they agree to float64 rounding."""
    fam = make_family(name, dtype=torch.float64, **FAMILIES[name])
    tasks = [fam.sample_seeded(s) for s in range(6)]
    same = [t for t in tasks if t.signature == tasks[0].signature]
    assert len(same) >= 2
    ps = [t.init_params(torch.Generator().manual_seed(i)) for i, t in enumerate(same)]
    bs = [t.sample_batch("train", torch.Generator().manual_seed(10 + i)) for i, t in enumerate(same)]
    P = {k: torch.stack([p[k] for p in ps]) for k in ps[0]}
    B = tuple(torch.stack(z) for z in zip(*bs))
    t0 = same[0]
    out = vmap(lambda p, b: t0.apply(p, t0.buffers, b))(P, B)
    ref = torch.stack([t.loss(p, b) for t, p, b in zip(same, ps, bs)])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_reparameterization_leaves_the_loss_unchanged(name):
    base = make_family(name, dtype=torch.float64, **FAMILIES[name]).sample_seeded(0)
    scales = {k: 10.0 ** ((i % 5) - 2) for i, k in enumerate(base.param_shapes())}
    aug = ReparamTask(base, scales)
    w_prime = aug.init_params(torch.Generator().manual_seed(1))
    batch = base.sample_batch("train", torch.Generator().manual_seed(2))
    torch.testing.assert_close(aug.loss(w_prime, batch), base.loss(aug.to_base(w_prime), batch),
                               rtol=1e-12, atol=0)


def test_raw_features_columns_span_the_requested_scales():
    t = make_family("raw_features", in_dims=[32], feature_scales=[1e-3, 1e3]).sample_seeded(0)
    col = t.data.x["train"].abs().mean(0)
    assert float(col.max() / col.min()) > 1e4


def test_smooth_target_is_standardized_and_smooth():
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-2, 2, 401, dtype=torch.float64)[:, None]
    y = smooth_target(x, g)
    assert abs(float(y.mean())) < 1e-9 and abs(float(y.std()) - 1) < 1e-9
    assert float((y[1:] - y[:-1]).abs().max()) < 0.2      # no jumps between 0.01-apart inputs


def test_vae_loss_is_the_negative_elbo():
    """Independent reference: recon 0.5 |x - x_hat|^2 plus the closed-form Gaussian KL."""
    torch.manual_seed(0)
    m = VAEModule(6, 8, 2).double()
    x, eps = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    h = torch.relu(m.enc(x))
    mu, lv = m.enc_out(h)[:, :2], m.enc_out(h)[:, 2:]
    z = mu + torch.exp(0.5 * lv) * eps
    xh = m.dec_out(torch.relu(m.dec(z)))
    kl = 0.5 * (mu ** 2 + lv.exp() - 1 - lv).sum(1)
    ref = (0.5 * ((x - xh) ** 2).sum(1) + kl).mean()
    torch.testing.assert_close(m(x, eps), ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name,bad", [("regression", dict(noise=[-1.0])),
                                      ("raw_features", dict(losses=["hinge"])),
                                      ("matfac", dict(fraction=0.0)),
                                      ("resmlp", dict(widths=[0]))])
def test_bad_options_are_one_line_errors(name, bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        make_family(name, **bad)
