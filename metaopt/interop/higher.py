"""A metaopt rule as a ``higher`` differentiable optimizer.

    import metaopt.interop.higher            # registers LearnedOptimizer with higher
    opt = LearnedOptimizer(model.parameters(), rule=rule, theta=theta)
    opt.theta = {k: v.requires_grad_() for k, v in theta.items()}   # to meta-learn theta
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(loss_fn(fmodel(x), y))
        meta_loss(fmodel).backward()          # gradients reach theta (and the initial params)

Existing ``higher`` code thus swaps in a learned rule by changing the optimizer it passes.
The update is ``rule.update`` (pure, differentiable), the same function metaopt's unroll
engine differentiates; the loss given to ``diffopt.step`` is the rule's ``ctx["loss"]``.
Rules that need activation statistics are not supported (no hooks on higher's functional
model): ValueError. Parameters whose gradient is None get a zero gradient.
"""
from __future__ import annotations

import higher
import torch
from higher.optim import DifferentiableOptimizer

__all__ = ["DifferentiableLearnedOptimizer", "register"]


class DifferentiableLearnedOptimizer(DifferentiableOptimizer):
    def __init__(self, other, reference_params, *args, **kwargs):
        if other.rule.needs_activations:
            raise ValueError(f"rule {other.rule.name!r} uses activation features, which higher's "
                             f"functional model cannot record: use a rule with needs_activations=False")
        self.rule = other.rule
        self.theta = other.theta
        self.names = list(other.spec.names)
        flat = other.rule_state
        self.rule_state = {k: v.clone() for k, v in flat.items()} if flat is not None else None
        self._loss = None
        super().__init__(other, reference_params, *args, **kwargs)

    def step(self, loss, *args, **kwargs):
        self._loss = loss
        return super().step(loss, *args, **kwargs)

    def _update(self, grouped_grads, **kwargs) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        grads = [g if g is not None else torch.zeros_like(p)
                 for gs, group in zip(grouped_grads, self.param_groups)
                 for g, p in zip(gs, group["params"])]
        pd, gd = dict(zip(self.names, params)), dict(zip(self.names, grads))
        if self.rule_state is None:
            self.rule_state = self.rule.init({k: v.detach() for k, v in pd.items()})
        ctx = {"loss": self._loss, "act": None}
        updates, self.rule_state = self.rule.update(self.theta, gd, self.rule_state, pd, ctx)
        i = 0
        for group in self.param_groups:
            lr = group["lr"]
            for j, p in enumerate(group["params"]):
                u = updates[self.names[i]]
                group["params"][j] = p + (u if lr == 1.0 else lr * u)
                i += 1


def register() -> None:
    """Register :class:`metaopt.optim.LearnedOptimizer` with higher (done on import)."""
    from metaopt.optim.learned import LearnedOptimizer
    higher.register_optim(LearnedOptimizer, DifferentiableLearnedOptimizer)


register()
