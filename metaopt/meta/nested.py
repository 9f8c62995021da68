"""Nested (truncated) scheme: n inner steps per outer step, backprop through the window.

Read it the way optax's lookahead reads: the "nested loop" is just a succession of updates.
Every outer step each slot runs ``truncation`` inner steps from where it stopped (its state
carries over), the meta-loss over that window is backpropagated to theta exactly (second order,
through the inner gradients), and theta takes one step. ``truncation = horizon`` gives full
(untruncated) unrolls; ``truncation = 1`` gives the greedy one-step scheme. Truncation biases the
meta-gradient toward short-horizon behaviour; ES/PES estimators trade that bias for variance.

Same-signature slots run as one ``torch.func.vmap`` call; different architectures loop
(metaopt.meta.engine).
"""
from __future__ import annotations

from typing import List

from metaopt.meta.engine import backprop_window, mean_meta_gradient
from metaopt.meta.schemes import Scheme, register_scheme
from metaopt.meta.slots import Slot
from metaopt.meta.unroll import UnrollOut, get_meta_loss


@register_scheme
class Nested(Scheme):
    """Nested truncated backprop: each slot runs ``truncation`` inner steps, the window's
    meta-loss is backpropagated to theta exactly."""
    name = "nested"

    def __init__(self, truncation: int = 20, use_vmap: bool = True, checkpoint: bool = False):
        if truncation < 1:
            raise ValueError(f"Invalid truncation: {truncation}")
        self.truncation = self.window = int(truncation)
        self.use_vmap, self.checkpoint = bool(use_vmap), bool(checkpoint)

    def config(self):
        return dict(truncation=self.truncation, use_vmap=self.use_vmap, checkpoint=self.checkpoint)

    def backprop_truncation(self, theta=None) -> int:
        return self.truncation

    def window_losses(self, rule, theta, slots: List[Slot], meta_loss) -> List[UnrollOut]:
        """Per-slot UnrollOut results (differentiable w.r.t. theta), in slot order."""
        return backprop_window(rule, theta, slots, self.truncation, get_meta_loss(meta_loss),
                               self.use_vmap, self.checkpoint)

    def estimate(self, rule, theta, slots, meta_loss):
        outs = self.window_losses(rule, theta, slots, meta_loss)
        return mean_meta_gradient(theta, outs), outs
