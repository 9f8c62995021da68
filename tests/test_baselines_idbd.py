"""IDBD (Sutton 1992) and Autostep on linear least squares: the published updates, Sutton's
tracking task, checkpoints and argument checks."""
import copy
import io
import math

import pytest
import torch
from torch import nn

from metaopt.optim.idbd import IDBD, Autostep


def tracking_run(cls, n, seed=0, **kw):
    """Sutton's (1992) tracking task: 20 N(0,1) inputs, target = sum of the first 5 with signs
    s_i = +-1 (the other 15 irrelevant), one random relevant sign flipped every 20 examples;
    one example per step. Returns the final step sizes of the 20 weights."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(20, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    opt = cls(model.parameters(), **kw)
    s = torch.zeros(20, dtype=torch.float64)
    s[:5] = 1.0
    xs = torch.randn(n, 20, generator=g, dtype=torch.float64)
    flips = torch.randint(0, 5, (n // 20 + 1,), generator=g)
    w = model.weight
    for t in range(n):
        if t > 0 and t % 20 == 0:
            s[flips[t // 20]] *= -1
        x = xs[t]
        with torch.no_grad():
            delta = s @ x - w[0] @ x
        w.grad = (-delta * x).reshape(1, 20)  # gradient of (y* - y)^2 / 2
        opt.step(inputs=x)
    return opt.step_sizes(w)[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_idbd_learns_larger_rates_for_relevant_inputs(seed):
    alpha = tracking_run(IDBD, 5000, seed, lr=0.05, meta_lr=0.01)
    relevant, irrelevant = alpha[:5], alpha[5:]
    assert relevant.min() > 2.0 * irrelevant.max(), (relevant, irrelevant)
    assert relevant.min() > 0.05 > irrelevant.max()  # moved away from the initial 0.05 both ways


def test_autostep_learns_larger_rates_for_relevant_inputs():
    alpha = tracking_run(Autostep, 5000, 0, lr=0.05)
    assert alpha[:5].min() > 1.5 * alpha[5:].max(), alpha


def test_idbd_follows_sutton_update_with_autograd_gradients():
    """Two steps of nn.Linear(3, 1) with bias, gradients from autograd of (y - y*)^2 / 2,
    against the paper's per-weight equations (the bias is a weight on a constant input 1)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    theta, lr = 0.1, 0.6  # large enough that alpha x^2 > 1 and the [.]^+ clips
    opt = IDBD(model.parameters(), lr=lr, meta_lr=theta)
    w = torch.cat([model.weight.detach()[0], model.bias.detach()]).clone()
    beta = torch.full((4,), math.log(lr), dtype=torch.float64)
    h = torch.zeros(4, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    clipped = False
    for _ in range(3):
        x = 2.0 * torch.randn(3, generator=g, dtype=torch.float64)
        target = torch.randn((), generator=g, dtype=torch.float64)
        xb = torch.cat([x, torch.ones(1, dtype=torch.float64)])
        delta = target - w @ xb
        beta = beta + theta * delta * xb * h
        a = beta.exp()
        w = w + a * delta * xb
        clipped = clipped or bool((a * xb * xb > 1).any())
        h = h * (1 - a * xb * xb).clamp(min=0) + a * delta * xb

        def closure():
            opt.zero_grad()
            loss = 0.5 * ((model(x[None]) - target) ** 2).sum(-1).mean()
            loss.backward()
            return loss
        opt.step(closure, inputs=x[None])
        got = torch.cat([model.weight.detach()[0], model.bias.detach()])
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            torch.cat([opt.step_sizes(model.weight)[0], opt.step_sizes(model.bias)]), a)
    assert clipped, "the positive-part clip of the h update was not exercised"


def test_autostep_step_never_overshoots_one_example():
    """After its normalisation, Autostep's step moves the prediction on the same example by at
    most the full error: sum_i alpha_i x_i^2 <= 1."""
    torch.manual_seed(0)
    model = nn.Linear(5, 2).double()
    opt = Autostep(model.parameters(), lr=1.0)  # deliberately far too large
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = 3 * torch.randn(1, 5, generator=g, dtype=torch.float64)
        y = torch.randn(1, 2, generator=g, dtype=torch.float64)
        with torch.no_grad():
            err_before = (y - model(x)).abs()
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).sum(-1).mean()).backward()
        opt.step(inputs=x)
        with torch.no_grad():
            err_after = (y - model(x)).abs()
        assert (err_after <= err_before + 1e-12).all()
        aw, ab = opt.step_sizes(model.weight), opt.step_sizes(model.bias)
        assert ((aw * x ** 2).sum(-1) + ab <= 1 + 1e-12).all()


@pytest.mark.parametrize("cls,kw", [(IDBD, dict(lr=0.05, meta_lr=0.05)),
                                    (Autostep, dict(lr=0.05, meta_lr=0.05))])
def test_state_dict_round_trip(cls, kw):
    torch.manual_seed(0)
    m1 = nn.Linear(4, 2).double()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(8, 4, generator=g, dtype=torch.float64),
             torch.randn(8, 2, generator=g, dtype=torch.float64)) for _ in range(7)]

    def step(model, opt, x, y):
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).sum(-1).mean()).backward()
        opt.step(inputs=x)

    o1 = cls(m1.parameters(), **kw)
    for x, y in data[:3]:
        step(m1, o1, x, y)
    buf = io.BytesIO()
    torch.save(o1.state_dict(), buf)
    buf.seek(0)
    m2 = copy.deepcopy(m1)
    o2 = cls(m2.parameters(), **kw)
    o2.load_state_dict(torch.load(buf, weights_only=True))
    for x, y in data[3:]:
        step(m1, o1, x, y)
        step(m2, o2, x, y)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_invalid_arguments_name_the_argument():
    ps = lambda: nn.Linear(3, 1).parameters()  # noqa: E731
    for make, arg in [(lambda: IDBD(ps(), lr=0.0), "lr"), (lambda: IDBD(ps(), meta_lr=-1), "meta_lr"),
                      (lambda: Autostep(ps(), lr=-1.0), "lr"),
                      (lambda: Autostep(ps(), meta_lr=-1.0), "meta_lr"),
                      (lambda: Autostep(ps(), tau=0.5), "tau")]:
        with pytest.raises(ValueError, match=rf"Invalid {arg}\b"):
            make()
    with pytest.raises(ValueError, match="linear layer"):
        IDBD(nn.Conv2d(1, 1, 3).parameters())
    model = nn.Linear(3, 1)
    opt = IDBD(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    with pytest.raises(ValueError, match="inputs"):
        opt.step()
    with pytest.raises(ValueError, match="features"):
        opt.step(inputs=torch.randn(2, 4))
