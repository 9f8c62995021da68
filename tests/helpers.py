"""Tiny tasks for engine tests (independent of the bundled-data families), and the skip for
tests that need an optional extra."""
import pytest
import torch
from torch.func import grad
from torch import nn
import torch.nn.functional as F

from metaopt.tasks.base import ArrayDataset, Task, TaskFamily


class TinyClassifier(nn.Module):
    def __init__(self, d_in=5, hidden=6, n_cls=3, act=torch.tanh):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, n_cls)
        self.act = act

    def forward(self, x, y):
        return F.cross_entropy(self.fc2(self.act(self.fc1(x))), y)


def tiny_data(seed=0, n=120, d_in=5, n_cls=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, n_cls, generator=g, dtype=dtype)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    y = (x @ w + 0.5 * torch.randn(n, n_cls, generator=g, dtype=dtype)).argmax(1)
    return ArrayDataset(x, y, seed=seed)


class TinyFamily(TaskFamily):
    """Same architecture, different data per seed (vmappable)."""
    name = "tiny"

    def __init__(self, dtype=torch.float64, hidden=6, batch_size=16, hiddens=None):
        self.dtype, self.hidden, self.batch_size, self.hiddens = dtype, hidden, batch_size, hiddens

    def sample(self, generator):
        seed = int(torch.randint(0, 1000, (1,), generator=generator))
        hidden = self.hidden if self.hiddens is None else self.hiddens[seed % len(self.hiddens)]
        module = TinyClassifier(hidden=hidden).to(self.dtype)
        return Task("tiny", module, tiny_data(seed, dtype=self.dtype), batch_size=self.batch_size,
                    structure=(hidden,))


def needs_extra_for(scheme_name: str) -> None:
    """Skip the calling test when ``scheme_name`` needs an optional extra that is not installed
    (the continuous scheme: torchdiffeq, the ``ode`` extra; CI installs every extra)."""
    if scheme_name == "continuous":
        pytest.importorskip("torchdiffeq", reason="the continuous scheme needs the ode extra "
                                                  "(pip install -e '.[ode]')")


def controller_theta(rule, spec, seed=1, dtype=torch.float64, out_scale=0.5):
    """The rule's theta in ``dtype`` with a random (non-trivial) controller output layer (a
    fresh theta's is zero)."""
    g = torch.Generator().manual_seed(seed)
    th = {k: v.to(dtype) for k, v in rule.init_theta(spec, g).items()}
    # a non-trivial controller (the fresh rule's output layer is zero)
    th["w1"] = out_scale * torch.randn(th["w1"].shape, generator=g, dtype=dtype)
    th["b1"] = out_scale * torch.randn(th["b1"].shape, generator=g, dtype=dtype)
    return th


def unroll_log_loss(rule, task, theta, steps=6, seed=0):
    """Mean log training loss after each of ``steps`` inner updates (train_log_mean)."""
    gen = torch.Generator().manual_seed(seed)
    params = task.init_params(gen)
    state = rule.init(params)
    batches = [task.sample_batch("train", gen) for _ in range(steps)]
    total = 0.0
    for b in batches:
        g = grad(lambda p: task.loss(p, b))(params)
        upd, state = rule.update(theta, g, state, params)
        params = {k: params[k] + upd[k] for k in params}
        total = total + torch.log(task.loss(params, b))
    return total / steps
