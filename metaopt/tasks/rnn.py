"""A character-level GRU language model (an architecture the transformer family does not cover).

``GRULMTask(data, vocab_size, hidden=64)`` on any :class:`SequenceDataset`; the loss is the mean
next-character cross entropy. The GRU is written out with ``nn.Linear`` gates (not ``nn.GRU``)
so it runs under ``functional_call`` and ``torch.func`` like every other task.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.tasks.base import SequenceDataset, Task
from metaopt.tasks.data import resolve_dtype


class GRULM(nn.Module):
    def __init__(self, vocab_size: int, embed: int = 32, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.inp = nn.Linear(embed, 3 * hidden)
        self.rec = nn.Linear(hidden, 3 * hidden, bias=False)
        self.head = nn.Linear(hidden, vocab_size)
        self.hidden = hidden

    def logits(self, x: Tensor) -> Tensor:
        e = self.inp(self.embed(x))                    # [B, L, 3H]
        h = e.new_zeros(x.shape[0], self.hidden)
        outs = []
        for t in range(x.shape[1]):
            xr, xz, xn = e[:, t].chunk(3, -1)
            hr, hz, hn = self.rec(h).chunk(3, -1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h = (1 - z) * n + z * h
            outs.append(h)
        return self.head(torch.stack(outs, 1))

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        out = self.logits(x)
        if y is None:
            return out
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class GRULMTask(Task):
    """A character-level GRU language model (gates written with ``nn.Linear``) on a
    :class:`SequenceDataset`."""
    def __init__(self, data: SequenceDataset, vocab_size: int, embed: int = 32, hidden: int = 64,
                 batch_size: int = 16, init_scale: float = 1.0, name: str = "char_gru", dtype=None):
        if hidden < 1 or embed < 1:
            raise ValueError(f"Invalid hidden/embed: {hidden}, {embed}")
        module = GRULM(vocab_size, embed, hidden).to(resolve_dtype(dtype or torch.float32))
        super().__init__(name, module, data=data, batch_size=batch_size, init_scale=init_scale,
                         structure=("gru", vocab_size, embed, hidden, batch_size))
