"""Rules from shared pieces: a direction transform joined to a learned scale (optax's ``chain``).

    update = -scale(theta, g, state) * direction(g, state)          on the flat view

* A :class:`Direction` turns the flat gradient into a step direction and keeps its own state
  (momentum buffer, Adam's moments); it has no meta-parameters. :class:`Gradient`,
  :class:`Momentum` (torch.optim.SGD's buffer) and :class:`AdamDirection` are provided.
* A :class:`Scale` owns the meta-parameters and turns them (and, if it adapts online, its own
  state) into the step size: :class:`LearnedLR` (``exp(log_lr)``), :class:`HypergradientLR`
  (Baydin et al.'s online rate, which reads the direction's previous value).
* :class:`Chain` is a :class:`Rule` made of one of each: it owns the ``step`` counter, merges
  the pieces' states and their declared ``state_layout``. A rule on these pieces is its
  constructor (validation, ``config``) plus the two pieces; see ``adam``, ``sgd``, ``sgd_hd``.

Wrapper rules that run an inner rule (Lookahead) keep its theta and state under a key prefix
(flat dicts round-trip through safetensors); :func:`nest` / :func:`unnest` and
:func:`nest_layout` do that bookkeeping in one place.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from metaopt.rules.base import Rule
from metaopt.rules.layout import COORD, GLOBAL
from metaopt.types import FlatSpec, Params, State, safe_sqrt

__all__ = ["Direction", "Gradient", "Momentum", "AdamDirection", "adam_direction", "Scale",
           "LearnedLR", "HypergradientLR", "Chain", "nest", "unnest", "nest_layout"]


# -- directions -----------------------------------------------------------------------------------
class Direction:
    """A step direction from the flat gradient ``g`` [N]; ``t`` is the step number (>= 1) as a
    tensor of ``g``'s dtype. State keys are this piece's own (declared in ``state_layout``)."""
    state_layout: Mapping[str, str] = {}

    def init(self, p: Tensor) -> State:
        return {}

    def __call__(self, g: Tensor, state: State, t: Tensor) -> Tuple[Tensor, State]:
        raise NotImplementedError

    def previous(self, state: State, t: Tensor) -> Tensor:
        """The direction of the last step (zero before the first), from the state alone."""
        raise NotImplementedError(f"{type(self).__name__} does not keep its last direction")


class Gradient(Direction):
    """The raw gradient. ``remember=True`` keeps it as ``dir`` (for :meth:`previous`)."""

    def __init__(self, remember: bool = False):
        self.remember = remember
        self.state_layout = {"dir": COORD} if remember else {}

    def init(self, p):
        return {"dir": torch.zeros_like(p)} if self.remember else {}

    def __call__(self, g, state, t):
        return g, ({"dir": g} if self.remember else {})

    def previous(self, state, t):
        return state["dir"]


class Momentum(Direction):
    """``torch.optim.SGD``'s momentum buffer ``buf`` (the gradient itself at the first step):
    ``b <- mu b + (1 - dampening) g``; direction ``g + mu b`` (Nesterov) or ``b``. With
    ``momentum=0`` the direction is ``g`` and ``buf`` is kept unchanged (``keep_buffer``) or
    absent. ``remember=True`` also keeps the direction as ``dir``."""

    def __init__(self, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                 keep_buffer: bool = True, remember: bool = False):
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov
        self.has_buf = bool(momentum) or keep_buffer
        self.remember = remember
        self.state_layout = {**({"buf": COORD} if self.has_buf else {}),
                             **({"dir": COORD} if remember else {})}

    def init(self, p):
        return {k: torch.zeros_like(p) for k in self.state_layout}

    def __call__(self, g, state, t):
        new = {}
        if self.momentum:
            buf = torch.where(t == 1, g,
                              self.momentum * state["buf"] + (1 - self.dampening) * g)
            d = new["buf"] = buf
            if self.nesterov:
                d = g + self.momentum * buf
        else:
            d = g
            if self.has_buf:
                new["buf"] = state["buf"]
        if self.remember:
            new["dir"] = d
        return d, new

    def previous(self, state, t):
        return state["dir"]


def adam_direction(g, m, v, step, b1, b2, eps):
    """One Adam moment update on flat tensors. Returns (direction, m, v) with step = t (>= 1)
    (torch's placement of epsilon: after the bias correction, outside the square root)."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    bc1 = 1 - b1 ** step
    bc2 = 1 - b2 ** step
    d = (m / bc1) / (safe_sqrt(v) / torch.sqrt(bc2) + eps)
    return d, m, v


class AdamDirection(Direction):
    """Adam's bias-corrected direction, moments ``m``, ``v`` per coordinate."""
    state_layout = {"m": COORD, "v": COORD}

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    def init(self, p):
        return {"m": torch.zeros_like(p), "v": torch.zeros_like(p)}

    def __call__(self, g, state, t):
        d, m, v = adam_direction(g, state["m"], state["v"], t, self.beta1, self.beta2, self.eps)
        return d, {"m": m, "v": v}

    def previous(self, state, t):
        # t is this step's number; the last one was t - 1 (m = 0 before the first step gives a
        # zero direction; the counter is clamped to 1 only to keep the corrections finite)
        s = torch.clamp(t - 1, min=1.0)
        m, v = state["m"], state["v"]
        return (m / (1 - self.beta1 ** s)) / (safe_sqrt(v / (1 - self.beta2 ** s)) + self.eps)


# -- scales ---------------------------------------------------------------------------------------
class Scale:
    """The step size from theta (and this piece's own state): a tensor that broadcasts against
    the flat direction."""
    state_layout: Mapping[str, str] = {}

    def init_theta(self, spec: FlatSpec, generator: Optional[torch.Generator] = None) -> Params:
        raise NotImplementedError

    def init(self, p: Tensor) -> State:
        return {}

    def __call__(self, theta: Params, g: Tensor, state: State, t: Tensor,
                 direction: Direction) -> Tuple[Tensor, State]:
        raise NotImplementedError


class LearnedLR(Scale):
    """One learned rate, ``exp(log_lr)`` (unconstrained in log space)."""

    def __init__(self, lr: float):
        self.lr = lr

    def init_theta(self, spec, generator=None):
        import math
        return {"log_lr": torch.tensor(math.log(self.lr))}

    def __call__(self, theta, g, state, t, direction):
        return torch.exp(theta["log_lr"]).to(g.dtype), {}


class HypergradientLR(Scale):
    r"""Hypergradient descent's online rate (Baydin et al. 2018): ``lr_t = lr_{t-1} + beta g_t .
    u_{t-1}`` with ``u`` the direction's previous value; ``lr_0 = exp(log_lr0)`` and ``beta =
    exp(log_beta)`` are learned. State: ``lr`` (scalar, read after the first step)."""
    state_layout = {"lr": GLOBAL}

    def __init__(self, lr0: float, beta: float):
        self.lr0, self.beta = lr0, beta

    def init_theta(self, spec, generator=None):
        import math
        return {"log_lr0": torch.tensor(math.log(self.lr0)),
                "log_beta": torch.tensor(math.log(self.beta))}

    def init(self, p):
        return {"lr": p.new_zeros(())}

    def __call__(self, theta, g, state, t, direction):
        h = (g * direction.previous(state, t)).sum(-1)
        lr_prev = torch.where(t == 1, torch.exp(theta["log_lr0"]).to(g.dtype),
                              state["lr"].to(g.dtype))
        lr = lr_prev + torch.exp(theta["log_beta"]).to(g.dtype) * h
        return lr, {"lr": lr}


# -- the chain ------------------------------------------------------------------------------------
class Chain(Rule):
    """A rule made of a :class:`Direction` and a :class:`Scale` (set ``self.direction`` and
    ``self.scale`` in the constructor). State: ``step`` and the pieces' entries."""
    direction: Direction
    scale: Scale
    #: L2 weight decay added to the gradient before the direction (torch.optim's ``weight_decay``)
    l2: float = 0.0

    @property
    def state_layout(self) -> Dict[str, str]:  # type: ignore[override]
        return {"step": GLOBAL, **self.direction.state_layout, **self.scale.state_layout}

    def init_theta(self, spec, generator=None):
        return self.scale.init_theta(spec, generator)

    def init(self, params):
        p = FlatSpec.of(params).flatten(params)
        return {"step": p.new_zeros(()), **self.direction.init(p), **self.scale.init(p)}

    def update(self, theta, grads, state, params, ctx=None):
        spec = FlatSpec.of(params)
        g = spec.flatten(grads)
        if self.l2:
            g = g + self.l2 * spec.flatten(params)
        step = state["step"] + 1
        t = step.to(g.dtype)
        lr, scale_state = self.scale(theta, g, state, t, self.direction)
        d, dir_state = self.direction(g, state, t)
        return spec.unflatten(-lr * d), {"step": step, **dir_state, **scale_state}


# -- wrapper bookkeeping --------------------------------------------------------------------------
def nest(prefix: str, d: Mapping[str, Any]) -> Dict[str, Any]:
    """An inner rule's theta or state under ``prefix`` (``{"m": ..} -> {"inner.m": ..}``)."""
    return {prefix + k: v for k, v in d.items()}


def unnest(prefix: str, d: Mapping[str, Any]) -> Dict[str, Any]:
    """The entries of ``d`` under ``prefix``, without it (the inverse of :func:`nest`)."""
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


def nest_layout(prefix: str, layout: Optional[Mapping[str, str]]) -> Optional[Dict[str, str]]:
    """An inner rule's declared layout under ``prefix`` (None when it declares none)."""
    return None if layout is None else nest(prefix, layout)
