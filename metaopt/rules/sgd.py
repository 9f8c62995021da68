"""SGD (with momentum, dampening, Nesterov, L2 weight decay) as a rule; learnable ``log_lr``.

Matches ``torch.optim.SGD`` update for update:
    g <- g + wd * p;  b <- g (first step) | mu * b + (1 - dampening) * g;
    d <- g + mu * b (nesterov) | b;   p <- p - lr * d
State: ``step`` (scalar), ``buf`` [N] (momentum buffer, flat view). Built from the shared
pieces of :mod:`metaopt.rules.compose` (a momentum direction, a learned rate).

``step_`` is the in-place no-grad fast path (see :mod:`metaopt.rules.base`): per-tensor
(``torch._foreach_*``) ops on the gradients and on views of the flat momentum buffer.
"""
from __future__ import annotations

import torch

from metaopt.rules.base import add_scaled_, default_scales, flat_views, register_rule
from metaopt.rules.compose import Chain, LearnedLR, Momentum


@register_rule
class SGD(Chain):
    """``torch.optim.SGD`` as a rule (momentum, dampening, Nesterov, L2 weight decay), with
    a learnable ``log_lr``."""
    name = "sgd"

    def __init__(self, lr: float = 0.1, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"Invalid lr: {lr}")
        if momentum < 0:
            raise ValueError(f"Invalid momentum: {momentum}")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Invalid nesterov: needs momentum > 0 and dampening = 0")
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.nesterov, self.weight_decay = nesterov, weight_decay
        self.direction = Momentum(momentum, dampening, nesterov, keep_buffer=True)
        self.scale, self.l2 = LearnedLR(lr), weight_decay

    def config(self):
        return dict(lr=self.lr, momentum=self.momentum, dampening=self.dampening,
                    nesterov=self.nesterov, weight_decay=self.weight_decay)

    @torch.no_grad()
    def step_(self, theta, params, grads, state, spec, ctx=None, scales=None):
        scales = default_scales(scales, len(params))
        params, grads = list(params), list(grads)
        buf = state["buf"]
        lr = float(torch.exp(theta["log_lr"]).to(buf.dtype))
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        d = grads
        if self.momentum:
            b = flat_views(buf, spec)
            if float(state["step"]) == 0:
                torch._foreach_copy_(b, grads)
            else:
                torch._foreach_mul_(b, self.momentum)
                torch._foreach_add_(b, grads, alpha=1 - self.dampening)
            d = torch._foreach_add(grads, b, alpha=self.momentum) if self.nesterov else b
        add_scaled_(params, d, -lr, scales)
        return {"step": state["step"] + 1, "buf": buf}
