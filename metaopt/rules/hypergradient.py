r"""Hypergradient descent (Baydin et al. 2018) as rules: ``sgd_hd`` and ``adam_hd``.

The learning rate adapts online, :math:`\alpha_t = \alpha_{t-1} + \beta\, g_t \cdot u_{t-1}`
(:math:`u_{t-1}` the previous step's descent direction, :math:`u_0 = 0`), and the step is
:math:`-\alpha_t u_t`; see :mod:`metaopt.optim.hypergradient` for the derivation. Here the
initial rate and the hypergradient rate are meta-parameters, so meta-training can learn them:

theta: ``log_lr0`` (scalar, :math:`\log\alpha_0`), ``log_beta`` (scalar, :math:`\log\beta`).
state: ``lr`` (scalar, the adapted :math:`\alpha_{t}`; read only after the first step, which
uses :math:`\exp(\text{log\_lr0})`), ``step``, and the direction / moments over the flat
parameter vector (``dir`` and ``buf`` for sgd_hd; ``m``, ``v`` for adam_hd).

One learning rate covers all parameters (one parameter group). Both rules match
:class:`metaopt.optim.SGDHD` / :class:`metaopt.optim.AdamHD` step for step.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from metaopt.rules.base import Rule, register_rule
from metaopt.types import FlatSpec, safe_sqrt


def _check(lr0, beta):
    if not isinstance(lr0, (int, float)) or not lr0 > 0:
        raise ValueError(f"Invalid lr0: {lr0} (expected lr0 > 0; it is learned as a log)")
    if not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"Invalid beta: {beta} (expected beta > 0; it is learned as a log)")


def _hd_theta(lr0, beta):
    return {"log_lr0": torch.tensor(math.log(lr0)), "log_beta": torch.tensor(math.log(beta))}


def _adapted_lr(theta, state, h, dtype):
    lr_prev = torch.where(state["step"] == 0, torch.exp(theta["log_lr0"]).to(dtype),
                          state["lr"].to(dtype))
    return lr_prev + torch.exp(theta["log_beta"]).to(dtype) * h


@register_rule
class SGDHDRule(Rule):
    """SGD-HD (``momentum > 0``: SGD with heavy-ball momentum, direction = momentum buffer)."""

    name = "sgd_hd"

    def __init__(self, lr0: float = 1e-3, beta: float = 1e-3, momentum: float = 0.0):
        _check(lr0, beta)
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}")
        self.lr0, self.beta, self.momentum = float(lr0), float(beta), float(momentum)

    def config(self):
        return dict(lr0=self.lr0, beta=self.beta, momentum=self.momentum)

    def init_theta(self, spec: FlatSpec, generator: Optional[torch.Generator] = None):
        return _hd_theta(self.lr0, self.beta)

    def init(self, params):
        p = FlatSpec.of(params).flatten(params)
        state = {"step": p.new_zeros(()), "lr": p.new_zeros(()), "dir": torch.zeros_like(p)}
        if self.momentum:
            state["buf"] = torch.zeros_like(p)
        return state

    def update(self, theta, grads, state, params, ctx=None):
        spec = FlatSpec.of(params)
        g = spec.flatten(grads)
        lr = _adapted_lr(theta, state, (g * state["dir"]).sum(-1), g.dtype)
        new = {"step": state["step"] + 1, "lr": lr}
        if self.momentum:
            buf = torch.where(state["step"] == 0, g, self.momentum * state["buf"] + g)
            d = new["buf"] = buf
        else:
            d = g
        new["dir"] = d
        return spec.unflatten(-lr * d), new


@register_rule
class AdamHDRule(Rule):
    """Adam-HD: Adam (epsilon after bias correction, as torch) with a hypergradient-adapted rate."""

    name = "adam_hd"

    def __init__(self, lr0: float = 1e-3, beta: float = 1e-7, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8):
        _check(lr0, beta)
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta1: {beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta2: {beta2}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid eps: {eps}")
        self.lr0, self.beta = float(lr0), float(beta)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)

    def config(self):
        return dict(lr0=self.lr0, beta=self.beta, beta1=self.beta1, beta2=self.beta2,
                    eps=self.eps)

    def init_theta(self, spec: FlatSpec, generator: Optional[torch.Generator] = None):
        return _hd_theta(self.lr0, self.beta)

    def _direction(self, m, v, t):
        return (m / (1 - self.beta1 ** t)) / (safe_sqrt(v / (1 - self.beta2 ** t)) + self.eps)

    def init(self, params):
        p = FlatSpec.of(params).flatten(params)
        return {"step": p.new_zeros(()), "lr": p.new_zeros(()), "m": torch.zeros_like(p),
                "v": torch.zeros_like(p)}

    def update(self, theta, grads, state, params, ctx=None):
        spec = FlatSpec.of(params)
        g = spec.flatten(grads)
        step = state["step"].to(g.dtype)
        # previous direction u_{t-1} from the stored moments; m = 0 at step 0 gives u_0 = 0
        # (the counter is clamped to 1 only to keep the bias corrections finite there)
        u_prev = self._direction(state["m"], state["v"], torch.clamp(step, min=1.0))
        lr = _adapted_lr(theta, state, (g * u_prev).sum(-1), g.dtype)
        m = self.beta1 * state["m"] + (1 - self.beta1) * g
        v = self.beta2 * state["v"] + (1 - self.beta2) * g * g
        d = self._direction(m, v, step + 1)
        return spec.unflatten(-lr * d), {"step": state["step"] + 1, "lr": lr, "m": m, "v": v}
