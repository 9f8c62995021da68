"""The differentiable inner unroll: the fast weights' flow under a rule, as a pure function.

``unroll`` takes one task's params/state and T stacked batches and returns the meta-loss, so
``torch.func.vmap`` can run a meta-batch of same-signature tasks as one set of batched ops, and
ordinary autograd differentiates the result w.r.t. theta (the inner gradients come from
``torch.func.grad_and_value``, which composes with the outer autograd graph: the meta-gradient
is exact second order, not first-order MAML).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from metaopt.rules.base import Rule
from metaopt.types import Batch, Params, State

class UnrollOut(NamedTuple):
    """One window of one slot's inner run (under vmap: of a stack of slots, leading dim K)."""
    meta_loss: Tensor   # scalar (per task under vmap)
    train_loss: Tensor  # mean inner training loss over the window (for logging)
    params: Params
    state: State
    extra: Dict[str, Tensor] = {}  # scheme-carried tensors (sensitivities, PES particles); never mutated


@dataclass(frozen=True)
class MetaLoss:
    """What a window is scored by: the loss after each inner step (or only the last), on the
    step's validation batch or its own training batch re-evaluated, optionally in log space.
    Chosen once by name (:func:`get_meta_loss`); every scheme calls it the same way."""
    name: str
    split: str        # "valid" | "train"
    log: bool
    last_only: bool

    @property
    def needs_valid(self) -> bool:
        return self.split == "valid"

    def __call__(self, apply_fn: Callable, params: Params, buffers: Params, train_batch: Batch,
                 valid_batch: Optional[Batch]) -> Tensor:
        """The loss after step t (``params`` = w_{t+1}), given step t's batches."""
        loss = apply_fn(params, buffers, valid_batch if self.needs_valid else train_batch)
        return torch.log(loss) if self.log else loss

    def reads(self, t: int, T: int) -> bool:
        return not self.last_only or t == T - 1


#: ``valid_mean`` -- mean validation loss after each step (default); ``valid_log_mean`` -- mean log
#: validation loss (weighs a late-training window, where the loss is small, as much as an early
#: one: a relative rather than absolute improvement); ``valid_last`` -- validation loss after the
#: last step; ``train`` -- mean loss of each step's own training batch re-evaluated after its
#: update; ``train_log_mean`` -- the mean log of that loss: scale-free across tasks (its gradient
#: equals that of the log loss normalized by the task's initial loss), the objective for rules
#: meant to train any model fast.
META_LOSSES: Dict[str, MetaLoss] = {m.name: m for m in (
    MetaLoss("valid_mean", "valid", log=False, last_only=False),
    MetaLoss("valid_log_mean", "valid", log=True, last_only=False),
    MetaLoss("valid_last", "valid", log=False, last_only=True),
    MetaLoss("train", "train", log=False, last_only=False),
    MetaLoss("train_log_mean", "train", log=True, last_only=False),
)}


def get_meta_loss(meta_loss: Union[str, MetaLoss]) -> MetaLoss:
    if isinstance(meta_loss, MetaLoss):
        return meta_loss
    if meta_loss not in META_LOSSES:
        raise ValueError(f"Invalid meta_loss: {meta_loss!r} (use one of {', '.join(META_LOSSES)})")
    return META_LOSSES[meta_loss]


def check_meta_loss(name: str) -> str:
    return get_meta_loss(name).name


def rule_step(rule: Rule, theta: Params, apply_fn: Callable, params: Params, buffers: Params,
              state: State, batch: Batch):
    """The rule's view of one inner step: gradient, then ``update``. Returns (updates, state, loss).
    The continuous scheme reads it as a velocity; :func:`inner_step` applies it."""
    if rule.needs_activations:
        grads, (loss, stats) = grad_and_value(
            lambda p: apply_fn(p, buffers, batch, stats=True), has_aux=True)(params)
    else:
        grads, loss = grad_and_value(lambda p: apply_fn(p, buffers, batch))(params)
        stats = None
    updates, state = rule.update(theta, grads, state, params, {"loss": loss, "act": stats})
    return updates, state, loss


def inner_step(rule: Rule, theta: Params, apply_fn: Callable, params: Params, buffers: Params,
               state: State, batch: Batch):
    """One step of the fast weights: gradient, rule update. Returns (params, state, loss)."""
    updates, state, loss = rule_step(rule, theta, apply_fn, params, buffers, state, batch)
    params = {k: params[k] + updates[k].to(params[k].dtype) for k in params}
    return params, state, loss


def unroll(rule: Rule, theta: Params, apply_fn: Callable, params: Params, buffers: Params,
           state: State, batches: Batch, valid_batches: Optional[Batch],
           meta_loss: Union[str, MetaLoss] = "valid_mean", checkpoint: bool = False) -> UnrollOut:
    """T inner steps (T = leading dim of ``batches``) and the meta-loss over the window
    (see :data:`META_LOSSES`).

    ``checkpoint=True`` recomputes each step in the backward pass instead of storing it
    (torch.utils.checkpoint): less memory for long windows, about one extra forward.
    """
    ml = get_meta_loss(meta_loss)
    step = _checkpointed_step if checkpoint else inner_step
    T = batches[0].shape[0]
    losses, train_losses = [], []
    for t in range(T):
        batch = tuple(b[t] for b in batches)
        params, state, loss = step(rule, theta, apply_fn, params, buffers, state, batch)
        train_losses.append(loss)
        if ml.reads(t, T):
            vb = tuple(b[t] for b in valid_batches) if ml.needs_valid else None
            losses.append(ml(apply_fn, params, buffers, batch, vb))
    return UnrollOut(torch.stack(losses).mean(), torch.stack(train_losses).mean().detach(),
                     params, state)


def stacked_unroll(rule: Rule, theta: Params, apply_fn: Callable, params: Params, buffers: Params,
                   state: State, batches: Batch, valid_batches: Optional[Batch],
                   meta_loss: Union[str, MetaLoss] = "valid_mean") -> UnrollOut:
    """:func:`unroll` for K same-signature tasks stacked on a leading dim (params, buffers, state
    ``[K, ...]``; batches ``[K, T, ...]``): the same numbers as ``vmap(unroll)``, with fewer
    wrapper layers per op.

    ``vmap(unroll)`` runs every op of the window under two functorch layers (the slot vmap and
    the inner ``grad``), and the outer backward replays them. Here only the per-task forwards and
    the rule's update are vmapped; the inner gradient is ordinary autograd of the summed task
    losses (tasks share no parameters, so d sum / d w_k = d loss_k / d w_k), with
    ``create_graph`` when the outer pass will differentiate through it. So the inner backward and
    the whole outer backward run as plain batched kernels.
    """
    ml = get_meta_loss(meta_loss)
    K = batches[0].shape[0]
    T = batches[0].shape[1]
    outer = torch.is_grad_enabled()
    many = lambda fn, in_dims=0: batched(fn, K, in_dims)
    if rule.needs_activations:
        fwd = many(lambda p, b, x: apply_fn(p, b, x, stats=True))
    else:
        loss_only = many(lambda p, b, x: apply_fn(p, b, x))
        fwd = lambda p, b, x: (loss_only(p, b, x), None)
    upd = many(lambda g, s, p, l, a: rule.update(theta, g, s, p, {"loss": l, "act": a}),
               in_dims=(0, 0, 0, 0, None if not rule.needs_activations else 0))
    score = many(lambda p, b, x, v: ml(apply_fn, p, b, x, v),
                 in_dims=(0, 0, 0, 0 if ml.needs_valid else None))
    keys = list(params)
    losses, train_losses = [], []
    for t in range(T):
        batch = tuple(b[:, t] for b in batches)
        with torch.enable_grad():
            p_in = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
            loss, stats = fwd(p_in, buffers, batch)
            gs = torch.autograd.grad(loss.sum(), [p_in[k] for k in keys], create_graph=outer,
                                     allow_unused=True)
        grads = {k: g if g is not None else torch.zeros_like(p_in[k]) for k, g in zip(keys, gs)}
        if not outer:
            loss = loss.detach()
        updates, state = upd(grads, state, p_in, loss, stats)
        params = {k: p_in[k] + updates[k].to(p_in[k].dtype) for k in keys}
        train_losses.append(loss)
        if ml.reads(t, T):
            vb = tuple(b[:, t] for b in valid_batches) if ml.needs_valid else None
            losses.append(score(params, buffers, batch, vb))
    return UnrollOut(torch.stack(losses).mean(0), torch.stack(train_losses).mean(0).detach(),
                     params, state)


def tree_map(fn: Callable[[Tensor], Tensor], tree):
    """``fn`` on every tensor of nested dicts / tuples / NamedTuples (other leaves kept)."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(tree_map(fn, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return tree


def batched(fn: Callable, n: int, in_dims=0) -> Callable:
    """``fn`` over a leading dim of size ``n``: ``torch.func.vmap`` for ``n > 1``, one plain call
    (the dim selected away, then restored on the outputs) for ``n == 1``."""
    if n > 1:
        return vmap(fn, in_dims=in_dims)

    def single(*args):
        dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
        args = [a if d is None else tree_map(lambda t: t.select(d, 0), a)
                for a, d in zip(args, dims)]
        return tree_map(lambda t: t.unsqueeze(0), fn(*args))
    return single


def _checkpointed_step(rule, theta, apply_fn, params, buffers, state, batch):
    # torch.utils.checkpoint cannot be used here: its non-reentrant form works through saved-tensor
    # hooks, which torch.func.grad (the inner gradient) refuses, and its reentrant form forbids
    # torch.autograd.grad. _CheckpointStep is a minimal replacement: forward without a graph,
    # recompute-and-differentiate in backward, and a vmap rule so it runs under the meta-batch vmap.
    keys_p, keys_s, keys_t, keys_b = list(params), list(state), list(theta), list(buffers)
    n_p, n_s, n_t, n_b = len(keys_p), len(keys_s), len(keys_t), len(keys_b)

    def fn(*flat):
        p = dict(zip(keys_p, flat[:n_p]))
        s = dict(zip(keys_s, flat[n_p:n_p + n_s]))
        th = dict(zip(keys_t, flat[n_p + n_s:n_p + n_s + n_t]))
        bu = dict(zip(keys_b, flat[n_p + n_s + n_t:n_p + n_s + n_t + n_b]))
        b = tuple(flat[n_p + n_s + n_t + n_b:])
        p2, s2, loss = inner_step(rule, th, apply_fn, p, bu, s, b)
        return (*[p2[k] for k in keys_p], *[s2[k] for k in keys_s], loss)

    out = _CheckpointStep.apply(fn, *[params[k] for k in keys_p], *[state[k] for k in keys_s],
                                *[theta[k] for k in keys_t], *[buffers[k] for k in keys_b], *batch)
    p2 = dict(zip(keys_p, out[:n_p]))
    s2 = dict(zip(keys_s, out[n_p:n_p + n_s]))
    return p2, s2, out[-1]


class _CheckpointStep(torch.autograd.Function):
    """``fn(*tensors) -> tuple`` evaluated without storing its graph; backward recomputes it."""

    @staticmethod
    def forward(fn, *xs):
        with torch.no_grad():
            return tuple(fn(*xs))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.fn = inputs[0]
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx, *grad_out):
        xs = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(n) for x, n in zip(xs, need)]
            out = ctx.fn(*leaves)
        pairs = [(o, g) for o, g in zip(out, grad_out) if g is not None and o.requires_grad]
        wrt = [x for x, n in zip(leaves, need) if n]
        grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                    allow_unused=True) if pairs and wrt else [None] * len(wrt)
        it = iter(grads)
        return (None, *[next(it) if n else None for n in need])

    @staticmethod
    def vmap(info, in_dims, fn, *xs):
        # Run the whole batch as one checkpointed call of the vmapped function.
        out = _CheckpointStep.apply(vmap(fn, in_dims=tuple(in_dims[1:])), *xs)
        return out, tuple(0 for _ in out)
