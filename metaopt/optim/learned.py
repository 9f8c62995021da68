"""Apply any trained rule to any model as an ordinary ``torch.optim.Optimizer``.

    opt = metaopt.LearnedOptimizer.from_pretrained(model.named_parameters(), "default")
    for x, y in data:
        def closure():
            opt.zero_grad(); loss = F.cross_entropy(model(x), y); loss.backward(); return loss
        opt.step(closure)

Each param group's ``lr`` (default 1.0) multiplies the rule's update, so LR schedulers work.
The rule's state (momenta, step counter, over the flat view of all parameters) lives in
``self.state["rule"]`` and round-trips through ``state_dict``; theta is stored there too.
When the rule has an in-place fast path (``Rule.step_``: adam, sgd, mlp) and all parameters
share one dtype and device, ``step`` uses it (the same update up to rounding, without building
the flat parameter vector); like ``torch.optim``, the state tensors are then updated in place,
so a ``state_dict()`` kept across steps changes with them (deep-copy it to keep a snapshot).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import Tensor, nn

from metaopt.activations import ActivationRecorder
from metaopt.rules.base import Rule, make_rule
from metaopt.rules.io import (PRETRAINED_DIR, CheckpointError, check_theta, load_rule,
                              resolve_rule_path)
from metaopt.types import FlatSpec, Params

__all__ = ["LearnedOptimizer", "PRETRAINED_DIR"]  # PRETRAINED_DIR: where shipped rules live



class LearnedOptimizer(torch.optim.Optimizer):
    def __init__(self, params, rule: Union[Rule, str] = "mlp", theta: Optional[Params] = None,
                 lr: float = 1.0, model: Optional[nn.Module] = None, seed: int = 0):
        """``rule``: a Rule or a rule name (default kwargs; build others with ``make_rule``).
        ``theta``: trained meta-parameters (default: the rule's fresh init from ``seed``).
        ``lr``: per-group multiplier of the rule's update. ``model``: needed by activation-aware
        rules (forward hooks record each layer's activation statistics)."""
        if lr < 0:
            raise ValueError(f"Invalid lr: {lr}")
        params = list(params)
        names = None
        if params and isinstance(params[0], tuple):  # named_parameters()
            names = [n for n, _ in params]
            params = [p for _, p in params]
        super().__init__(params, dict(lr=lr))
        self.rule = make_rule(rule) if isinstance(rule, str) else rule
        all_params = [p for g in self.param_groups for p in g["params"]]
        if names is None and model is not None:
            by_id = {id(p): n for n, p in model.named_parameters()}
            names = [by_id.get(id(p), f"param{i}") for i, p in enumerate(all_params)]
        if names is None or len(names) != len(all_params):
            names = [f"param{i}" for i in range(len(all_params))]
        self._names = names
        self.spec = FlatSpec(tuple(names), tuple(tuple(p.shape) for p in all_params))
        expected = self.rule.init_theta(self.spec, torch.Generator().manual_seed(seed))
        if theta is None:
            theta = expected
        check_theta(theta, expected, where=f"theta for rule {self.rule.name!r}")
        self.theta = {k: v.detach().to(all_params[0].device) for k, v in theta.items()}
        if self.rule.needs_activations and model is None:
            raise ValueError(f"rule {self.rule.name!r} uses activation features: pass model=<your nn.Module>")
        self._recorder = ActivationRecorder(model).__enter__() if self.rule.needs_activations else None

    # -- construction from checkpoints ---------------------------------------------------------
    @classmethod
    def from_pretrained(cls, params, name_or_path: Union[str, Path] = "default", **kwargs):
        """Load a rule checkpoint directory (theta.safetensors + rule.json), or a shipped name."""
        path = resolve_rule_path(name_or_path)
        rule, theta, meta = load_rule(path)
        params = list(params)
        opt = cls(params, rule=rule, theta=theta if not rule.spec_dependent else None, **kwargs)
        if rule.spec_dependent:
            stored = meta.get("spec") or []
            for (n, s), (m, t) in zip(stored, zip(opt.spec.names, opt.spec.shapes)):
                if tuple(s) != tuple(t):
                    raise CheckpointError(f"{path}: rule was trained for parameter {n!r} of shape {s}; "
                                          f"this model's {m!r} has shape {list(t)}")
            if len(stored) != opt.spec.num_tensors:
                raise CheckpointError(f"{path}: rule was trained for {len(stored)} parameter tensors; "
                                      f"this model has {opt.spec.num_tensors}")
            check_theta(theta, opt.theta, where=str(path))
            opt.theta = {k: v.to(opt.theta[k].device) for k, v in theta.items()}
        return opt

    # -- the step -----------------------------------------------------------------------------------
    def _rule_state(self, params: Params) -> Dict[str, Tensor]:
        st = self.state.get("rule")
        if st is None:
            with torch.no_grad():
                st = self.rule.init(params)
            self.state["rule"] = st
        return st

    def _can_step_(self, plist, state) -> bool:
        """Whether the rule's in-place ``step_`` applies: it has one, and params, grads and
        state share one dtype and device (otherwise ``update``'s type promotion is kept)."""
        if not self.rule.has_step_() or not plist:
            return False
        dtype, device = plist[0].dtype, plist[0].device
        for p in plist:
            if p.dtype != dtype or p.device != device or (p.grad is not None and (
                    p.grad.is_sparse or p.grad.dtype != dtype or p.grad.device != device)):
                return False
        return all(v.device == device and (not v.is_floating_point() or v.dtype == dtype)
                   for v in state.values())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.rule.needs_loss and loss is None:
            raise ValueError(f"rule {self.rule.name!r} uses the loss: call step(closure) with a "
                             "closure that returns the loss")
        plist = [p for g in self.param_groups for p in g["params"]]
        params = dict(zip(self._names, plist))
        glist = [p.grad if p.grad is not None else torch.zeros_like(p) for p in plist]
        grads = dict(zip(self._names, glist))
        ctx = {"loss": loss.detach() if isinstance(loss, Tensor) else loss,
               "act": dict(self._recorder.stats) if self._recorder is not None else None}
        state = self._rule_state(params)
        if self._can_step_(plist, state):
            # in-place fast path; each group's lr scales its tensors' updates
            scales = [float(g["lr"]) for g in self.param_groups for _ in g["params"]]
            self.state["rule"] = self.rule.step_(self.theta, plist, glist, state,
                                                 self.spec, ctx, scales)
            return loss
        updates, new_state = self.rule.update(self.theta, grads, state, params, ctx)
        self.state["rule"] = new_state
        i = 0
        for g in self.param_groups:
            for p in g["params"]:
                u = updates[self._names[i]]
                p.add_(u.to(p.dtype), alpha=g["lr"]) if g["lr"] != 1.0 else p.add_(u.to(p.dtype))
                i += 1
        return loss

    # -- serialization ------------------------------------------------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["theta"] = {k: v.clone() for k, v in self.theta.items()}
        sd["rule"] = self.rule.describe()
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        theta = state_dict.pop("theta", None)
        rule_desc = state_dict.pop("rule", None)
        if rule_desc is not None and rule_desc != self.rule.describe():
            raise CheckpointError(f"state_dict is for rule {rule_desc}, this optimizer has "
                                  f"{self.rule.describe()}")
        if theta is not None:
            check_theta(theta, self.theta, where="state_dict['theta']")
            self.theta = {k: v.clone() for k, v in theta.items()}
        super().load_state_dict(state_dict)
        st = self.state.get("rule")
        if st is not None:
            # own copies: the rule's fast path updates its state in place, and the tensors of a
            # loaded state_dict must not change under the caller (or be shared by two optimizers)
            st = self.state["rule"] = {k: v.clone() if isinstance(v, Tensor) else v
                                       for k, v in st.items()}
            expected = self.rule.init({n: p for n, p in zip(self._names,
                                       [p for g in self.param_groups for p in g["params"]])})
            for k, v in expected.items():
                if k not in st or tuple(st[k].shape) != tuple(v.shape):
                    raise CheckpointError(f"state_dict['state']['rule'][{k!r}] does not match this "
                                          f"model (expected shape {list(v.shape)})")

    def close(self):
        """Remove the activation hooks (only registered for activation-aware rules)."""
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            self._recorder = None
