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

Both schemes also advance each slot's own (unperturbed, theta) run one window on the same
batches: that run is what the trainer logs (meta-loss at theta, comparable with other schemes),
checks for divergence and resets. Perturbations come from the slot's own generator (after its
batches), so a checkpoint/resume reproduces them.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch.func import vmap

from metaopt.meta.nested import sample_window
from metaopt.meta.schemes import Scheme, SchemeOutput, register_scheme
from metaopt.meta.slots import Slot
from metaopt.meta.unroll import unroll
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


class _Perturbed(Scheme):
    def __init__(self, truncation: int = 20, num_samples: int = 8, sigma: float = 0.01):
        if truncation < 1:
            raise ValueError(f"Invalid truncation: {truncation}")
        if num_samples < 1:
            raise ValueError(f"Invalid num_samples: {num_samples}")
        if not sigma > 0:
            raise ValueError(f"Invalid sigma: {sigma}")
        self.truncation = self.window = int(truncation)
        self.num_samples, self.sigma = int(num_samples), float(sigma)

    def config(self):
        return dict(truncation=self.truncation, num_samples=self.num_samples, sigma=self.sigma)

    def _run(self, rule, thetas: Params, slot: Slot, params: Params, state, batches, meta_loss):
        """Window for a batch of particles: thetas/params/state all with a leading particle dim."""
        need_valid = meta_loss.startswith("valid")
        tb, vb = batches
        task = slot.task
        fn = lambda th, p, s: unroll(rule, th, task.apply, p, task.buffers, s, tb,
                                     vb if need_valid else None, meta_loss)
        return vmap(fn)(thetas, params, state)

    def _noise(self, slot: Slot, ref: torch.Tensor) -> torch.Tensor:
        """[N, P] perturbations e_i ~ N(0, sigma^2 I), drawn from the slot's generator."""
        z = torch.randn((self.num_samples, ref.numel()), generator=slot.gen, dtype=torch.float64)
        return (z * self.sigma).to(ref.dtype)

    def meta_gradient(self, rule, theta, slots, meta_loss):
        need_valid = meta_loss.startswith("valid")
        flat = flatten_theta(theta)
        grads, res = [], []
        with torch.no_grad():
            for slot in slots:
                batches = sample_window(slot, self.truncation, need_valid)
                e = self._noise(slot, flat)
                g, r = self._slot_estimate(rule, theta, flat, slot, e, batches, meta_loss)
                grads.append(g)
                res.append(r)
        g = torch.stack(grads).mean(0)
        return SchemeOutput(
            grads={k: v.clone() for k, v in unflatten_theta(g, theta).items()},
            meta_losses=[r[0] for r in res], train_losses=[r[1] for r in res],
            params=[r[2] for r in res], states=[r[3] for r in res], extras=[r[4] for r in res],
            inner_steps=self.truncation)

    @staticmethod
    def _take(d: Dict[str, torch.Tensor], sl) -> Dict[str, torch.Tensor]:
        return {k: v[sl].clone() for k, v in d.items()}

    def _estimate(self, L_pos, L_neg, direction):
        N = self.num_samples
        return ((L_pos - L_neg)[:, None] * direction).sum(0) / (2 * N * self.sigma ** 2)


@register_scheme
class ES(_Perturbed):
    name = "es"

    def _slot_estimate(self, rule, theta, flat, slot, e, batches, meta_loss):
        N = self.num_samples
        # particles: N positive, N negative, then the unperturbed run itself
        shifts = torch.cat([e, -e, torch.zeros_like(flat)[None]])
        thetas = unflatten_theta(flat[None] + shifts, theta)
        rep = lambda d: {k: v.expand((2 * N + 1,) + tuple(v.shape)) for k, v in d.items()}
        o = self._run(rule, thetas, slot, rep(slot.params), rep(slot.state), batches, meta_loss)
        g = self._estimate(o.meta_loss[:N], o.meta_loss[N:2 * N], e)
        return g, (float(o.meta_loss[-1]), float(o.train_loss[-1]), self._take(o.params, -1),
                   self._take(o.state, -1), {})


@register_scheme
class PES(_Perturbed):
    name = "pes"

    def _particles(self, slot: Slot, flat):
        """Carried (pos params, pos state, neg params, neg state, xi); fresh after a reset."""
        N = self.num_samples
        x = slot.extra
        if "pes.xi" not in x:
            rep = lambda d: {k: v[None].repeat((N,) + (1,) * v.dim()) for k, v in d.items()}
            return (rep(slot.params), rep(slot.state), rep(slot.params), rep(slot.state),
                    flat.new_zeros((N, flat.numel())))
        if tuple(x["pes.xi"].shape) != (N, flat.numel()):
            raise ValueError(f"slot.extra['pes.xi'] has shape {list(x['pes.xi'].shape)}, expected "
                             f"{[N, flat.numel()]} (num_samples or theta changed mid-run?)")
        pick = lambda pre, like: {k: x[pre + k] for k in like}
        return (pick("pes.pos.p.", slot.params), pick("pes.pos.s.", slot.state),
                pick("pes.neg.p.", slot.params), pick("pes.neg.s.", slot.state), x["pes.xi"])

    def _slot_estimate(self, rule, theta, flat, slot, e, batches, meta_loss):
        N = self.num_samples
        pp, ps, np_, ns, xi = self._particles(slot, flat)
        xi = xi + e
        shifts = torch.cat([e, -e, torch.zeros_like(flat)[None]])
        thetas = unflatten_theta(flat[None] + shifts, theta)
        cat = lambda a, b, c: {k: torch.cat([a[k], b[k], c[k][None]]) for k in c}
        o = self._run(rule, thetas, slot, cat(pp, np_, slot.params), cat(ps, ns, slot.state),
                      batches, meta_loss)
        g = self._estimate(o.meta_loss[:N], o.meta_loss[N:2 * N], xi)
        extra = {"pes.xi": xi.clone()}
        for sign, sl in (("pos", slice(0, N)), ("neg", slice(N, 2 * N))):
            extra.update({f"pes.{sign}.p.{k}": v for k, v in self._take(o.params, sl).items()})
            extra.update({f"pes.{sign}.s.{k}": v for k, v in self._take(o.state, sl).items()})
        return g, (float(o.meta_loss[-1]), float(o.train_loss[-1]), self._take(o.params, -1),
                   self._take(o.state, -1), extra)
