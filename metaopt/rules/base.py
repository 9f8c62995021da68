"""The rule interface: the slow net ``f_theta`` as an optax-style (init, update) pair.

A rule is a stateless description. Everything that changes lives in two dicts of tensors:

* ``theta`` -- the meta-parameters (learned, unconstrained: ``log_lr`` rather than ``lr``),
  created by ``init_theta(spec, generator)``;
* ``state`` -- the per-run optimizer state (momenta, step counter), created by ``init(params)``.

``update(theta, grads, state, params, ctx) -> (updates, new_state)`` is a pure function of
tensors, so the same code runs (a) inside a differentiable, vmapped meta-training unroll and
(b) under ``torch.no_grad`` inside :class:`metaopt.optim.LearnedOptimizer`. New params are
``params + updates``. Hand-designed rules (sgd, adam) implement the same interface, so every
rule unrolls through one engine and its hyperparameters can be meta-learned.

State is a flat ``dict[str, Tensor]`` (not a NamedTuple) so it round-trips through safetensors
and ``torch.optim.Optimizer.state_dict`` without pickling; each rule documents its keys.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Type

import torch
from torch import Tensor

from metaopt.types import Context, FlatSpec, Params, State

RULES: Dict[str, Type["Rule"]] = {}


def register_rule(cls):
    """Class decorator: make a rule constructible by name (``make_rule(name, **kwargs)``)."""
    RULES[cls.name] = cls
    return cls


def make_rule(name: str, **kwargs) -> "Rule":
    if name not in RULES:
        raise ValueError(f"Unknown rule name: {name!r} (known: {', '.join(sorted(RULES))})")
    return RULES[name](**kwargs)


class Rule:
    """Base class. Subclasses set ``name`` and implement the three methods below."""

    name: ClassVar[str] = "rule"
    #: whether ``update`` reads ``ctx["act"]`` (per-layer activation statistics)
    needs_activations: bool = False
    #: whether ``update`` reads ``ctx["loss"]`` (the current batch loss)
    needs_loss: bool = False
    #: whether theta's shapes depend on the parameter spec (then a trained theta only fits
    #: models with that spec, e.g. one learning rate per layer)
    spec_dependent: ClassVar[bool] = False

    def init_theta(self, spec: FlatSpec, generator: Optional[torch.Generator] = None) -> Params:
        raise NotImplementedError

    def init(self, params: Mapping[str, Tensor]) -> State:
        raise NotImplementedError

    def update(self, theta: Params, grads: Params, state: State, params: Params,
               ctx: Optional[Context] = None) -> Tuple[Params, State]:
        raise NotImplementedError

    # -- serialization ---------------------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        """JSON-able constructor kwargs; ``make_rule(**{'name': n, **cfg})`` rebuilds the rule."""
        return {}

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, **self.config()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def step_of(state: State, like: Tensor) -> Tensor:
    """The step counter as a float tensor on ``like``'s device/dtype."""
    return state["step"].to(like.dtype)
