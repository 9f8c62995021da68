"""The vectorized slot engine: one window of every slot, same-signature slots as one vmapped call.

learned_optimization's ``VectorizedTruncatedStep`` is the model. A scheme says what one *stacked*
group of slots computes over a window (``group_fn``: anything whose tensors carry a leading slot
dim, usually a :class:`~metaopt.meta.unroll.UnrollOut`); the engine does the rest, the same way
for every scheme:

1. group the slots by task signature (same architecture -> one vmapped call; others loop),
2. draw each slot's window of batches from the slot's own generator (so a resumed checkpoint
   draws the same batches, and a scheme may draw more -- ES noise -- after them),
3. stack params, buffers, rule state and batches along a leading slot dim,
4. call ``group_fn`` once per group and hand back one result per slot, in slot order.

:meth:`SlotGroup.vmap` is the vmap over the slot dim; ES/PES put a vmap over their particles
inside it, so perturbed runs of every slot are one batched call too.
"""
from __future__ import annotations

import logging
import shutil
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
from torch import Tensor

from metaopt.meta.slots import Slot
from metaopt.meta.unroll import (MetaLoss, UnrollOut, batched, inner_step, stacked_unroll,
                                 tree_map, unroll)
from metaopt.types import Batch, Params, State


def _draw(slot: Slot, split: str, n: int, keep_last: bool = False):
    """``n`` batches of ``split`` from the slot's task and generator (``Task.sample_batches``)."""
    return slot.task.sample_batches(split, n, slot.gen, keep_last)


def sample_window(slot: Slot, T: int, need_valid: bool, last_valid: bool = False):
    """T training batches (and T validation batches) from the slot's generator, stacked [T, ...].
    ``last_valid``: the same draws, but only the last validation batch is kept ([1, ...]; for a
    meta-loss that reads only the window's last step, so memory does not grow with T)."""
    batches = _draw(slot, "train", T)
    valid = _draw(slot, "valid", T, keep_last=last_valid) if need_valid else None
    return batches, valid


class LazyWindow:
    """The training batches of a window for K slots, regenerated on demand instead of stored.

    Built by drawing each slot's T batches exactly as :func:`sample_window` does (so the slot's
    generator ends where it would), keeping only a snapshot of the generator state every ``block``
    steps; :meth:`at` redraws the block holding step k from its snapshot (a twin generator) and
    caches that one block. Memory: K x (T / block snapshots + block batches) instead of K x T
    batches; a block is redrawn when a pass enters it (forward, then the adjoint's backward)."""

    def __init__(self, tasks, snapshots, T: int, block: int):
        self.tasks, self.snapshots, self.T, self.block = tasks, snapshots, T, block
        self._b, self._cache = None, None

    @staticmethod
    def snapshot_draws(slot: Slot, T: int, block: int) -> list:
        snaps = []
        for t in range(T):
            if t % block == 0:
                snaps.append(slot.gen.get_state())
            slot.task.sample_batch("train", slot.gen)
        return snaps

    def at(self, k: int):
        """Step k's batch of every slot, stacked [K, ...]."""
        b = k // self.block
        if b != self._b:
            n = min(self.block, self.T - b * self.block)
            per_slot = []
            for task, snaps in zip(self.tasks, self.snapshots):
                gen = torch.Generator(device=snaps[b].device)
                gen.set_state(snaps[b])
                per_slot.append([task.sample_batch("train", gen) for _ in range(n)])
            self._cache = tuple(torch.stack([torch.stack([bt[q] for bt in bs]) for bs in per_slot])
                                for q in range(len(per_slot[0][0])))     # [K, n, ...] per part
            self._b = b
        return tuple(x[:, k - b * self.block] for x in self._cache)


def group_by_signature(slots: List[Slot]) -> List[List[int]]:
    """Indices of slots whose tasks can be vmapped together, in first-seen order."""
    groups: Dict[object, List[int]] = {}
    for i, s in enumerate(slots):
        groups.setdefault(s.task.signature, []).append(i)
    return list(groups.values())


def stack_dicts(dicts: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    """Stack along a new dim 0; a lone dict gets a view (no copy: nothing here writes in place,
    and a forward-mode sensitivity is large)."""
    if len(dicts) == 1:
        return {k: v.unsqueeze(0) for k, v in dicts[0].items()}
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]} if dicts else {}


class SlotGroup(NamedTuple):
    """K same-signature slots, their current inner state and their window, stacked on dim 0."""
    slots: List[Slot]
    apply: Callable        # the group's loss function (one for all: same signature)
    params: Params         # [K, ...]
    buffers: Params        # [K, ...] ({} when the task has none)
    state: State           # [K, ...]
    train: Batch           # [K, T, ...]
    valid: Optional[Batch]  # [K, T, ...] or None when the meta-loss reads no validation batch

    @property
    def size(self) -> int:
        return len(self.slots)

    def vmap(self, fn: Callable, in_dims=0) -> Callable:
        """``fn`` over the slot dim: ``torch.func.vmap``, or for a lone slot one plain call (what
        an unbatched unroll computes, without vmap's overhead). Outputs get the slot dim either
        way."""
        return batched(fn, self.size, in_dims)


def stack_group(slots: List[Slot], T: int, need_valid: bool, last_valid: bool = False,
                lazy_block: int = 0) -> SlotGroup:
    """``lazy_block > 0``: ``train`` is a :class:`LazyWindow` (same draws, nothing stored)."""
    task = slots[0].task
    if lazy_block > 0:
        snaps, windows = [], []
        for s in slots:  # per slot: its train draws, then its valid draws (sample_window's order)
            snaps.append(LazyWindow.snapshot_draws(s, T, lazy_block))
            windows.append((None, _draw(s, "valid", T, keep_last=last_valid) if need_valid
                            else None))
        train = LazyWindow([s.task for s in slots], snaps, T, lazy_block)
    else:
        windows = [sample_window(s, T, need_valid, last_valid) for s in slots]
    # a lone slot's window is a view, not a copy
    stack = lambda parts: tuple(x[0].unsqueeze(0) if len(x) == 1 else torch.stack(x)
                                for x in zip(*parts))
    if lazy_block <= 0:
        train = stack([w[0] for w in windows])
    return SlotGroup(slots=slots, apply=task.apply,
                     params=stack_dicts([s.params for s in slots]),
                     buffers=stack_dicts([s.task.buffers for s in slots]) if task.buffers else {},
                     state=stack_dicts([s.state for s in slots]),
                     train=train,
                     valid=stack([w[1] for w in windows]) if need_valid else None)


def run_slots(slots: List[Slot], T: int, need_valid: bool, group_fn: Callable[[SlotGroup], object],
              use_vmap: bool = True, last_valid: bool = False, lazy_block: int = 0) -> list:
    """``group_fn`` over every signature group (singletons when ``use_vmap=False``); one result
    per slot, in slot order (the slot dim indexed away). ``last_valid``: see :func:`sample_window`
    (the group's ``valid`` is then [K, 1, ...]); ``lazy_block``: see :func:`stack_group`."""
    results: list = [None] * len(slots)
    groups = group_by_signature(slots) if use_vmap else [[i] for i in range(len(slots))]
    for idx in groups:
        out = group_fn(stack_group([slots[i] for i in idx], T, need_valid, last_valid, lazy_block))
        for j, i in enumerate(idx):
            results[i] = tree_map(lambda t: t[j], out)
    return results


# -- the backprop estimator, shared by nested (a T-step window) and interleaved one-step (T = 1) --
def backprop_window(rule, theta: Params, slots: List[Slot], T: int, meta_loss: MetaLoss,
                    use_vmap: bool = True, checkpoint: bool = False,
                    stacked: bool = True) -> List[UnrollOut]:
    """Per-slot :class:`UnrollOut` of a T-step window, differentiable w.r.t. theta.

    ``stacked=True`` (without ``checkpoint``) runs the group through
    :func:`~metaopt.meta.unroll.stacked_unroll` (inner gradients by plain autograd on the
    stacked tasks); ``stacked=False`` vmaps :func:`~metaopt.meta.unroll.unroll` over the slots.
    Same numbers either way."""
    def group_fn(g: SlotGroup) -> UnrollOut:
        if stacked and not checkpoint:
            return stacked_unroll(rule, theta, g.apply, g.params, g.buffers, g.state, g.train,
                                  g.valid, meta_loss)
        fn = lambda p, b, s, tb, vb: unroll(rule, theta, g.apply, p, b, s, tb, vb, meta_loss,
                                            checkpoint)
        dims = (0, 0, 0, 0, 0 if meta_loss.needs_valid else None)
        return g.vmap(fn, in_dims=dims)(g.params, g.buffers, g.state, g.train, g.valid)
    return run_slots(slots, T, meta_loss.needs_valid, group_fn, use_vmap)


def mean_meta_gradient(theta: Params, outs: List[UnrollOut]) -> Dict[str, Tensor]:
    """d mean_slots(meta_loss) / d theta; zeros for entries that do not require (or get) a grad."""
    total = torch.stack([o.meta_loss for o in outs]).mean()
    keys = [k for k in theta if theta[k].requires_grad]
    found = {}
    if keys and total.requires_grad:
        found = dict(zip(keys, torch.autograd.grad(total, [theta[k] for k in keys],
                                                   allow_unused=True)))
    return {k: found[k] if found.get(k) is not None else torch.zeros_like(theta[k]) for k in theta}


# -- torch.compile of the inner step ---------------------------------------------------------------
log = logging.getLogger("metaopt.compile")
_COMPILED: Dict[tuple, Callable] = {}


def compiler_available() -> bool:
    """Whether a C++ compiler for inductor is on PATH (torch.compile on CPU generates C++):
    ``$CXX``, else g++ / c++ / clang++ (inductor's own search)."""
    import os
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return any(shutil.which(n) for n in names)


def _eager_step(rule, apply_fn, meta_loss: MetaLoss) -> Callable:
    def step(theta, params, buffers, state, batch, valid):
        params, state, loss = inner_step(rule, theta, apply_fn, params, buffers, state, batch)
        return params, state, loss, meta_loss(apply_fn, params, buffers, batch, valid)
    return step


def compiled_step(rule, task, meta_loss: MetaLoss) -> Callable:
    """One inner step of ONE task and its meta-loss term, ``(theta, params, buffers, state,
    batch, valid) -> (params, state, loss, score)``, compiled by ``torch.compile`` (inductor, C++
    on CPU) once per (rule config, task signature, meta-loss) and cached; the eager step, with
    one log line saying why, when no C++ compiler is present or compilation fails.
    ``step.ran_compiled()`` tells which: True once a call has run the compiled graph.

    One task at a time, not the vmapped group: under ``torch.func.vmap`` inside a compiled region
    this torch's inductor miscomputes ``index_add`` (found with the ``mlp`` rule's former
    per-tensor normalization; ``segment_mean`` and the ``pertensor`` rule still use it): wrong
    numbers, so the slot vmap is not compiled.
    """
    key = (rule.name, repr(sorted(rule.config().items())), task.signature, meta_loss.name)
    if key in _COMPILED:
        return _COMPILED[key]
    eager = _eager_step(rule, task.apply, meta_loss)
    eager.ran_compiled = lambda: False
    if not compiler_available():
        log.warning("metaopt: compile requested but no C++ compiler found; running eager")
        _COMPILED[key] = eager
        return eager
    import torch._dynamo
    fn = torch.compile(eager, dynamic=False)
    state = {"ok": None}

    def step(*args):
        if state["ok"] is False:
            return eager(*args)
        try:
            # segment ids / counts are data-dependent-shape ops (repeat_interleave, bincount)
            with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True,
                                            capture_scalar_outputs=True):
                out = fn(*args)
            state["ok"] = True
            return out
        except Exception as e:  # noqa: BLE001 -- any compile failure falls back, once, loudly
            log.warning("metaopt: torch.compile of the inner step failed (%s: %s); running eager",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            state["ok"] = False
            return eager(*args)
    step.ran_compiled = lambda: state["ok"] is True  # False before a call and after a fallback
    _COMPILED[key] = step
    return step


def run_compiled(step: Callable, theta: Params, params: Params, buffers: Params, state,
                 batches, valid_batches, meta_loss: MetaLoss) -> UnrollOut:
    """One task's window through ``step`` (from :func:`compiled_step`): what :func:`unroll`
    computes."""
    T = batches[0].shape[0]
    scores, losses = [], []
    for t in range(T):
        vb = tuple(b[t] for b in valid_batches) if meta_loss.needs_valid else None
        params, state, loss, score = step(theta, params, buffers, state,
                                          tuple(b[t] for b in batches), vb)
        losses.append(loss)
        if meta_loss.reads(t, T):
            scores.append(score)
    return UnrollOut(torch.stack(scores).mean(), torch.stack(losses).mean().detach(), params, state)
