"""Per-coordinate and per-tensor input features for learned rules (all on the flat view).

Following learned_optimization's MLP optimizers: momenta at several decays, a second-moment
estimate, Adam-like normalized quantities, time features ``tanh(t / tau)``, every per-coordinate
feature divided by its RMS over the tensor it belongs to (so the rule sees scale-free inputs).
Activation- and loss-aware features are optional extras:

* ``act``: per-layer log-RMS of the layer's input and output activations (from
  :class:`metaopt.activations.ActivationRecorder`), broadcast to that layer's weights -- the
  activations set how fast the weights flow;
* ``surprise``: ``(loss - running_mean) / running_std`` of the batch loss, clipped, so a rule can
  take larger steps on surprising batches.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from metaopt.activations import NUM_ACT_FEATURES
from metaopt.rules.layout import GLOBAL
from metaopt.types import FlatSpec, State, segment_mean

#: the layout of :func:`init_surprise_state`'s entries (for a rule's ``state_layout``)
SURPRISE_LAYOUT = {"loss_mean": GLOBAL, "loss_var": GLOBAL}


def normalize_per_tensor(x: Tensor, seg: Tensor, num_tensors: int, eps: float = 1e-8) -> Tensor:
    """Divide each column of ``x`` [N, F] by its RMS within each tensor's segment."""
    ms = segment_mean(x.transpose(0, 1) ** 2, seg, num_tensors)  # [F, T]
    return x * torch.rsqrt(ms + eps).transpose(0, 1)[seg]


def time_features(step: Tensor, taus: Sequence[float]) -> Tensor:
    t = torch.as_tensor(taus, dtype=step.dtype, device=step.device)
    return torch.tanh(step / t)


def act_features(spec: FlatSpec, ctx: Optional[Mapping], dtype, device) -> Tensor:
    """[num_tensors, NUM_ACT_FEATURES]; zeros for tensors without recorded statistics."""
    act = (ctx or {}).get("act") or {}
    rows = []
    for n in spec.names:
        v = act.get(n)
        rows.append(v.to(dtype) if v is not None else torch.zeros(NUM_ACT_FEATURES, dtype=dtype, device=device))
    return torch.stack(rows)


def require_loss(ctx: Optional[Mapping], rule_name: str) -> Tensor:
    if not ctx or ctx.get("loss") is None:
        raise ValueError(f"rule {rule_name!r} was built with loss_features=True: pass ctx['loss'] "
                         "(LearnedOptimizer.step needs a closure that returns the loss)")
    return ctx["loss"]


def loss_surprise(state: State, loss: Tensor, decay: float = 0.9, clip: float = 5.0):
    """Returns (surprise, new_mean, new_var). At the first step the surprise is 0."""
    loss = loss.to(state["loss_mean"].dtype)
    first = state["step"] == 0
    mean = torch.where(first, loss, state["loss_mean"])
    var = state["loss_var"]
    s = (loss - mean) * torch.rsqrt(var + 1e-8 * (1 + mean ** 2))
    s = torch.where(first, torch.zeros_like(s), s.clamp(-clip, clip))
    delta = loss - mean
    new_mean = mean + (1 - decay) * delta
    new_var = decay * (var + (1 - decay) * delta ** 2)
    return s, new_mean, new_var


def init_surprise_state(like: Tensor) -> State:
    return {"loss_mean": like.new_zeros(()), "loss_var": like.new_zeros(())}
