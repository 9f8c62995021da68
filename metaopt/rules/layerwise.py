"""Learned per-layer, per-step learning rates (MAML++ "LSLR") and per-parameter rates (Meta-SGD).

``LayerwiseLR``: theta["log_lr"] has shape [num_steps, num_tensors]; at inner step t the rule
uses row ``min(t, num_steps - 1)`` -- the learned schedule users inspect
(:func:`metaopt.viz.plot_lr_schedule`). The direction is the raw gradient (``direction="sgd"``)
or Adam's normalized one (``"adam"``). Optional activation/loss awareness multiplies each
layer's rate by ``exp(w_act . act_l + w_loss * surprise)`` (both weights start at 0, so a fresh
rule is a plain schedule).

``PerParameterLR``: theta["log_lr"] is one log learning rate per coordinate (flat [N]).
Both are spec-dependent: a trained theta fits models with the same parameter names and shapes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from metaopt.activations import NUM_ACT_FEATURES
from metaopt.rules.base import Rule, register_rule
from metaopt.rules.compose import AdamDirection
from metaopt.rules.features import (SURPRISE_LAYOUT, act_features, init_surprise_state,
                                    loss_surprise, require_loss)
from metaopt.rules.layout import COORD, GLOBAL, TENSOR
from metaopt.types import FlatSpec


@register_rule
class LayerwiseLR(Rule):
    """Learned per-layer, per-step learning rates (MAML++ LSLR): ``theta['log_lr']`` is
    [num_steps, num_tensors]."""
    name = "layerwise_lr"
    spec_dependent = True
    state_layout = {"step": GLOBAL, **AdamDirection.state_layout, **SURPRISE_LAYOUT}
    theta_layout = {"log_lr": TENSOR, "w_act": GLOBAL, "w_loss": GLOBAL}

    def __init__(self, lr: float = 0.01, num_steps: int = 20, direction: str = "sgd",
                 act_features: bool = False, loss_features: bool = False,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"Invalid lr: {lr}")
        if num_steps < 1:
            raise ValueError(f"Invalid num_steps: {num_steps}")
        if direction not in ("sgd", "adam"):
            raise ValueError(f"Invalid direction: {direction!r} (use 'sgd' or 'adam')")
        self.lr, self.num_steps, self.direction = lr, int(num_steps), direction
        self.act_features, self.loss_features = bool(act_features), bool(loss_features)
        self.needs_activations, self.needs_loss = self.act_features, self.loss_features
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.adam = AdamDirection(beta1, beta2, eps) if direction == "adam" else None

    def config(self):
        return dict(lr=self.lr, num_steps=self.num_steps, direction=self.direction,
                    act_features=self.act_features, loss_features=self.loss_features,
                    beta1=self.beta1, beta2=self.beta2, eps=self.eps)

    def init_theta(self, spec, generator=None):
        theta = {"log_lr": torch.full((self.num_steps, spec.num_tensors), math.log(self.lr))}
        if self.act_features:
            theta["w_act"] = torch.zeros(NUM_ACT_FEATURES)
        if self.loss_features:
            theta["w_loss"] = torch.zeros(())
        return theta

    def init(self, params):
        p = FlatSpec.of(params).flatten(params)
        state = {"step": p.new_zeros(())}
        if self.adam is not None:
            state.update(self.adam.init(p))
        if self.loss_features:
            state.update(init_surprise_state(p))
        return state

    def layer_log_lr(self, theta, step):
        """[num_tensors] log rates at (float tensor) ``step``; one-hot select works under vmap."""
        idx = step.clamp(max=self.num_steps - 1).long()
        onehot = F.one_hot(idx, self.num_steps).to(theta["log_lr"].dtype)
        return onehot @ theta["log_lr"]

    def update(self, theta, grads, state, params, ctx=None):
        spec = FlatSpec.of(params)
        if self.direction == "sgd" and not self.act_features and not self.loss_features and grads:
            # plain per-layer SGD: scale each gradient tensor, no flatten / gather / unflatten
            some = next(iter(grads.values()))
            lr = torch.exp(self.layer_log_lr(theta, state["step"]).to(some.dtype))
            return ({n: -lr[i] * grads[n] for i, n in enumerate(spec.names)},
                    {"step": state["step"] + 1})
        g = spec.flatten(grads)
        new_state = {"step": state["step"] + 1}
        log_lr = self.layer_log_lr(theta, state["step"]).to(g.dtype)
        if self.act_features:
            log_lr = log_lr + act_features(spec, ctx, g.dtype, g.device) @ theta["w_act"].to(g.dtype)
        if self.loss_features:
            s, mean, var = loss_surprise(state, require_loss(ctx, self.name))
            log_lr = log_lr + theta["w_loss"].to(g.dtype) * s
            new_state.update(loss_mean=mean, loss_var=var)
        if self.adam is not None:
            d, moments = self.adam(g, state, new_state["step"].to(g.dtype))
            new_state.update(moments)
        else:
            d = g
        lr = torch.exp(log_lr)[spec.segment_ids(g.device)]
        return spec.unflatten(-lr * d), new_state


@register_rule
class PerParameterLR(Rule):
    """Learned per-coordinate learning rates (Meta-SGD): ``theta['log_lr']`` is one log rate
    per coordinate."""
    name = "per_param_lr"
    spec_dependent = True
    state_layout = {"step": GLOBAL}
    theta_layout = {"log_lr": COORD}

    def __init__(self, lr: float = 0.01):
        if lr <= 0:
            raise ValueError(f"Invalid lr: {lr}")
        self.lr = lr

    def config(self):
        return dict(lr=self.lr)

    def init_theta(self, spec, generator=None):
        return {"log_lr": torch.full((spec.numel,), math.log(self.lr))}

    def init(self, params):
        p = FlatSpec.of(params).flatten(params)
        return {"step": p.new_zeros(())}

    def update(self, theta, grads, state, params, ctx=None):
        spec = FlatSpec.of(params)
        g = spec.flatten(grads)
        return spec.unflatten(-torch.exp(theta["log_lr"]).to(g.dtype) * g), {"step": state["step"] + 1}
