"""Adam (L2 weight decay as in ``torch.optim.Adam``) as a rule; learnable ``log_lr``.

    m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
    p <- p - lr / (1-b1^t) * m / (sqrt(v) / sqrt(1-b2^t) + eps)
(epsilon outside the square root, after bias correction -- torch's placement, which differs
from higher's Adam.) State: ``step``, ``m`` [N], ``v`` [N]. Built from the shared pieces of
:mod:`metaopt.rules.compose` (Adam's direction, a learned rate).

``step_`` is the in-place no-grad fast path (see :mod:`metaopt.rules.base`) that
:class:`metaopt.optim.LearnedOptimizer` uses: like ``torch.optim.Adam(foreach=True)`` it
updates the moments (per-tensor views of the flat state) and the parameters in place, without
concatenating anything.
"""
from __future__ import annotations

import math

import torch

from metaopt.rules.base import default_scales, flat_views, register_rule
from metaopt.rules.compose import AdamDirection, Chain, LearnedLR


@register_rule
class Adam(Chain):
    """``torch.optim.Adam`` as a rule (torch's epsilon placement, L2 weight decay), with a
    learnable ``log_lr``."""
    name = "adam"

    def __init__(self, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"Invalid lr: {lr}")
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta1: {beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta2: {beta2}")
        if eps < 0:
            raise ValueError(f"Invalid eps: {eps}")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        self.lr, self.beta1, self.beta2, self.eps, self.weight_decay = lr, beta1, beta2, eps, weight_decay
        self.direction, self.scale, self.l2 = AdamDirection(beta1, beta2, eps), LearnedLR(lr), weight_decay

    def config(self):
        return dict(lr=self.lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                    weight_decay=self.weight_decay)

    @torch.no_grad()
    def step_(self, theta, params, grads, state, spec, ctx=None, scales=None):
        scales = default_scales(scales, len(params))
        params, grads = list(params), list(grads)
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        step = state["step"] + 1
        t = float(step)
        m, v = state["m"], state["v"]
        # moments on per-tensor views of the flat state: the gradients are never concatenated
        m_views, v_views = flat_views(m, spec), flat_views(v, spec)
        torch._foreach_lerp_(m_views, grads, 1 - self.beta1)
        torch._foreach_mul_(v_views, self.beta2)
        torch._foreach_addcmul_(v_views, grads, grads, value=1 - self.beta2)
        bc1, bc2 = 1 - self.beta1 ** t, 1 - self.beta2 ** t
        denom = v.sqrt().div_(math.sqrt(bc2)).add_(self.eps)
        # the same rounding of lr as ``update`` (theta may be float32 while params are float64)
        lr = float(torch.exp(theta["log_lr"]).to(v.dtype))
        torch._foreach_addcdiv_(params, m_views, flat_views(denom, spec),
                                [-lr / bc1 * s for s in scales])
        return {"step": step, "m": m, "v": v}
