"""Per-layer activation statistics for activation-aware rules.

A bottom-level module (beside :mod:`metaopt.types`) so that both ``tasks/`` (inside the
differentiable unroll) and ``optim/`` (on a user's live model in
:class:`metaopt.optim.LearnedOptimizer`) can record the same features without importing each other.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

__all__ = ["STAT_LAYERS", "NUM_ACT_FEATURES", "ActivationRecorder"]

# Layers whose weights get activation statistics (input RMS, output RMS) for activation-aware rules.
STAT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
NUM_ACT_FEATURES = 2


def _log_rms(t: Tensor) -> Tensor:
    return 0.5 * torch.log(t.pow(2).mean() + 1e-12)


class _StatHook:
    """Forward hook writing one layer's statistics into a recorder (a class, not a closure, so a
    model with hooks attached can still be pickled)."""

    def __init__(self, recorder: "ActivationRecorder", prefix: str, pnames):
        self.recorder, self.prefix, self.pnames = recorder, prefix, tuple(pnames)

    def __call__(self, mod, inputs, output):
        x = inputs[0]
        xin = _log_rms(x) if x.is_floating_point() else output.new_zeros(())
        feats = torch.stack([xin, _log_rms(output)])
        for p in self.pnames:
            self.recorder.stats[self.prefix + p] = feats


class ActivationRecorder:
    """Forward hooks that record, for each layer in ``STAT_LAYERS``, the log-RMS of its input and
    output, keyed by the names of that layer's parameters. Works under functional_call and vmap
    (the recorded values are batched like everything else) and on plain modules (used by
    LearnedOptimizer on a user's model)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.stats: Dict[str, Tensor] = {}
        self._handles = []

    def _hook(self, prefix: str, pnames):
        return _StatHook(self, prefix, pnames)

    def __getstate__(self):
        # copies (deepcopy/pickle of a model with hooks attached) start with no recorded stats:
        # the recorded tensors are part of the last forward's autograd graph
        return {**self.__dict__, "stats": {}, "_handles": []}

    def __enter__(self):
        self.stats = {}
        for name, mod in self.module.named_modules():
            if isinstance(mod, STAT_LAYERS):
                prefix = f"{name}." if name else ""
                pnames = [n for n, _ in mod.named_parameters(recurse=False)]
                self._handles.append(mod.register_forward_hook(self._hook(prefix, pnames)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
