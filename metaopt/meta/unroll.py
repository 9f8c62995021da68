"""The differentiable inner unroll: the fast weights' flow under a rule, as a pure function.

``unroll`` takes one task's params/state and T stacked batches and returns the meta-loss, so
``torch.func.vmap`` can run a meta-batch of same-signature tasks as one set of batched ops, and
ordinary autograd differentiates the result w.r.t. theta (the inner gradients come from
``torch.func.grad_and_value``, which composes with the outer autograd graph: the meta-gradient
is exact second order, not first-order MAML).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.func import grad_and_value

from metaopt.rules.base import Rule
from metaopt.types import Batch, Params, State

META_LOSSES = ("valid_mean", "valid_last", "train")


class UnrollOut(NamedTuple):
    meta_loss: Tensor   # scalar (per task under vmap)
    train_loss: Tensor  # mean inner training loss over the window (for logging)
    params: Params
    state: State


def check_meta_loss(name: str) -> str:
    if name not in META_LOSSES:
        raise ValueError(f"Invalid meta_loss: {name!r} (use one of {', '.join(META_LOSSES)})")
    return name


def inner_step(rule: Rule, theta: Params, apply_fn: Callable, params: Params, buffers: Params,
               state: State, batch: Batch):
    """One step of the fast weights: gradient, rule update. Returns (params, state, loss)."""
    if rule.needs_activations:
        def f(p):
            loss, stats = apply_fn(p, buffers, batch, stats=True)
            return loss, stats
        grads, (loss, stats) = grad_and_value(f, has_aux=True)(params)
    else:
        grads, loss = grad_and_value(lambda p: apply_fn(p, buffers, batch))(params)
        stats = None
    ctx = {"loss": loss, "act": stats}
    updates, state = rule.update(theta, grads, state, params, ctx)
    params = {k: params[k] + updates[k].to(params[k].dtype) for k in params}
    return params, state, loss


def unroll(rule: Rule, theta: Params, apply_fn: Callable, params: Params, buffers: Params,
           state: State, batches: Batch, valid_batches: Optional[Batch],
           meta_loss: str = "valid_mean", checkpoint: bool = False) -> UnrollOut:
    """T inner steps (T = leading dim of ``batches``) and the meta-loss over the window.

    meta_loss: ``valid_mean`` -- mean validation loss after each step (default);
    ``valid_last`` -- validation loss after the last step; ``train`` -- mean loss of each step's
    own training batch re-evaluated after its update.
    ``checkpoint=True`` recomputes each step in the backward pass instead of storing it
    (torch.utils.checkpoint): less memory for long windows, about one extra forward.
    """
    T = batches[0].shape[0]
    losses, train_losses = [], []
    for t in range(T):
        batch = tuple(b[t] for b in batches)
        if checkpoint:
            params, state, loss = _checkpointed_step(rule, theta, apply_fn, params, buffers, state, batch)
        else:
            params, state, loss = inner_step(rule, theta, apply_fn, params, buffers, state, batch)
        train_losses.append(loss)
        if meta_loss == "valid_mean" or (meta_loss == "valid_last" and t == T - 1):
            vb = tuple(b[t] for b in valid_batches)
            losses.append(apply_fn(params, buffers, vb))
        elif meta_loss == "train":
            losses.append(apply_fn(params, buffers, batch))
    return UnrollOut(torch.stack(losses).mean(), torch.stack(train_losses).mean().detach(),
                     params, state)


def _checkpointed_step(rule, theta, apply_fn, params, buffers, state, batch):
    from torch.utils.checkpoint import checkpoint

    keys_p, keys_s, keys_t = list(params), list(state), list(theta)

    def fn(*flat):
        p = dict(zip(keys_p, flat[:len(keys_p)]))
        s = dict(zip(keys_s, flat[len(keys_p):len(keys_p) + len(keys_s)]))
        th = dict(zip(keys_t, flat[len(keys_p) + len(keys_s):]))
        p2, s2, loss = inner_step(rule, th, apply_fn, p, buffers, s, batch)
        return (*[p2[k] for k in keys_p], *[s2[k] for k in keys_s], loss)

    out = checkpoint(fn, *[params[k] for k in keys_p], *[state[k] for k in keys_s],
                     *[theta[k] for k in keys_t], use_reentrant=False)
    p2 = dict(zip(keys_p, out[:len(keys_p)]))
    s2 = dict(zip(keys_s, out[len(keys_p):len(keys_p) + len(keys_s)]))
    return p2, s2, out[-1]
