"""torchopt.diff.implicit estimator vs unrolled differentiation of a long inner run (float64)."""
import pytest
import torch

from metaopt.interop.implicit import regularized_fit, unrolled_fit

DT = torch.float64


def _data(kind, n=40, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    w = torch.randn(d, generator=g, dtype=DT)
    z = x @ w + 0.3 * torch.randn(n, generator=g, dtype=DT)
    y = (z > 0).to(DT) if kind == "logistic" else z
    return x[:30], y[:30], x[30:], y[30:]


def _val(w, x, y, kind):
    z = x @ w
    if kind == "ridge":
        return 0.5 * ((z - y) ** 2).mean()
    return torch.nn.functional.binary_cross_entropy_with_logits(z, y)


@pytest.mark.parametrize("kind", ["ridge", "logistic"])
def test_implicit_meta_gradient_equals_unrolled(kind):
    xt, yt, xv, yv = _data(kind)
    log_lam = torch.linspace(-3, 0, xt.shape[1], dtype=DT)
    steps, lr = (400, 0.5) if kind == "ridge" else (1000, 1.0)
    lam1 = log_lam.clone().requires_grad_()
    (g_imp,) = torch.autograd.grad(_val(regularized_fit(lam1, xt, yt, kind, steps, lr), xv, yv, kind), lam1)
    lam2 = log_lam.clone().requires_grad_()
    (g_unr,) = torch.autograd.grad(_val(unrolled_fit(lam2, xt, yt, kind, steps, lr), xv, yv, kind), lam2)
    torch.testing.assert_close(g_imp, g_unr, rtol=1e-5, atol=1e-9)
    assert float(g_imp.abs().max()) > 1e-6


def test_implicit_ridge_matches_closed_form():
    xt, yt, xv, yv = _data("ridge")
    log_lam = torch.full((xt.shape[1],), -1.0, dtype=DT, requires_grad=True)
    (g_imp,) = torch.autograd.grad(_val(regularized_fit(log_lam, xt, yt, "ridge", 400, 0.5), xv, yv, "ridge"), log_lam)
    lam = log_lam.detach().clone().requires_grad_()
    n = xt.shape[0]
    w = torch.linalg.solve(xt.T @ xt / n + torch.diag(torch.exp(lam)), xt.T @ yt / n)
    (g_ref,) = torch.autograd.grad(_val(w, xv, yv, "ridge"), lam)
    torch.testing.assert_close(g_imp, g_ref, rtol=1e-6, atol=1e-10)
