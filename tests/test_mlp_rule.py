"""MLPRule.update (per-tensor normalization and per-tensor inputs through one-hot matmuls) equals
the textbook form: build the [N, F] feature matrix with features(), run the MLP on it."""
import pytest
import torch

from metaopt.rules import make_rule
from metaopt.types import FlatSpec


def _reference(rule, theta, grads, state, params, ctx):
    spec = FlatSpec.of(params)
    g, p = spec.flatten(grads), spec.flatten(params)
    dec = torch.tensor(rule.decays, dtype=g.dtype)[:, None]
    m = dec * state["m"] + (1 - dec) * g
    v = rule.rms_decay * state["v"] + (1 - rule.rms_decay) * g * g
    x, _ = rule.features(g, p, m, v, spec, state["step"].to(g.dtype), ctx, state)
    for i in range(rule.num_layers + 1):
        x = x @ theta[f"w{i}"] + theta[f"b{i}"]
        if i < rule.num_layers:
            x = torch.relu(x)
    step = x[:, 0] * torch.exp(x[:, 1] * rule.exp_mult) * rule.step_mult * torch.exp(theta["log_scale"])
    return spec.unflatten(-step)


@pytest.mark.parametrize("act,loss", [(False, False), (True, True)])
def test_update_equals_the_feature_matrix_form(act, loss):
    torch.manual_seed(0)
    rule = make_rule("mlp", hidden_size=8, act_features=act, loss_features=loss)
    params = {"w1": torch.randn(5, 3, dtype=torch.float64), "b1": torch.randn(5, dtype=torch.float64),
              "w2": torch.randn(2, 5, dtype=torch.float64) * 3}
    spec = FlatSpec.of(params)
    theta = {k: v.double() for k, v in rule.init_theta(spec, torch.Generator().manual_seed(1)).items()}
    theta = {k: v + 0.3 * torch.randn_like(v) for k, v in theta.items()}  # a non-trivial rule
    state = rule.init(params)
    ctx = {"loss": torch.tensor(0.7, dtype=torch.float64),
           "act": {"w1": torch.tensor([0.1, -0.2], dtype=torch.float64)} if act else None}
    for t in range(3):
        grads = {k: torch.randn_like(v) * (t + 1) for k, v in params.items()}
        ref = _reference(rule, theta, grads, state, params, ctx)
        upd, state = rule.update(theta, grads, state, params, ctx)
        for k in params:
            torch.testing.assert_close(upd[k], ref[k], rtol=1e-12, atol=1e-15)
        assert any(upd[k].abs().max() > 0 for k in upd)
        params = {k: params[k] + upd[k] for k in params}
