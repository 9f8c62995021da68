"""Nested (truncated) scheme: n inner steps per outer step, backprop through the window.

Read it the way optax's lookahead reads: the "nested loop" is just a succession of updates.
Every outer step each slot runs ``truncation`` inner steps from where it stopped (its state
carries over), the meta-loss over that window is backpropagated to theta exactly (second order,
through the inner gradients), and theta takes one step. ``truncation = horizon`` gives full
(untruncated) unrolls; ``truncation = 1`` gives the greedy one-step scheme. Truncation biases the
meta-gradient toward short-horizon behaviour; ES/PES estimators trade that bias for variance.

Same-signature slots run as one ``torch.func.vmap`` call; different architectures loop.
"""
from __future__ import annotations

from typing import List

import torch
from torch.func import vmap

from metaopt.meta.schemes import Scheme, SchemeOutput, register_scheme
from metaopt.meta.slots import Slot, group_by_signature, stack_dicts, unstack_dict
from metaopt.meta.unroll import unroll
from metaopt.types import tree_detach


def sample_window(slot: Slot, T: int, need_valid: bool):
    batches = slot.task.sample_batches("train", T, slot.gen)
    valid = slot.task.sample_batches("valid", T, slot.gen) if need_valid else None
    return batches, valid


@register_scheme
class Nested(Scheme):
    name = "nested"

    def __init__(self, truncation: int = 20, use_vmap: bool = True, checkpoint: bool = False):
        if truncation < 1:
            raise ValueError(f"Invalid truncation: {truncation}")
        self.truncation = self.window = int(truncation)
        self.use_vmap, self.checkpoint = bool(use_vmap), bool(checkpoint)

    def config(self):
        return dict(truncation=self.truncation, use_vmap=self.use_vmap, checkpoint=self.checkpoint)

    def window_losses(self, rule, theta, slots: List[Slot], meta_loss: str):
        """Per-slot UnrollOut results (differentiable w.r.t. theta), in slot order."""
        T = self.truncation
        need_valid = meta_loss.startswith("valid")
        outs = [None] * len(slots)
        for idx in group_by_signature(slots):
            data = [sample_window(slots[i], T, need_valid) for i in idx]
            task = slots[idx[0]].task
            if self.use_vmap and len(idx) > 1:
                fn = lambda p, b, s, tb, vb: unroll(rule, theta, task.apply, p, b, s, tb, vb,
                                                    meta_loss, self.checkpoint)
                batched = vmap(fn, in_dims=(0, 0, 0, 0, 0 if need_valid else None))(
                    stack_dicts([slots[i].params for i in idx]),
                    stack_dicts([slots[i].task.buffers for i in idx]) if task.buffers else {},
                    stack_dicts([slots[i].state for i in idx]),
                    tuple(torch.stack(x) for x in zip(*[d[0] for d in data])),
                    tuple(torch.stack(x) for x in zip(*[d[1] for d in data])) if need_valid else None,
                )
                ps = unstack_dict(batched.params, len(idx))
                ss = unstack_dict(batched.state, len(idx))
                for j, i in enumerate(idx):
                    outs[i] = (batched.meta_loss[j], batched.train_loss[j], ps[j], ss[j])
            else:
                for i, (tb, vb) in zip(idx, data):
                    s = slots[i]
                    o = unroll(rule, theta, s.task.apply, s.params, s.task.buffers, s.state, tb, vb,
                               meta_loss, self.checkpoint)
                    outs[i] = (o.meta_loss, o.train_loss, o.params, o.state)
        return outs

    def meta_gradient(self, rule, theta, slots, meta_loss):
        outs = self.window_losses(rule, theta, slots, meta_loss)
        total = torch.stack([o[0] for o in outs]).mean()
        keys = list(theta)
        grads = torch.autograd.grad(total, [theta[k] for k in keys], allow_unused=True)
        grads = {k: (g if g is not None else torch.zeros_like(theta[k])) for k, g in zip(keys, grads)}
        return SchemeOutput(
            grads=grads,
            meta_losses=[float(o[0].detach()) for o in outs],
            train_losses=[float(o[1]) for o in outs],
            params=[tree_detach(o[2]) for o in outs],
            states=[tree_detach(o[3]) for o in outs],
            extras=[{} for _ in outs],
            inner_steps=self.truncation,
        )
