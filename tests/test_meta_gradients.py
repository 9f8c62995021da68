"""The nested unroll's meta-gradient equals central finite differences (float64) for every rule."""
import pytest
import torch

from metaopt.meta.slots import new_slot
from metaopt.meta.nested import Nested
from metaopt.rules import make_rule
from metaopt.types import FlatSpec
from tests.helpers import TinyFamily

RULES = [
    ("sgd", dict(lr=0.1, momentum=0.9)),
    ("adam", dict(lr=0.01)),
    ("layerwise_lr", dict(lr=0.1, num_steps=3)),
    ("layerwise_lr", dict(lr=0.05, num_steps=2, direction="adam", act_features=True, loss_features=True)),
    ("per_param_lr", dict(lr=0.1)),
    ("mlp", dict(hidden_size=8)),
    ("mlp", dict(hidden_size=8, act_features=True, loss_features=True)),
]


def make_slots(rule, k=2, seed=0):
    fam = TinyFamily()
    return [new_slot(fam, rule, seed + 17 * i, horizon=100, dtype=torch.float64) for i in range(k)]


def meta_loss_fn(rule, scheme, slots_factory, meta_loss):
    def f(theta):
        slots = slots_factory()  # fresh generators: identical batches every evaluation
        outs = scheme.window_losses(rule, theta, slots, meta_loss)
        return torch.stack([o[0] for o in outs]).mean()
    return f


@pytest.mark.parametrize("name,kwargs", RULES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(RULES)])
@pytest.mark.parametrize("meta_loss", ["valid_mean", "train"])
def test_nested_meta_gradient_matches_finite_differences(name, kwargs, meta_loss):
    rule = make_rule(name, **kwargs)
    probe = make_slots(rule, 1)[0]
    theta = {k: v.double().requires_grad_(True)
             for k, v in rule.init_theta(FlatSpec.of(probe.params), torch.Generator().manual_seed(1)).items()}
    if name == "mlp":
        with torch.no_grad():
            theta["log_scale"].fill_(3.0)  # larger steps so the rule visibly moves the weights
            for k in theta:  # zero biases put ReLU inputs exactly on the kink for rows of all-zero
                if k.startswith("b"):  # hidden units; finite differences are one-sided there
                    theta[k].normal_(0.0, 0.1, generator=torch.Generator().manual_seed(5))
    scheme = Nested(truncation=4)
    f = meta_loss_fn(rule, scheme, lambda: make_slots(rule, 2), meta_loss)
    loss = f(theta)
    grads = torch.autograd.grad(loss, list(theta.values()))
    g = torch.Generator().manual_seed(2)
    direction = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in theta.items()}
    analytic = sum((gr * direction[k]).sum() for gr, k in zip(grads, theta))
    eps = 1e-6
    with torch.no_grad():
        plus = f({k: v + eps * direction[k] for k, v in theta.items()})
        minus = f({k: v - eps * direction[k] for k, v in theta.items()})
    fd = (plus - minus) / (2 * eps)
    assert abs(analytic) > 1e-8, "meta-gradient vanished; the test would be vacuous"
    rel = abs(analytic - fd) / max(abs(fd), 1e-12)
    assert rel < 1e-4, f"{name}: analytic {analytic.item():.10g} vs fd {fd.item():.10g} (rel {rel:.2e})"


@pytest.mark.parametrize("name,kwargs", [RULES[1], RULES[3], RULES[6]])
def test_vmap_meta_batch_equals_loop(name, kwargs):
    rule = make_rule(name, **kwargs)
    probe = make_slots(rule, 1)[0]
    theta = {k: v.double().requires_grad_(True)
             for k, v in rule.init_theta(FlatSpec.of(probe.params), torch.Generator().manual_seed(3)).items()}
    grads = []
    for use_vmap in (True, False):
        scheme = Nested(truncation=5, use_vmap=use_vmap)
        out = scheme.meta_gradient(rule, theta, make_slots(rule, 4), "valid_mean")
        grads.append(out)
    a, b = grads
    # vmapped vs per-slot kernels: the same float64 computation up to rounding (the contract
    # tests use the same 1e-9)
    assert max(float(v.abs().max()) for v in a.grads.values()) > 1e-6, "vacuous: no gradient"
    for k in theta:
        torch.testing.assert_close(a.grads[k], b.grads[k], rtol=1e-9, atol=1e-12)
    for pa, pb in zip(a.params, b.params):
        for k in pa:
            torch.testing.assert_close(pa[k], pb[k], rtol=1e-12, atol=1e-14)
    assert a.meta_losses == pytest.approx(b.meta_losses, rel=1e-12)
