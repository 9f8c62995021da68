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
and ``torch.optim.Optimizer.state_dict`` without pickling; each rule documents its keys and
declares their layout in ``state_layout`` (per coordinate, per tensor or global), from which
:class:`metaopt.optim.LearnedOptimizer` presents the state per parameter.

Optional in-place fast path
---------------------------
A rule may also define

    step_(theta, params: list[Tensor], grads: list[Tensor], state, spec, ctx=None,
          scales: list[float] | None = None) -> new_state

for use outside meta-training (:class:`metaopt.optim.LearnedOptimizer` calls it under
``torch.no_grad``). ``params``/``grads`` are the parameter tensors and their gradients in
``spec``'s order (``spec.names``), all of one dtype and device, the dtype of ``state``. It must
have the effect of

    updates, new_state = update(theta, dict(zip(spec.names, grads)), state,
                                dict(zip(spec.names, params)), ctx)
    params[i] += scales[i] * updates[spec.names[i]]        (scales default to 1)

up to floating-point rounding, but it writes the parameters in place and may update the
tensors of ``state`` in place and return them in ``new_state`` (so the caller must not use the
old ``state`` afterwards). It is not differentiable and need not vmap. The base class sets
``step_ = None`` (absent); :meth:`Rule.has_step_` tells whether a rule provides one, and callers
fall back to ``update`` when it does not.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor

from metaopt.types import Context, FlatSpec, Params, State

RULES: Dict[str, Type["Rule"]] = {}


def register_rule(cls):
    """Class decorator: make a rule constructible by name (``make_rule(name, **kwargs)``)."""
    RULES[cls.name] = cls
    return cls


def make_rule(name: str, **kwargs) -> "Rule":
    """A registered rule by name, built with ``kwargs`` (its constructor's arguments), e.g.
    ``make_rule("adam", lr=1e-3)`` or ``make_rule("layerwise_lr", num_steps=50)``. The names are
    the keys of ``RULES`` (``@register_rule`` adds one); an unknown name is a ValueError listing
    the known ones."""
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
    #: whether ``update``/``step_`` apply ``ctx["weight_decay"]`` (one decoupled weight-decay
    #: coefficient per tensor, from the param groups of :class:`metaopt.optim.LearnedOptimizer`);
    #: a rule without it rejects a nonzero group ``weight_decay``
    supports_weight_decay: ClassVar[bool] = False
    #: how each ``state`` key maps onto the parameters: ``"coord"`` (last dim over the N flat
    #: coordinates), ``"tensor"`` (last dim over the T tensors) or ``"global"`` (shared); see
    #: :mod:`metaopt.rules.layout`. Keys that an option leaves out may be declared anyway.
    #: ``None`` (not declared) makes :class:`metaopt.optim.LearnedOptimizer` guess from shapes.
    state_layout: Optional[Mapping[str, str]] = None
    #: the same for ``theta``, needed by spec-dependent rules only (theta per tensor/coordinate)
    theta_layout: Optional[Mapping[str, str]] = None

    def init_theta(self, spec: FlatSpec, generator: Optional[torch.Generator] = None) -> Params:
        raise NotImplementedError

    def init(self, params: Mapping[str, Tensor]) -> State:
        raise NotImplementedError

    def update(self, theta: Params, grads: Params, state: State, params: Params,
               ctx: Optional[Context] = None) -> Tuple[Params, State]:
        raise NotImplementedError

    #: optional in-place, no-grad fast path (see the module docstring for the contract);
    #: ``None`` means the rule has none and callers use ``update``
    step_: Optional[Callable[..., State]] = None

    def has_step_(self) -> bool:
        """Whether ``step_`` is available and implements this rule's ``update``: a subclass
        that overrides ``update`` without overriding ``step_`` does not use the inherited one."""
        mro = type(self).__mro__
        owner_step = next(k for k in mro if "step_" in vars(k))
        owner_update = next((k for k in mro if "update" in vars(k)), Rule)
        return vars(owner_step)["step_"] is not None and issubclass(owner_step, owner_update)

    # -- serialization ---------------------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        """JSON-able constructor kwargs; ``make_rule(**{'name': n, **cfg})`` rebuilds the rule."""
        return {}

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, **self.config()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


# -- helpers for ``step_`` implementations ---------------------------------------------------------
def flat_views(flat: Tensor, spec: FlatSpec) -> List[Tensor]:
    """Views of a flat [N] tensor shaped like ``spec``'s tensors (no copies)."""
    return [part.view(s) for part, s in zip(torch.split(flat, spec.numels), spec.shapes)]


def default_scales(scales: Optional[Sequence[float]], n: int) -> List[float]:
    if scales is None:
        return [1.0] * n
    scales = [float(s) for s in scales]
    if len(scales) != n:
        raise ValueError(f"got {len(scales)} scales for {n} parameter tensors")
    return scales


def add_scaled_(params: Sequence[Tensor], updates: Sequence[Tensor], alpha: float,
                scales: Sequence[float]) -> None:
    """In place: ``params[i] += alpha * scales[i] * updates[i]``."""
    if len(set(scales)) <= 1:
        if params:
            torch._foreach_add_(list(params), list(updates), alpha=alpha * scales[0])
    else:
        for p, u, s in zip(params, updates, scales):
            p.add_(u, alpha=alpha * s)
