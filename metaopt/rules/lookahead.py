r"""Lookahead (Zhang et al. 2019) around any rule; learnable slow step size and inner theta.

The two nested loops of Lookahead -- k fast steps of the inner rule, then one slow step -- are
written as one update per call, as optax does: the slow weights and a step counter ride in the
state, and on every k-th call the update lands the parameters on the new slow weights:

.. math::
    \theta' = \theta + A_{\vartheta}(g, \theta), \qquad
    \text{if } (t+1) \bmod k = 0:\ \ \phi \leftarrow \phi + \alpha(\theta' - \phi),\ \
    \theta' \leftarrow \phi

with :math:`\alpha = \sigma(\text{alpha\_logit})`. The branch is a ``torch.where`` on the
counter, so the rule stays differentiable (w.r.t. ``alpha_logit`` and the inner rule's theta)
and vmappable. Inner momentum is kept across synchronisations (the paper's default).

theta: ``inner.<key>`` for each key of the inner rule's theta, and ``alpha_logit`` (scalar).
state: ``inner.<key>`` (the inner rule's state), ``slow`` [N] (flat slow weights), ``step``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Union

import torch

from metaopt.rules.base import Rule, make_rule, register_rule
from metaopt.rules.compose import nest, nest_layout, unnest
from metaopt.rules.layout import COORD, GLOBAL
from metaopt.types import FlatSpec

_INNER = "inner."


def _resolve_rule(inner) -> Rule:
    if isinstance(inner, Rule):
        return inner
    if isinstance(inner, str):
        return make_rule(inner)
    if isinstance(inner, Mapping) and "name" in inner:
        cfg = dict(inner)
        return make_rule(cfg.pop("name"), **cfg)
    raise ValueError(f"Invalid inner: {inner!r} (expected a Rule, a rule name, or a dict "
                     f"{{'name': ..., **kwargs}})")


@register_rule
class LookaheadRule(Rule):
    """Lookahead wrapper rule: ``LookaheadRule(inner=<Rule | name | {'name': ..}>, k=5, alpha=0.5)``.

    ``alpha`` is the initial slow step size, in (0, 1); it is learned through ``alpha_logit``.
    """

    name = "lookahead"

    def __init__(self, inner: Union[Rule, str, Mapping[str, Any]] = "sgd", k: int = 5,
                 alpha: float = 0.5):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid k: {k} (expected an integer >= 1)")
        if not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
            raise ValueError(f"Invalid alpha: {alpha} (expected 0 < alpha < 1; it is learned as "
                             f"a logit)")
        self.inner = _resolve_rule(inner)
        self.k, self.alpha = k, float(alpha)
        self.needs_activations = self.inner.needs_activations
        self.needs_loss = self.inner.needs_loss
        self.spec_dependent = self.inner.spec_dependent
        inner_layout = nest_layout(_INNER, self.inner.state_layout)
        self.state_layout = None if inner_layout is None else \
            {**inner_layout, "slow": COORD, "step": GLOBAL}
        theta_layout = nest_layout(_INNER, self.inner.theta_layout)
        self.theta_layout = None if theta_layout is None else {**theta_layout, "alpha_logit": GLOBAL}

    def config(self) -> Dict[str, Any]:
        return {"inner": self.inner.describe(), "k": self.k, "alpha": self.alpha}

    def init_theta(self, spec: FlatSpec, generator: Optional[torch.Generator] = None):
        theta = nest(_INNER, self.inner.init_theta(spec, generator))
        theta["alpha_logit"] = torch.tensor(math.log(self.alpha / (1.0 - self.alpha)))
        return theta

    def init(self, params):
        state = nest(_INNER, self.inner.init(params))
        flat = FlatSpec.of(params).flatten(params)
        state["slow"] = flat.clone()
        state["step"] = flat.new_zeros(())
        return state

    def update(self, theta, grads, state, params, ctx=None):
        spec = FlatSpec.of(params)
        inner_updates, inner_state = self.inner.update(
            unnest(_INNER, theta), grads, unnest(_INNER, state), params, ctx)
        p = spec.flatten(params)
        fast = p + spec.flatten(inner_updates).to(p.dtype)
        step = state["step"] + 1
        sync = torch.remainder(step, self.k) == 0
        alpha = torch.sigmoid(theta["alpha_logit"]).to(p.dtype)
        slow = state["slow"]
        moved = slow + alpha * (fast - slow)
        new_p = torch.where(sync, moved, fast)
        new_state = nest(_INNER, inner_state)
        new_state["slow"] = torch.where(sync, moved, slow)
        new_state["step"] = step
        return spec.unflatten(new_p - p), new_state
