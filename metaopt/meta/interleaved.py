"""Interleaved (online) scheme: one inner step, then one outer step, alternating (``window = 1``).

Read it as the nested scheme with the loop structure turned inside out: instead of unrolling a
window of inner steps and backpropagating through it, every outer step advances each slot by a
single inner step and carries the meta-gradient *forward* in time.

Let ``z_t = (w_t, s_t)`` be a slot's fast weights and rule state (momenta, running moments; the
float tensors of the state) and ``z_{t+1} = Phi(z_t, theta; batch_t)`` one inner step. The
meta-loss of an outer step is the loss after that step, ``L(w_{t+1})`` (``valid_*``: on the
step's validation batch; ``train``: the step's own training batch re-evaluated), exactly as in
the nested scheme with ``truncation=1``.

``mode="forward"`` (exact sensitivities, real-time recurrent learning). Each slot carries the
sensitivity ``S_t = dz_t/dtheta`` in ``slot.extra`` (keys ``sens.p.<param>`` and
``sens.s.<state key>``, each ``[P, *shape]`` for the ``P`` meta-parameters) and propagates it
with forward-mode autodiff::

    S_{t+1} = dPhi/dz . S_t + dPhi/dtheta        (torch.func.jvp, vmapped over the P basis
    g_t     = dL(w_{t+1})/dw . S_{t+1}[w]          tangents of theta, second order through the
                                                    inner gradient)

The rule state's sensitivity is part of ``S`` (Adam's ``m, v``, SGD's momentum buffer), so
nothing is truncated (the step counter ``step`` is the one state entry without a sensitivity: it
does not depend on theta): while theta is held fixed, ``g_t`` is exactly the gradient of the loss
after ``t`` inner steps with respect to theta through the whole run since the slot's reset -- the
same number full backprop through ``t`` steps gives (tests/test_schemes.py checks this). In real
online use theta changes after every inner step, and ``S_t`` mixes Jacobians taken at past
thetas: that is the usual RTRL approximation (Williams & Zipser, 1989), exact only in the limit
of a vanishing outer learning rate. The cost is ``P`` Jacobian-vector products per inner step
and ``P`` copies of the slot's state in memory, so it suits rules with few meta-parameters
(``sgd``/``adam`` ``log_lr``, ``layerwise_lr``). ``slot.extra`` is empty after a slot reset, and
the sensitivities start from zero there (a fresh run's ``w_0`` does not depend on theta).

``mode="one_step"`` (greedy hypergradient). The sensitivity is truncated to the last step,
``S_t := 0`` before each step, so ``g_t = dL(w_{t+1})/dtheta`` with ``w_t`` and ``s_t`` held
fixed -- one reverse-mode pass, the same as ``Nested(truncation=1)`` (both are the engine's
``backprop_window``), and the cost of one inner
step whatever the number of meta-parameters (the choice for ``mlp``). Its bias: it ignores how
theta shaped ``w_t`` and the rule state through earlier steps, so it optimizes the one-step
decrease of the loss. That is the short-horizon bias of Wu et al. (2018): learning rates are
pushed toward the greedy optimum (too small on ill-conditioned problems, whose slow directions
pay off only over many steps), momentum-like effects are invisible (a momentum buffer's
dependence on theta is dropped), and schedules indexed by step only ever see the current row.

``mode="auto"`` picks ``forward`` when theta has at most ``max_forward_params`` entries and
``one_step`` otherwise.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch.func import jvp, vmap

from metaopt.meta.engine import (SlotGroup, backprop_window, mean_meta_gradient, run_slots,
                                 stack_dicts)
from metaopt.meta.schemes import Scheme, register_scheme
from metaopt.meta.slots import Slot
from metaopt.meta.unroll import MetaLoss, UnrollOut, unroll
from metaopt.types import Params

MODES = ("auto", "forward", "one_step")
SENS_P, SENS_S = "sens.p.", "sens.s."


def num_meta_params(theta: Params) -> int:
    return sum(v.numel() for v in theta.values())


def theta_basis(theta: Params) -> Dict[str, torch.Tensor]:
    """The P standard-basis tangents of theta, as a dict of ``[P, *shape]`` tensors."""
    P = num_meta_params(theta)
    ref = next(iter(theta.values()))
    eye = torch.eye(P, dtype=ref.dtype, device=ref.device)
    out, off = {}, 0
    for k, v in theta.items():
        out[k] = eye[:, off:off + v.numel()].reshape((P,) + tuple(v.shape))
        off += v.numel()
    return out


@register_scheme
class Interleaved(Scheme):
    """Online scheme: one inner step, then one outer step; the meta-gradient is carried
    forward (forward mode) or taken one step deep."""
    name = "interleaved"
    window = 1

    def __init__(self, mode: str = "auto", max_forward_params: int = 128, use_vmap: bool = True):
        if mode not in MODES:
            raise ValueError(f"Invalid mode: {mode!r} (use one of {', '.join(MODES)})")
        if max_forward_params < 0:
            raise ValueError(f"Invalid max_forward_params: {max_forward_params}")
        self.mode, self.max_forward_params = mode, int(max_forward_params)
        self.use_vmap = bool(use_vmap)

    def config(self):
        return dict(mode=self.mode, max_forward_params=self.max_forward_params,
                    use_vmap=self.use_vmap)

    def backprop_truncation(self, theta=None) -> int:
        """1 in one-step mode; forward mode has no backpropagated window."""
        if self.mode == "forward":
            raise ValueError("scheme=interleaved with mode=forward (use scheme.mode=one_step)")
        if theta is not None and self.resolve_mode(theta) != "one_step":
            raise ValueError("scheme=interleaved in forward mode (theta is small enough for "
                             "mode=auto to pick it: set scheme.mode=one_step)")
        return 1

    def resolve_mode(self, theta: Params) -> str:
        if self.mode != "auto":
            return self.mode
        return "forward" if num_meta_params(theta) <= self.max_forward_params else "one_step"

    def estimate(self, rule, theta, slots, meta_loss):
        if self.resolve_mode(theta) == "one_step":  # nothing is carried: the sensitivity is truncated
            outs = backprop_window(rule, theta, slots, 1, meta_loss, self.use_vmap)
            return mean_meta_gradient(theta, outs), outs
        return self._forward(rule, theta, slots, meta_loss)

    # -- exact forward-mode sensitivities ----------------------------------------------------------
    def _forward(self, rule, theta, slots: List[Slot], meta_loss: MetaLoss):
        th = {k: v.detach() for k, v in theta.items()}
        basis = theta_basis(th)
        dims = (0, 0, 0, 0, 0, 0 if meta_loss.needs_valid else None)

        def group_fn(g: SlotGroup):
            state0 = g.slots[0].state
            fkeys = [k for k, v in state0.items() if v.is_floating_point() and k != "step"]
            okeys = [k for k in state0 if k not in fkeys]
            sf0 = {k: g.state[k] for k in fkeys}
            so = {k: g.state[k] for k in okeys}

            # Transform order matters: vmap over tangents, then jvp, then vmap over slots innermost
            # (jvp inside a slot-vmap breaks one_hot on the per-slot step counter).
            def group_step(p, sf, th_):
                def one(p_, b_, sf_, so_, tb_, vb_):
                    o = unroll(rule, th_, g.apply, p_, b_, {**sf_, **so_}, tb_, vb_, meta_loss)
                    return ((o.params, {k: o.state[k] for k in fkeys}, o.meta_loss),
                            ({k: o.state[k] for k in okeys}, o.train_loss))
                return g.vmap(one, in_dims=dims)(p, g.buffers, sf, so, g.train, g.valid)

            def tangent(zp, zs, zt):
                return jvp(group_step, (g.params, sf0, th), (zp, zs, zt), has_aux=True)

            zp = stack_dicts([self._sens(s, SENS_P, s.params, basis) for s in g.slots])
            zs = stack_dicts([self._sens(s, SENS_S, {k: s.state[k] for k in fkeys}, basis)
                         for s in g.slots])
            prim, tan, aux = vmap(tangent, in_dims=(1, 1, 0))(zp, zs, basis)
            # primal outputs do not depend on the tangent: drop its (replicated) batch dim
            first = lambda d: {k: v[0] for k, v in d.items()}
            slot_major = lambda d: {k: v.movedim(0, 1) for k, v in d.items()}  # -> [K, P, ...]
            sfl, sot = first(prim[1]), first(aux[0])
            extra = {SENS_P + k: v for k, v in slot_major(tan[0]).items()}
            extra.update({SENS_S + k: v for k, v in slot_major(tan[1]).items()})
            state = {k: (sfl[k] if k in fkeys else sot[k]) for k in state0}
            out = UnrollOut(prim[2][0], aux[1][0], first(prim[0]), state, extra)
            return out, tan[2].movedim(0, 1)  # and this slot's meta-gradient [P]

        res = run_slots(slots, 1, meta_loss.needs_valid, group_fn, self.use_vmap)
        g = torch.stack([r[1] for r in res]).mean(0)  # [P]: mean over slots
        grads, off = {}, 0
        for k, v in th.items():
            grads[k] = g[off:off + v.numel()].reshape(v.shape).to(v.dtype)
            off += v.numel()
        return grads, [r[0] for r in res]

    @staticmethod
    def _sens(slot: Slot, prefix: str, like: Params, basis) -> Params:
        """The slot's carried sensitivity, or zeros after a reset (``slot.extra`` is empty)."""
        P = next(iter(basis.values())).shape[0]
        out = {}
        for k, v in like.items():
            z = slot.extra.get(prefix + k)
            if z is None:
                z = v.new_zeros((P,) + tuple(v.shape))
            elif tuple(z.shape) != (P,) + tuple(v.shape):
                raise ValueError(f"slot.extra[{prefix + k!r}] has shape {list(z.shape)}, expected "
                                 f"{[P, *v.shape]} (was the rule or theta changed mid-run?)")
            out[k] = z
        return out
