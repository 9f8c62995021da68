"""Local meta-gradients: the meta-loss as a sum of per-block local losses, backpropagated one block
at a time, so the backward pass of the unroll never holds more than one block's graph.

A task with local heads (:class:`metaopt.tasks.local.LocalTask`) is cut into blocks ``l = 1..L``,
each with its own local loss ``local_l`` (the last block's is the task's own loss). With
``local.meta``:

* ``global``: the meta-loss scores the task's end loss (heads unused) through the wrapped scheme's
  own estimator: what every scheme does today;
* ``local``: ``M = sum_l weight_l * M_l`` where ``M_l`` is the scheme's meta-loss (mean / log /
  last, on the validation batch or the train batch re-evaluated) of ``local_l`` after each inner
  step, and the meta-gradient is ``sum_l dM_l/dtheta`` *with every other block's trajectory held
  constant* (the graph is cut between blocks). With ``local.inner=local`` a block's inner
  gradient reads only its own parameters and its (detached) input, so the blocks run in order, each
  over the whole window: block ``l``'s T steps -- its parameters and its slice of the rule state
  only -- run differentiably from block ``l-1``'s recorded outputs, its ``M_l`` is backpropagated
  into theta and its graph freed, and its detached outputs are what block ``l+1`` reads. That one
  pass *is* the window (the slots advance along the network's actual trajectory), and peak memory
  is that of the largest block's window, not the network's. With ``inner=global``/``mixed`` a
  block's inner gradient reads the blocks above it: the window first runs once without a graph,
  recording every block's input and all parameters at every step; then each block's part is
  re-run with the others' recorded parameters as constants (correct, but the re-run's forward is
  the whole network's, so the memory saving is smaller);
* ``mixed``: ``(1 - mix) * global + mix * local``, both on the same window (same batches).

``local``/``mixed`` need a rule whose update acts on each tensor alone (``pertensor``, ``adam``,
``sgd``, ``mlp`` without loss/activation features): a block's update must not read other blocks.
They work with ``scheme=nested`` (vmap meta-batch included; ``checkpoint`` is not needed) and
``scheme=interleaved`` in its ``one_step`` mode; other schemes fail with a one-line error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch import Tensor
from torch.func import grad_and_value

from metaopt.meta.engine import SlotGroup, run_slots
from metaopt.meta.schemes import Scheme
from metaopt.meta.slots import Slot
from metaopt.meta.unroll import MetaLoss, UnrollOut, get_meta_loss, inner_step
from metaopt.types import FlatSpec, Params

META_MODES = ("global", "local", "mixed")


@dataclass(frozen=True)
class EndMetaLoss(MetaLoss):
    """The scheme's meta-loss on the task's own (end) loss, whatever the inner loss is: the
    engine hands a meta-loss the inner ``apply``; a :class:`LocalTask`'s ``end_loss`` replaces it."""

    @classmethod
    def of(cls, ml: MetaLoss) -> "EndMetaLoss":
        return ml if isinstance(ml, EndMetaLoss) else cls(ml.name, ml.split, ml.log, ml.last_only)

    def __call__(self, apply_fn, params, buffers, train_batch, valid_batch):
        end = getattr(getattr(apply_fn, "__self__", None), "end_loss", None)
        return MetaLoss.__call__(self, end or apply_fn, params, buffers, train_batch, valid_batch)


def check_rule(rule, meta: str) -> None:
    if rule.needs_activations or rule.needs_loss or rule.spec_dependent:
        raise ValueError(f"local.meta={meta!r} needs a rule whose update acts on each tensor alone; "
                         f"rule {rule.name!r} reads loss/activation features or the parameter spec "
                         f"(use pertensor, adam, sgd, or mlp with act_features/loss_features false)")


def slice_state(state: Params, idx: Tensor, numel: int) -> Params:
    """The entries of a flat rule state (last dim = all coordinates) at ``idx``; scalars kept."""
    return {k: v.index_select(-1, idx.to(v.device)) if (v.dim() >= 1 and v.shape[-1] == numel) else v
            for k, v in state.items()}


def block_index(params: Params, names: List[str]) -> Tensor:
    """Flat positions (in ``FlatSpec.of(params)`` order) of the entries ``names``."""
    spec, out, off = FlatSpec.of(params), [], 0
    for n, k in zip(spec.names, spec.numels):
        if n in names:
            out.append(torch.arange(off, off + k))
        off += k
    return torch.cat(out)


def local_window(rule, theta: Params, slots: List[Slot], T: int, ml: MetaLoss,
                 use_vmap: bool = True):
    """(meta-gradient, per-slot UnrollOut) of ``local.meta=local`` over a T-step window."""
    K = len(slots)
    keys = [k for k in theta if theta[k].requires_grad]
    grads = {k: torch.zeros_like(theta[k]) for k in theta}
    th_const = {k: v.detach() for k, v in theta.items()}
    vdim = 0 if ml.needs_valid else None

    def accumulate(L: Tensor) -> None:
        """grads += d(mean over the meta-batch of L) / d theta; L's graph is freed after."""
        if keys and L.requires_grad:
            found = torch.autograd.grad(L.sum() / K, [theta[k] for k in keys], allow_unused=True)
            for k, d in zip(keys, found):
                if d is not None:
                    grads[k] = grads[k] + d

    def group_fn(g: SlotGroup) -> UnrollOut:
        task = g.slots[0].task
        if not hasattr(task, "block_loss"):
            raise ValueError(f"local.meta=local needs local heads: task {task!r} has none "
                             f"(build the family with local heads, e.g. metaopt-train local=local)")
        if task.inner == "local":
            return _greedy_group(g, task)
        need_params = True

        # 1) the actual trajectory, no graph: each block's input at every step (train batch at
        #    w_t; meta-loss batch at w_{t+1}) and, when blocks read each other, all params
        def traj(p, b, s, tb, vb):
            xs, xm, ps, losses = [], [], [], []
            for t in range(T):
                batch = tuple(x[t] for x in tb)
                xs.append(task.block_inputs(p, b, batch[0])[:-1])
                if need_params:
                    ps.append(p)
                p, s, loss = inner_step(rule, th_const, g.apply, p, b, s, batch)
                losses.append(loss)
                if ml.reads(t, T):
                    mb = tuple(x[t] for x in vb) if ml.needs_valid else batch
                    xm.append(task.block_inputs(p, b, mb[0])[:-1])
            stack = lambda seq: tuple(torch.stack(z) for z in zip(*seq))
            pst = {k: torch.stack([q[k] for q in ps]) for k in p} if need_params else {}
            return p, s, torch.stack(losses).mean(), stack(xs), stack(xm), pst

        with torch.no_grad():
            p_end, s_end, train_loss, xs, xm, pst = g.vmap(traj, in_dims=(0, 0, 0, 0, vdim))(
                g.params, g.buffers, g.state, g.train, g.valid)

        # 2) block by block: re-run the block's part of the window, backprop, free
        reads = [t for t in range(T) if ml.reads(t, T)]
        y_train = g.train[1]
        y_meta = (g.valid[1] if ml.needs_valid else g.train[1])[:, reads]
        p0 = {k: v[0] for k, v in g.params.items()}
        numel = FlatSpec.of(p0).numel
        meta_total = torch.zeros(g.size, dtype=train_loss.dtype, device=train_loss.device)
        for l in range(task.num_blocks):
            names = [k for k in g.params if k in set(task.block_names(l))]
            idx = block_index(p0, names)
            w = task.block_weight(l)

            def block_run(p, b, s, x_l, y, xm_l, ym, tb, pt):
                pl = {k: p[k] for k in names}
                sl = slice_state(s, idx, numel)
                metas = []
                for t in range(T):
                    if need_params:  # the blocks this one reads enter as recorded constants
                        others = {k: v[t] for k, v in pt.items() if k not in pl}
                        batch = tuple(z[t] for z in tb)
                        fn = lambda q: g.apply({**others, **q}, b, batch)
                    else:
                        fn = lambda q: w * task.block_loss(l, q, b, x_l[t], y[t])
                    gr, loss = grad_and_value(fn)(pl)
                    upd, sl = rule.update(theta, gr, sl, pl, {"loss": loss, "act": None})
                    pl = {k: pl[k] + upd[k].to(pl[k].dtype) for k in pl}
                    if t in reads:
                        j = reads.index(t)
                        v = task.block_loss(l, pl, b, xm_l[j], ym[j])
                        metas.append(torch.log(v) if ml.log else v)
                return w * torch.stack(metas).mean()

            L = g.vmap(block_run, in_dims=(0, 0, 0, 0, 0, 0, 0, 0, 0))(
                g.params, g.buffers, g.state, xs[l], y_train, xm[l], y_meta, g.train, pst)
            accumulate(L)
            meta_total = meta_total + L.detach()
            del L
        return UnrollOut(meta_total, train_loss, p_end, s_end)

    def _greedy_group(g: SlotGroup, task) -> UnrollOut:
        # inner=local: block l's inner gradient reads only its own params and its input, and its
        # input trajectory is block l-1's output trajectory. So one pass over the blocks, in order,
        # is the whole window: block l's T steps run differentiably from block l-1's recorded
        # outputs, its meta-loss is backpropagated and its graph freed, and its own outputs (train
        # batch at w_t, meta batch at w_{t+1}; detached) are what block l+1 reads.
        reads = [t for t in range(T) if ml.reads(t, T)]
        x_train = g.train[0]
        x_meta = (g.valid[0] if ml.needs_valid else g.train[0])[:, reads]
        y_train = g.train[1]
        y_meta = (g.valid[1] if ml.needs_valid else g.train[1])[:, reads]
        p0 = {k: v[0] for k, v in g.params.items()}
        numel = FlatSpec.of(p0).numel
        p_end, s_end = {}, dict(g.state)
        meta_total = train_total = 0.0
        for l in range(task.num_blocks):
            names = [k for k in g.params if k in set(task.block_names(l))]
            idx = block_index(p0, names)
            w = task.block_weight(l)

            def block_run(p, b, s, x_l, y, xm_l, ym):
                pl = {k: p[k] for k in names}
                sl = slice_state(s, idx, numel)
                metas, losses, outs, outs_m = [], [], [], []
                for t in range(T):
                    def fn(q):
                        loss, h = task.block_loss_out(l, q, b, x_l[t], y[t])
                        return w * loss, h
                    gr, (loss, h) = grad_and_value(fn, has_aux=True)(pl)
                    outs.append(h.detach())
                    losses.append(loss.detach())
                    upd, sl = rule.update(theta, gr, sl, pl, {"loss": loss, "act": None})
                    pl = {k: pl[k] + upd[k].to(pl[k].dtype) for k in pl}
                    if t in reads:
                        j = reads.index(t)
                        v, hm = task.block_loss_out(l, pl, b, xm_l[j], ym[j])
                        outs_m.append(hm.detach())
                        metas.append(torch.log(v) if ml.log else v)
                return (w * torch.stack(metas).mean(), torch.stack(losses).mean(), pl, sl,
                        torch.stack(outs), torch.stack(outs_m))

            L, tl, pl, sl, x_train, x_meta = g.vmap(block_run, in_dims=(0, 0, 0, 0, 0, 0, 0))(
                g.params, g.buffers, g.state, x_train, y_train, x_meta, y_meta)
            accumulate(L)
            meta_total = meta_total + L.detach()
            train_total = train_total + tl
            p_end.update({k: v.detach() for k, v in pl.items()})
            for k, v in sl.items():
                v = v.detach()
                s_end[k] = s_end[k].index_copy(-1, idx.to(v.device), v) if (
                    s_end[k].dim() >= 2 and s_end[k].shape[-1] == numel) else v
            del L, pl, sl
        return UnrollOut(meta_total, train_total, {k: p_end[k] for k in g.params}, s_end)

    outs = run_slots(slots, T, ml.needs_valid, group_fn, use_vmap)
    return grads, outs


class LocalMeta(Scheme):
    """A scheme with ``local.meta`` applied (see the module docstring); name and window are the
    wrapped scheme's, so checkpoints and logs read as before."""

    def __init__(self, base: Scheme, meta: str = "local", mix: float = 0.5):
        if meta not in META_MODES:
            raise ValueError(f"Invalid local.meta: {meta!r} (use one of {', '.join(META_MODES)})")
        if not 0.0 <= float(mix) <= 1.0:
            raise ValueError(f"Invalid local.mix: {mix} (must be in [0, 1])")
        self.base, self.meta, self.mix = base, meta, float(mix)
        if meta != "global":
            self._truncation(None)   # fail at construction where the scheme already says no
        self.name, self.window, self.use_vmap = base.name, base.window, base.use_vmap

    def config(self) -> dict:
        return self.base.config()

    def _truncation(self, theta) -> int:
        try:
            return self.base.backprop_truncation(theta)
        except ValueError as err:
            raise ValueError(f"local.meta={self.meta!r} is not supported by {err}") from None

    def estimate(self, rule, theta, slots, meta_loss):
        ml = get_meta_loss(meta_loss)
        if self.meta == "global":
            return self.base.estimate(rule, theta, slots, EndMetaLoss.of(ml))
        check_rule(rule, self.meta)
        T = self._truncation(theta)
        if self.meta == "local":
            return local_window(rule, theta, slots, T, ml, self.use_vmap)
        # mixed: both estimators on the same window (the slots' generators replayed)
        gens = [s.gen.get_state() for s in slots]
        g_glob, _ = self.base.estimate(rule, theta, slots, EndMetaLoss.of(ml))
        for s, st in zip(slots, gens):
            s.gen.set_state(st)
        g_loc, outs = local_window(rule, theta, slots, T, ml, self.use_vmap)
        return {k: (1 - self.mix) * g_glob[k] + self.mix * g_loc[k] for k in theta}, outs
