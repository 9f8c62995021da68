"""Interleaved (online) scheme: one inner step, then one outer step, alternating (``window = 1``).

Read it as the nested scheme with the loop structure turned inside out: instead of unrolling a
window of inner steps and backpropagating through it, every outer step advances each slot by a
single inner step and carries the meta-gradient *forward* in time.

Let ``z_t = (w_t, s_t)`` be a slot's fast weights and rule state (momenta, running moments; the
float tensors of the state) and ``z_{t+1} = Phi(z_t, theta; batch_t)`` one inner step. The
meta-loss of an outer step is the loss after that step, ``L(w_{t+1})`` (``valid_*``: on the
step's validation batch; ``train``: the step's own training batch re-evaluated), exactly as in
:class:`metaopt.meta.nested.Nested` with ``truncation=1``.

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
fixed -- one reverse-mode pass, the same as ``Nested(truncation=1)``, and the cost of one inner
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

from metaopt.meta.nested import Nested, sample_window
from metaopt.meta.schemes import Scheme, SchemeOutput, register_scheme
from metaopt.meta.slots import Slot, group_by_signature, stack_dicts, unstack_dict
from metaopt.meta.unroll import unroll
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
    name = "interleaved"
    window = 1

    def __init__(self, mode: str = "auto", max_forward_params: int = 128, use_vmap: bool = True):
        if mode not in MODES:
            raise ValueError(f"Invalid mode: {mode!r} (use one of {', '.join(MODES)})")
        if max_forward_params < 0:
            raise ValueError(f"Invalid max_forward_params: {max_forward_params}")
        self.mode, self.max_forward_params = mode, int(max_forward_params)
        self.use_vmap = bool(use_vmap)
        self._one_step = Nested(truncation=1, use_vmap=use_vmap)

    def config(self):
        return dict(mode=self.mode, max_forward_params=self.max_forward_params,
                    use_vmap=self.use_vmap)

    def resolve_mode(self, theta: Params) -> str:
        if self.mode != "auto":
            return self.mode
        return "forward" if num_meta_params(theta) <= self.max_forward_params else "one_step"

    def meta_gradient(self, rule, theta, slots, meta_loss):
        if self.resolve_mode(theta) == "one_step":
            out = self._one_step.meta_gradient(rule, theta, slots, meta_loss)
            out.extras = [{} for _ in slots]  # nothing is carried: the sensitivity is truncated
            return out
        return self._forward(rule, theta, slots, meta_loss)

    # -- exact forward-mode sensitivities ----------------------------------------------------------
    def _forward(self, rule, theta, slots: List[Slot], meta_loss: str) -> SchemeOutput:
        th = {k: v.detach() for k, v in theta.items()}
        basis = theta_basis(th)
        need_valid = meta_loss.startswith("valid")
        groups = group_by_signature(slots) if self.use_vmap else [[i] for i in range(len(slots))]
        res = [None] * len(slots)
        for idx in groups:
            task = slots[idx[0]].task
            state0 = slots[idx[0]].state
            fkeys = [k for k, v in state0.items() if v.is_floating_point() and k != "step"]
            okeys = [k for k in state0 if k not in fkeys]
            data = [sample_window(slots[i], 1, need_valid) for i in idx]
            n = len(idx)
            bufs = stack_dicts([slots[i].task.buffers for i in idx]) if task.buffers else {}
            so = stack_dicts([{k: slots[i].state[k] for k in okeys} for i in idx]) if okeys else {}
            tb = tuple(torch.stack(x) for x in zip(*[d[0] for d in data]))
            vb = tuple(torch.stack(x) for x in zip(*[d[1] for d in data])) if need_valid else None

            # Transform order matters: vmap over tangents, then jvp, then vmap over slots innermost
            # (jvp inside a slot-vmap breaks one_hot on the per-slot step counter).
            def group_step(p, sf, th_):
                def one(p_, b_, sf_, so_, tb_, vb_):
                    o = unroll(rule, th_, task.apply, p_, b_, {**sf_, **so_}, tb_, vb_, meta_loss)
                    return ((o.params, {k: o.state[k] for k in fkeys}, o.meta_loss),
                            ({k: o.state[k] for k in okeys}, o.train_loss))
                return vmap(one, in_dims=(0, 0, 0, 0, 0, 0 if need_valid else None))(
                    p, bufs, sf, so, tb, vb)

            def tangent(zp, zs, zt):
                return jvp(group_step, (p0, sf0, th), (zp, zs, zt), has_aux=True)

            p0 = stack_dicts([slots[i].params for i in idx])
            sf0 = stack_dicts([{k: slots[i].state[k] for k in fkeys} for i in idx]) if fkeys else {}
            zp = stack_dicts([self._sens(slots[i], SENS_P, slots[i].params, basis) for i in idx])
            zs = stack_dicts([self._sens(slots[i], SENS_S, {k: slots[i].state[k] for k in fkeys},
                                         basis) for i in idx]) if fkeys else {}
            prim, tan, aux = vmap(tangent, in_dims=(1, 1, 0))(zp, zs, basis)
            # primal outputs do not depend on the tangent: drop its (replicated) batch dim
            first = lambda d: {k: v[0] for k, v in d.items()}
            params, sfl, ml = first(prim[0]), first(prim[1]), prim[2][0]
            sot, tl = first(aux[0]), aux[1][0]
            slot_major = lambda d: {k: v.movedim(0, 1) for k, v in d.items()}  # -> [K, P, ...]
            tp, ts, tml = slot_major(tan[0]), slot_major(tan[1]), tan[2].movedim(0, 1)
            per = [unstack_dict(d, n) if d else [{}] * n for d in (params, sfl, sot, tp, ts)]
            for j, i in enumerate(idx):
                extra = {SENS_P + k: v.clone() for k, v in per[3][j].items()}
                extra.update({SENS_S + k: v.clone() for k, v in per[4][j].items()})
                state = {k: (per[1][j][k] if k in fkeys else per[2][j][k]).clone() for k in state0}
                res[i] = (ml[j], tl[j], {k: v.clone() for k, v in per[0][j].items()}, state,
                          extra, tml[j])
        g = torch.stack([r[5] for r in res]).mean(0)  # [P]: mean over slots
        grads, off = {}, 0
        for k, v in th.items():
            grads[k] = g[off:off + v.numel()].reshape(v.shape).to(v.dtype)
            off += v.numel()
        return SchemeOutput(grads=grads, meta_losses=[float(r[0]) for r in res],
                            train_losses=[float(r[1]) for r in res], params=[r[2] for r in res],
                            states=[r[3] for r in res], extras=[r[4] for r in res], inner_steps=1)

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
