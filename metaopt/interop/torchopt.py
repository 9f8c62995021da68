"""metaopt rules <-> torchopt.

* :func:`rule_transform` -- any metaopt rule (theta fixed, or a tensor dict that requires grad)
  as a torchopt ``GradientTransformation``: chainable (``torchopt.chain(torchopt.clip_grad_norm(1.0),
  rule_transform(rule, theta))``) and usable by torchopt's functional API and ``MetaOptimizer``
  (updates are computed without in-place ops, so meta-gradients flow into theta).
* :func:`torchopt_rule` -- a torchopt alias optimizer (``torchopt.adam(1e-3)``, ...) as a metaopt
  hand-designed :class:`~metaopt.rules.base.Rule`, so it runs in :class:`metaopt.optim.LearnedOptimizer`
  or a metaopt unroll. The transform is applied to the flat vector of all parameters, which is
  exact for element-wise transforms (the alias optimizers); its state leaves become a flat dict.

torchopt's update convention is metaopt's: updates are added to the parameters.
"""
from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Sequence

import torch
import torchopt
from torch import Tensor
from torch.utils import _pytree as pytree

from metaopt.rules.base import Rule
from metaopt.types import FlatSpec, Params

__all__ = ["rule_transform", "RuleState", "torchopt_rule", "TorchoptRule"]


class RuleState(NamedTuple):
    """torchopt state of :func:`rule_transform`: the rule's flat state dict (a pytree)."""
    rule: Dict[str, Tensor]


def _names(n: int):
    return [f"p{i}" for i in range(n)]


def rule_transform(rule: Rule, theta: Params, names: Optional[Sequence[str]] = None):
    """A torchopt ``GradientTransformation`` applying ``rule`` with meta-parameters ``theta``.

    ``names``: parameter names in the order of the flattened params pytree (needed only by
    rules that look parameters up by name; default ``p0, p1, ...``). Rules that need activation
    statistics cannot run here (torchopt has no forward hooks): ValueError. Rules that read the
    loss get a neutral one (their running mean: no surprise), as in LearnedOptimizer.step()
    without a closure.
    """
    if rule.needs_activations:
        raise ValueError(f"rule {rule.name!r} uses activation features, which torchopt cannot "
                         f"provide: use a rule with needs_activations=False")

    def as_dict(leaves):
        keys = list(names) if names is not None else _names(len(leaves))
        if len(keys) != len(leaves):
            raise ValueError(f"names has {len(keys)} entries for {len(leaves)} parameter tensors")
        return dict(zip(keys, leaves))

    def init_fn(params):
        leaves, _ = pytree.tree_flatten(params)
        with torch.no_grad():
            return RuleState(rule.init(as_dict([p.detach() for p in leaves])))

    def update_fn(updates, state, *, params=None, inplace=True):
        if params is None:
            raise ValueError(f"rule_transform({rule.name!r}).update needs params= (metaopt rules "
                             f"read the parameters)")
        g_leaves, treespec = pytree.tree_flatten(updates)
        p_leaves, _ = pytree.tree_flatten(params)
        grads = as_dict([g if g is not None else torch.zeros_like(p)
                         for g, p in zip(g_leaves, p_leaves)])
        ps = as_dict(p_leaves)
        st = state.rule
        ctx = {"loss": None, "act": None}
        if rule.needs_loss:
            ref = st.get("loss_mean")
            ctx["loss"] = ref if isinstance(ref, Tensor) else p_leaves[0].new_zeros(())
        upd, new = rule.update(theta, grads, st, ps, ctx)
        if rule.needs_loss:
            new = {**new, **{k: st[k] for k in ("loss_mean", "loss_var") if k in st}}
        out = [upd[k] for k in grads]
        if inplace:
            for g, u in zip(g_leaves, out):
                if g is not None:
                    g.copy_(u)
            out = g_leaves
        return pytree.tree_unflatten(out, treespec), RuleState(new)

    return torchopt.base.GradientTransformation(init_fn, update_fn)


class TorchoptRule(Rule):
    """A torchopt transform as a hand-designed metaopt rule (no meta-parameters)."""

    name = "torchopt"

    def __init__(self, transform, label: str = "torchopt"):
        self.transform = transform
        self.label = label

    def config(self):
        return {"label": self.label}

    def init_theta(self, spec=None, generator=None):
        return {}

    def _flat(self, params):
        return FlatSpec.of(params).flatten(params)

    def init(self, params):
        st = self.transform.init((self._flat(params),))
        leaves, self._treespec = pytree.tree_flatten(st)
        return {f"s{i}": torch.as_tensor(v) for i, v in enumerate(leaves)}

    def update(self, theta, grads, state, params, ctx=None):
        spec = FlatSpec.of(params)
        g, p = spec.flatten(grads), spec.flatten(params)
        treespec = getattr(self, "_treespec", None)
        if treespec is None:
            _, treespec = pytree.tree_flatten(self.transform.init((p.detach(),)))
            self._treespec = treespec
        st = pytree.tree_unflatten([state[f"s{i}"] for i in range(len(state))], treespec)
        (u,), new = self.transform.update((g,), st, params=(p,), inplace=False)
        leaves, _ = pytree.tree_flatten(new)
        return spec.unflatten(u), {f"s{i}": v for i, v in enumerate(leaves)}


def torchopt_rule(transform, label: str = "torchopt") -> TorchoptRule:
    """``torchopt_rule(torchopt.adam(1e-3))`` -> a metaopt Rule (see :class:`TorchoptRule`)."""
    if not isinstance(transform, torchopt.base.GradientTransformation):
        raise TypeError(f"Invalid transform: {transform!r} (expected a torchopt GradientTransformation)")
    return TorchoptRule(transform, label)
