"""Tiny tasks for engine tests (independent of the bundled-data families), and the skip for
tests that need an optional extra."""
import pytest
import torch
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
