"""Evolution-strategies meta-gradient estimators on the nested discretization: ES and PES.

Same loop as :class:`metaopt.meta.nested.Nested` -- every outer step each slot runs
``truncation`` inner steps from where it stopped and theta takes one step -- but the
meta-gradient comes from loss *differences* of perturbed thetas, never from backprop through the
unroll (everything runs under ``torch.no_grad``). That is the point: no second-order graph, no
memory growing with the window, and no exploding gradients through long or chaotic unrolls
(a rule that makes the meta-loss landscape rough is smoothed at scale ``sigma`` instead).

**ES** (antithetic, Salimans et al. 2017). For ``i = 1..N`` (``num_samples``) draw
``e_i ~ N(0, sigma^2 I)`` over the flattened theta and run the window twice from the slot's
current state, with ``theta + e_i`` and ``theta - e_i`` on the same batches::

    g = 1 / (2 N sigma^2) * sum_i (L(theta + e_i) - L(theta - e_i)) e_i

an unbiased estimate of the gradient of the Gaussian-smoothed window loss
``E_e L(theta + e)`` (= the true window gradient up to O(sigma^2) for a smooth loss). Like
truncated backprop it only sees one window: the state at the window's start is treated as
fixed, so it inherits the truncation (short-horizon) bias.

**PES** (persistent ES, Vicol et al. 2021) removes that bias. Each slot keeps, for every sample,
two persistent particles -- inner runs that have used ``theta + e`` resp. ``theta - e`` in every
truncation since the slot's reset -- and the sum ``xi_i`` of the perturbations their run has
seen. Each truncation draws fresh ``e_i``, advances both particles one window, sets
``xi_i += e_i`` and uses::

    g = 1 / (2 N sigma^2) * sum_i (L(particle+_i) - L(particle-_i)) xi_i

which is unbiased (up to the smoothing) for the gradient of the current window's loss with
respect to a theta shared by *all* truncations since the reset; summed over a run's truncations
it estimates the full-unroll gradient (tests/test_schemes.py checks it against backprop through
the whole run). The price is variance growing with the number of truncations since the reset.
The particles' params and rule states and ``xi`` live in ``slot.extra`` (keys ``pes.xi``,
``pes.pos.p.<param>``, ``pes.pos.s.<state>``, ``pes.neg.*``) so a checkpoint resumes them
exactly; after a slot reset ``slot.extra`` is empty and both particles restart from the slot's
fresh weights with ``xi = 0``.

What the slot itself holds after the window (what the trainer logs, checks for divergence and
resets) is chosen by ``theta_run``:

* ``theta_run=True`` (default): each slot also advances its own unperturbed run (theta) one
  window on the same batches: the logged meta-loss is the loss at theta, comparable with other
  schemes, and ES's next window starts from the theta run. It costs one more run per slot
  (``2N + 1`` instead of ``2N``: 1.5x the work with one pair per slot).
* ``theta_run=False``: no extra run. The slot's params/state are the mean over its ``2N``
  particles (the mean of each antithetic pair is the theta run up to ``O(sigma^2)``), its logged
  meta-loss and train loss the mean of the particles' (the Gaussian-smoothed loss, not the loss
  at theta). ES's next window then starts from that mean state. The estimate of a window is the
  same formula either way.

Perturbations come from the slot's own generator (after its batches), so a checkpoint/resume
reproduces them.

Every run of every slot of a signature group -- ``K`` slots x ``2N`` particles (``+1``) -- is ONE
flat ``torch.func.vmap`` call: theta, params, state and the (shared, per-slot) batches are laid
out on one leading ``K * R`` dim, so each inner op is one batched kernel and no vmap nests
inside another. Antithetic pairs (and the theta run) share their slot's batches.

``compile=True`` runs the ``K * R`` runs one after another through a ``torch.compile``d
single-task inner step instead (:func:`metaopt.meta.engine.compiled_step`: compiled once per
signature, eager with a warning when no C++ compiler is found); the same numbers up to float
rounding. On the bench_peers problem (benchmarks/bench_peers.py) it was faster than the eager vmap
in one run of three and slower in the other two, and each new signature first pays its compile,
so it is off by default.
"""
from __future__ import annotations

from typing import Dict

import torch

from metaopt.meta.engine import SlotGroup, compiled_step, run_compiled, run_slots, stack_dicts
from metaopt.meta.schemes import Scheme, register_scheme
from metaopt.meta.slots import Slot
from metaopt.meta.unroll import MetaLoss, UnrollOut, batched, tree_map, unroll
from metaopt.types import Params


def flatten_theta(theta: Params) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1) for v in theta.values()])


def unflatten_theta(vec: torch.Tensor, theta: Params) -> Params:
    """``vec`` [..., P] -> dict of [..., *shape] in theta's key order."""
    out, off = {}, 0
    lead = tuple(vec.shape[:-1])
    for k, v in theta.items():
        out[k] = vec[..., off:off + v.numel()].reshape(lead + tuple(v.shape))
        off += v.numel()
    return out


def _mean_state(v: torch.Tensor) -> torch.Tensor:
    """Mean over the particle dim (dim 1) for float tensors; integer counters are equal across
    particles, take the first."""
    return v.mean(1) if v.is_floating_point() else v[:, 0]


def _stack_outs(outs) -> UnrollOut:
    st = lambda d: {k: torch.stack([o_[k] for o_ in d]) for k in d[0]}
    return UnrollOut(torch.stack([o.meta_loss for o in outs]), torch.stack([o.train_loss for o in outs]),
                     st([o.params for o in outs]), st([o.state for o in outs]))


class _Perturbed(Scheme):
    def __init__(self, truncation: int = 20, num_samples: int = 8, sigma: float = 0.01,
                 theta_run: bool = True, compile: bool = False):
        if truncation < 1:
            raise ValueError(f"Invalid truncation: {truncation}")
        if num_samples < 1:
            raise ValueError(f"Invalid num_samples: {num_samples}")
        if not sigma > 0:
            raise ValueError(f"Invalid sigma: {sigma}")
        self.truncation = self.window = int(truncation)
        self.num_samples, self.sigma = int(num_samples), float(sigma)
        self.theta_run, self.compile = bool(theta_run), bool(compile)

    def config(self):
        return dict(truncation=self.truncation, num_samples=self.num_samples, sigma=self.sigma,
                    theta_run=self.theta_run, compile=self.compile)

    def noise(self, slot: Slot, ref: torch.Tensor) -> torch.Tensor:
        """[N, P] perturbations e_i ~ N(0, sigma^2 I), drawn from the slot's generator."""
        z = torch.randn((self.num_samples, ref.numel()), generator=slot.gen, dtype=torch.float64)
        return (z * self.sigma).to(ref.dtype)

    def particles(self, slot: Slot, flat: torch.Tensor, e: torch.Tensor):
        """(params, state) of the slot's 2N perturbed runs [2N, ...] and the direction [N, P]
        their loss difference is multiplied by."""
        raise NotImplementedError

    def carried(self, o: UnrollOut, direction: torch.Tensor) -> Dict[str, torch.Tensor]:
        """slot.extra after the window (``o``: the group's runs, [K, R, ...])."""
        return {}

    def estimate(self, rule, theta, slots, meta_loss: MetaLoss):
        flat = flatten_theta(theta)
        N, R = self.num_samples, 2 * self.num_samples + int(self.theta_run)
        need_valid = meta_loss.needs_valid

        def group_fn(g: SlotGroup):
            K = g.size
            e = torch.stack([self.noise(s, flat) for s in g.slots])             # [K, N, P]
            parts = [self.particles(s, flat, e[j]) for j, s in enumerate(g.slots)]
            direction = torch.stack([d for _, _, d in parts])                    # [K, N, P]
            # runs 0..N-1: theta + e, N..2N-1: theta - e, (2N: theta itself, the slot's run)
            shifts = [e, -e] + ([torch.zeros_like(e[:, :1])] if self.theta_run else [])
            thetas = unflatten_theta((flat + torch.cat(shifts, dim=1)).reshape(K * R, -1), theta)

            def runs(i, cur):  # [K * R, ...]: the slots' 2N particles (then their current run)
                st = stack_dicts([p[i] for p in parts])                          # [K, 2N, ...]
                if self.theta_run:
                    st = {k: torch.cat([st[k], cur[k][:, None]], dim=1) for k in cur}
                return {k: v.reshape((K * R,) + tuple(v.shape[2:])) for k, v in st.items()}

            # [K, ...] -> [K * R, ...]: each slot's buffers and batches once per run (slot-major)
            per_run = lambda tree: tree_map(lambda t: t.repeat_interleave(R, dim=0), tree)
            run = lambda th_, p_, b_, s_, tb_, vb_: unroll(rule, th_, g.apply, p_, b_, s_, tb_,
                                                           vb_, meta_loss)
            args = (thetas, runs(0, g.params), per_run(g.buffers), runs(1, g.state),
                    per_run(g.train), per_run(g.valid))
            if self.compile:  # one compiled single-task step, run after run (see compiled_step)
                step = compiled_step(rule, g.slots[0].task, meta_loss)
                pick = lambda i: [None if a is None else tree_map(lambda t: t[i], a) for a in args]
                o = _stack_outs([run_compiled(step, *pick(i), meta_loss) for i in range(K * R)])
            else:
                o = batched(run, K * R, in_dims=(0, 0, 0, 0, 0, 0 if need_valid else None))(*args)
            o = tree_map(lambda t: t.reshape((K, R) + tuple(t.shape[1:])), o)
            L = o.meta_loss                                                      # [K, R]
            grad = ((L[:, :N] - L[:, N:2 * N])[..., None] * direction).sum(1) / (
                2 * N * self.sigma ** 2)
            if self.theta_run:
                last = lambda d: {k: v[:, -1] for k, v in d.items()}
                out = UnrollOut(L[:, -1], o.train_loss[:, -1], last(o.params), last(o.state),
                                self.carried(o, direction))
            else:  # the mean over the particles (each antithetic pair's mean) is the slot's run
                mean = lambda d: {k: _mean_state(v) for k, v in d.items()}
                out = UnrollOut(L.mean(1), o.train_loss.mean(1), mean(o.params), mean(o.state),
                                self.carried(o, direction))
            return out, grad

        with torch.no_grad():
            res = run_slots(slots, self.truncation, need_valid, group_fn)
        g = torch.stack([r[1] for r in res]).mean(0)
        return unflatten_theta(g, theta), [r[0] for r in res]


@register_scheme
class ES(_Perturbed):
    """Antithetic evolution strategies on each truncated window: a meta-gradient from loss
    differences, no backprop through the unroll."""
    name = "es"

    def particles(self, slot, flat, e):
        # every particle starts the window from the slot's current state; direction = e
        rep = lambda d: {k: v.expand((2 * self.num_samples,) + tuple(v.shape)) for k, v in d.items()}
        return rep(slot.params), rep(slot.state), e


@register_scheme
class PES(_Perturbed):
    """Persistent evolution strategies: ES whose perturbations accumulate over a slot's
    windows, unbiased for the whole unroll."""
    name = "pes"

    def particles(self, slot, flat, e):
        """Carried particles (fresh copies of the slot after a reset) and xi = old xi + e."""
        N = self.num_samples
        x = slot.extra
        if "pes.xi" not in x:
            rep = lambda d: {k: v[None].repeat((2 * N,) + (1,) * v.dim()) for k, v in d.items()}
            return rep(slot.params), rep(slot.state), e
        if tuple(x["pes.xi"].shape) != (N, flat.numel()):
            raise ValueError(f"slot.extra['pes.xi'] has shape {list(x['pes.xi'].shape)}, expected "
                             f"{[N, flat.numel()]} (num_samples or theta changed mid-run?)")
        pick = lambda g, like: {k: torch.cat([x[f"pes.pos.{g}.{k}"], x[f"pes.neg.{g}.{k}"]])
                                for k in like}
        return pick("p", slot.params), pick("s", slot.state), x["pes.xi"] + e

    def carried(self, o, direction):
        N = self.num_samples
        extra = {"pes.xi": direction}
        for sign, sl in (("pos", slice(0, N)), ("neg", slice(N, 2 * N))):
            extra.update({f"pes.{sign}.p.{k}": v[:, sl] for k, v in o.params.items()})
            extra.update({f"pes.{sign}.s.{k}": v[:, sl] for k, v in o.state.items()})
        return extra
