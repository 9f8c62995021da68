"""Small models around the fast-weight layers for the two memory tasks of
:mod:`metaopt.tasks.retrieval`, with LSTM / plain-RNN baselines of the same hidden size."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.fastweights.layers import FastWeightProgrammer, FastWeightRNN
from metaopt.tasks.retrieval import RETRIEVAL_VOCAB

CORES = ("fastweights", "lstm", "rnn", "fwp")


class RetrievalModel(nn.Module):
    """Embedding -> recurrent core (hidden ``R``) -> last state -> ReLU layer -> 10 digits
    (Ba et al.'s set-up). ``core``: ``fastweights`` (FastWeightRNN), ``lstm``, ``rnn``
    (tanh), or ``fwp`` (a FastWeightProgrammer with ``rule``, keys/values of size ``R``)."""

    def __init__(self, core: str = "fastweights", hidden: int = 20, embed: int = 100,
                 readout: int = 100, **core_kwargs):
        super().__init__()
        if core not in CORES:
            raise ValueError(f"Unknown core: {core!r} (known: {', '.join(CORES)})")
        self.core_name = core
        self.embed = nn.Embedding(len(RETRIEVAL_VOCAB), embed)
        if core == "fastweights":
            self.core = FastWeightRNN(embed, hidden, **core_kwargs)
        elif core == "lstm":
            self.core = nn.LSTM(embed, hidden, batch_first=True)
        elif core == "rnn":
            self.core = nn.RNN(embed, hidden, batch_first=True)
        else:
            self.core = FastWeightProgrammer(embed, d_key=hidden, d_value=hidden,
                                             output_size=hidden, **core_kwargs)
        self.head = nn.Sequential(nn.Linear(hidden, readout), nn.ReLU(), nn.Linear(readout, 10))

    def forward(self, x: Tensor) -> Tensor:
        h = self.core(self.embed(x))
        if isinstance(h, tuple):  # nn.LSTM / nn.RNN
            h = h[0]
        return self.head(h[:, -1])


class CapacityModel(nn.Module):
    """Schlag et al.'s capacity probe: every key id has a learned embedding (``d_key``), keys
    and queries share one projection and feature map, values are the given one-hot vectors;
    the rule writes all pairs, then the final fast matrix is read with each query."""

    def __init__(self, num_keys: int, rule: str = "delta", d_key: int = 64, d_value: int = 8,
                 feature_map: str = "dpfp", dpfp_nu: int = 1, normalize: str = "l2",
                 mode: str = "recurrent", chunk_size: int = 64, **rule_kwargs):
        super().__init__()
        if num_keys < 1:
            raise ValueError(f"Invalid num_keys: {num_keys}")
        self.embed = nn.Embedding(num_keys, d_key)
        self.fwp = FastWeightProgrammer(d_key, d_key=d_key, d_value=d_value, rule=rule,
                                        feature_map=feature_map, dpfp_nu=dpfp_nu,
                                        normalize=normalize, mode=mode, chunk_size=chunk_size,
                                        **rule_kwargs)

    def keys(self, ids: Tensor) -> Tensor:
        return self.fwp.keys(self.embed(ids))

    def forward(self, batch: Dict[str, Tensor]) -> Tensor:
        """Retrieved values ``(B, N, d_value)``."""
        W = self.fwp.write(self.embed(batch["write_keys"]), batch["write_values"])
        return self.fwp.read(W, self.keys(batch["query_keys"]))

    def loss(self, batch: Dict[str, Tensor]) -> Tensor:
        return F.mse_loss(self(batch), batch["targets"])
