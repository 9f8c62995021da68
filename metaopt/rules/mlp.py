"""A learned per-coordinate MLP update rule (learned_optimization's MLP LOpt, in PyTorch).

Inputs per coordinate (flat view of all parameters): parameter, gradient, momenta at several
decays, RMS (sqrt of a 0.999 second moment), gradient and momenta divided by that RMS, a
"vector parameter" flag; each per-coordinate feature is normalized by its RMS over its tensor.
Global inputs: time features ``tanh(t / tau)``; optionally per-layer activation statistics and
the loss surprise (see :mod:`metaopt.rules.features`).

Output: ``step = direction * exp(magnitude * 1e-3) * 1e-3 * exp(log_scale)``, ``p <- p - step``.
The 1e-3 multipliers keep an untrained rule's steps tiny and stable; ``log_scale`` (a learned
scalar, 0 at init so the fresh rule is exactly the formula above) lets meta-training move the
overall step size in log space instead of growing every output weight.
"""
from __future__ import annotations

from typing import Sequence

import math

import torch

from metaopt.rules.base import Rule, register_rule
from metaopt.rules.features import (NUM_ACT, act_features, init_surprise_state, loss_surprise,
                                    normalize_per_tensor, require_loss, time_features)
from metaopt.types import FlatSpec, safe_sqrt


@register_rule
class MLPRule(Rule):
    name = "mlp"

    def __init__(self, hidden_size: int = 32, num_layers: int = 2,
                 decays: Sequence[float] = (0.5, 0.9, 0.99, 0.999), rms_decay: float = 0.999,
                 time_taus: Sequence[float] = (1, 3, 10, 30, 100, 300, 1000, 3000),
                 act_features: bool = False, loss_features: bool = False,
                 step_mult: float = 1e-3, exp_mult: float = 1e-3):
        if hidden_size < 1:
            raise ValueError(f"Invalid hidden_size: {hidden_size}")
        if num_layers < 1:
            raise ValueError(f"Invalid num_layers: {num_layers}")
        if len(decays) < 3 or not all(0 < d < 1 for d in decays):
            raise ValueError(f"Invalid decays: {list(decays)} (need >= 3 values in (0, 1))")
        if not 0 < rms_decay < 1:
            raise ValueError(f"Invalid rms_decay: {rms_decay}")
        self.hidden_size, self.num_layers = int(hidden_size), int(num_layers)
        self.decays, self.rms_decay = tuple(float(d) for d in decays), float(rms_decay)
        self.time_taus = tuple(float(t) for t in time_taus)
        self.act_features, self.loss_features = bool(act_features), bool(loss_features)
        self.needs_activations, self.needs_loss = self.act_features, self.loss_features
        self.step_mult, self.exp_mult = float(step_mult), float(exp_mult)

    def config(self):
        return dict(hidden_size=self.hidden_size, num_layers=self.num_layers,
                    decays=list(self.decays), rms_decay=self.rms_decay,
                    time_taus=list(self.time_taus), act_features=self.act_features,
                    loss_features=self.loss_features, step_mult=self.step_mult,
                    exp_mult=self.exp_mult)

    @property
    def num_inputs(self) -> int:
        k = len(self.decays)
        n = 2 + k + 1 + 1 + k + 1  # p, g, m_k, rms, g/rms, m_k/rms, vector flag
        n += len(self.time_taus)
        n += NUM_ACT if self.act_features else 0
        n += 1 if self.loss_features else 0
        return n

    def init_theta(self, spec=None, generator=None):
        sizes = [self.num_inputs] + [self.hidden_size] * self.num_layers + [2]
        theta = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            theta[f"w{i}"] = torch.randn(a, b, generator=generator) / math.sqrt(a)
            theta[f"b{i}"] = torch.zeros(b)
        theta["log_scale"] = torch.zeros(())
        return theta

    def init(self, params):
        p = FlatSpec.of(params).flatten(params)
        state = {"step": p.new_zeros(()), "m": p.new_zeros((len(self.decays),) + p.shape),
                 "v": torch.zeros_like(p)}
        if self.loss_features:
            state.update(init_surprise_state(p))
        return state

    def features(self, g, p, m, v, spec, step, ctx, state):
        seg = spec.segment_ids(g.device)
        rsq = torch.rsqrt(v + 1e-12)
        per_coord = torch.stack([p, g, *m, safe_sqrt(v), g * rsq, *(m * rsq)], dim=1)
        per_coord = normalize_per_tensor(per_coord, seg, spec.num_tensors)
        is_vec = torch.tensor([float(len(s) <= 1) for s in spec.shapes], dtype=g.dtype,
                              device=g.device)
        cols = [per_coord, is_vec[seg, None]]
        glob = [time_features(step, self.time_taus)]
        extra = {}
        if self.loss_features:
            s, mean, var = loss_surprise(state, require_loss(ctx, self.name))
            glob.append(s.reshape(1))
            extra.update(loss_mean=mean, loss_var=var)
        glob = torch.cat(glob).to(g.dtype)
        cols.append(glob.expand(g.shape[0], glob.shape[0]))
        if self.act_features:
            cols.append(act_features(spec, ctx, g.dtype, g.device)[seg])
        return torch.cat(cols, dim=1), extra

    def update(self, theta, grads, state, params, ctx=None):
        spec = FlatSpec.of(params)
        g, p = spec.flatten(grads), spec.flatten(params)
        decays = torch.tensor(self.decays, dtype=g.dtype, device=g.device)[:, None]
        m = decays * state["m"] + (1 - decays) * g
        v = self.rms_decay * state["v"] + (1 - self.rms_decay) * g * g
        x, extra = self.features(g, p, m, v, spec, state["step"].to(g.dtype), ctx, state)
        for i in range(self.num_layers + 1):
            x = x @ theta[f"w{i}"].to(g.dtype) + theta[f"b{i}"].to(g.dtype)
            if i < self.num_layers:
                x = torch.relu(x)
        direction, magnitude = x[:, 0], x[:, 1]
        step = direction * torch.exp(magnitude * self.exp_mult) * self.step_mult
        step = step * torch.exp(theta["log_scale"].to(g.dtype))
        new_state = {"step": state["step"] + 1, "m": m, "v": v, **extra}
        return spec.unflatten(-step), new_state
