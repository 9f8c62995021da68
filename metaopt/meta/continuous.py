"""Continuous-time scheme: the inner flow integrated by an ODE solver, theta on a slower flow.

The two flows of the design, written as ODEs::

    dz/dt     = F_theta(z, t)                  fast: z = (w, rule state), one window per outer step
    dtheta/dt = -eps * dL/dtheta               slow: eps << 1, set by the outer optimizer

**Inner flow.** One inner step lasts ``eta`` units of time. The rule's update is a velocity:
``F_theta(z, t) = (update(theta, grad L(w; batch_k), s, w), s_new - s) / eta`` (the same
gradient-then-update as every other scheme: :func:`metaopt.meta.unroll.rule_step`), where ``s_new``
is the rule state the rule would return; so the rule state (momenta, running moments) is part of
the ODE state and flows too. The step counter is not: it is the integer ``k`` of the piece of
time ``[k eta, (k+1) eta)`` the solver is in. Data are piecewise constant in time: on that piece
the vector field uses the minibatch of step ``k = floor(t / eta)`` (and at a piece's right end
the left limit, i.e. still batch ``k``) -- the batches the nested scheme would use for step
``k``, drawn from the slot's generator in the same order. Consequences:

* ``method="euler"`` with step ``eta`` (``substeps=1``) is ``z_{k+1} = z_k + eta * F`` -- the
  discrete rule, step for step (tests/test_schemes.py checks the trajectory and the
  meta-gradient against the nested scheme);
* ``rk4``/``midpoint`` take ``substeps`` steps of ``eta / substeps`` per inner step (grid aligned
  with the pieces, ``perturb=True`` so no stage samples the next piece's batch); ``dopri5`` (and
  the other adaptive solvers) integrate each piece separately, so steps never straddle a batch
  change. As ``substeps`` grows (or the tolerance shrinks) they approach the exact flow, which
  is *not* the discrete rule: the flow is the rule's small-step limit.

Numerically the solver runs in the rescaled time ``tau = t / eta`` (one unit per inner step,
velocity = update): the same ODE, with the pieces' boundaries at exact integers, so ``eta`` never
rounds a boundary onto the wrong side. ``eta`` therefore does not change the inner trajectory at
all; it sets how much physical time a window lasts (``window * eta``), which is what the outer
flow is measured against.

**Meta-gradient.** The meta-loss over the window is the nested one (any of
:data:`metaopt.meta.unroll.META_LOSSES`, the same function), evaluated on the solution at the step
boundaries ``t = k eta``.

* ``gradient="backprop"`` differentiates through the solver's operations: the exact gradient of
  the discretized forward, with memory growing like window x stages x the rule's internal graph.
* ``gradient="adjoint"`` uses ``torchdiffeq.odeint_adjoint``: the adjoint ODE is integrated
  backward with the same solver, recomputing the forward field, so no graph of the solver or of
  the rule is stored. What is stored is the solution at the output times: one state per inner
  step for the meta-losses that read every step; for ``valid_last`` with a fixed-grid solver, one
  every ``store_every`` steps, and ``store_every=window`` keeps only the window's two ends --
  memory independent of the window length (the window's batches are not stored either: only
  the last validation batch is kept, and the training batches are redrawn from generator
  snapshots, block by block, when the forward and the adjoint pass reach them). The price: the
  backward pass reconstructs the forward state by integrating the ODE backward from the nearest
  stored state, and a training flow contracts, so the reconstruction error grows like the inverse
  contraction over that stretch
  (fine over a few steps; hundreds of steps in float32 can give NaN). The default
  ``store_every=1`` re-anchors it at every inner step. Adaptive solvers always store every step.
  The adjoint gradient is the flow's gradient up to the solver's error, not the exact gradient
  of the discretized forward: with ``euler`` it is off by O(step) (tests: ~12% at
  ``substeps=1``, first-order convergence); with ``rk4`` and ``substeps`` or ``dopri5`` at tight
  tolerances it matches finite differences.

**Outer flow.** The trainer takes one outer step per window, so one outer step spans ``window *
eta`` of time; an explicit-Euler step of ``dtheta/dt = -eps dL/dtheta`` would be plain SGD with
learning rate ``eps * window * eta``. The MetaTrainer applies Adam with ``meta.outer_lr``
instead. Adam's step is about ``meta.outer_lr * g / rms(g)``, so the effective timescale ratio
is ``eps ~ meta.outer_lr / (window * eta * rms(g))`` with ``rms(g)`` Adam's running RMS of the
meta-gradient: to keep ``eps`` fixed when changing the window, scale ``meta.outer_lr`` with
``window * eta``. A smaller outer_lr or a longer window means a wider separation of timescales
(theta nearly frozen during a window, the regime where the nested and continuous pictures
agree). The scheme returns the plain meta-gradient ``dL/dtheta``, comparable to every other
scheme's.
"""
from __future__ import annotations

import math
from typing import Dict

import torch

from metaopt.meta.engine import LazyWindow, SlotGroup, mean_meta_gradient, run_slots
from metaopt.meta.schemes import Scheme, register_scheme
from metaopt.meta.unroll import MetaLoss, UnrollOut, get_meta_loss, rule_step

FIXED_GRID = ("euler", "midpoint", "rk4")
ADAPTIVE = ("dopri5", "bosh3", "adaptive_heun", "dopri8")
GRADIENTS = ("adjoint", "backprop")


def torchdiffeq_module():
    try:
        import torchdiffeq
    except ImportError:  # an optional dependency (the "ode" extra)
        raise ImportError("the continuous scheme needs torchdiffeq: "
                          "pip install 'metaopt[ode]'") from None
    return torchdiffeq


@register_scheme
class Continuous(Scheme):
    """Continuous-time scheme: the inner flow integrated by an ODE solver (torchdiffeq),
    gradients by the adjoint or by backprop."""
    name = "continuous"

    def __init__(self, window: int = 20, method: str = "euler", gradient: str = "adjoint",
                 eta: float = 1.0, substeps: int = 1, rtol: float = 1e-6, atol: float = 1e-8,
                 store_every: int = 1, use_vmap: bool = True):
        if window < 1:
            raise ValueError(f"Invalid window: {window}")
        if method not in FIXED_GRID + ADAPTIVE:
            raise ValueError(f"Invalid method: {method!r} (use one of "
                             f"{', '.join(FIXED_GRID + ADAPTIVE)})")
        if gradient not in GRADIENTS:
            raise ValueError(f"Invalid gradient: {gradient!r} (use 'adjoint' or 'backprop')")
        if not eta > 0:
            raise ValueError(f"Invalid eta: {eta}")
        if substeps < 1:
            raise ValueError(f"Invalid substeps: {substeps}")
        if not (rtol > 0 and atol > 0):
            raise ValueError(f"Invalid tolerance: rtol={rtol}, atol={atol}")
        if store_every < 1:
            raise ValueError(f"Invalid store_every: {store_every}")
        self.window = int(window)
        self.method, self.gradient = method, gradient
        self.eta, self.substeps = float(eta), int(substeps)
        self.rtol, self.atol = float(rtol), float(atol)
        self.store_every = int(store_every)
        self.use_vmap = bool(use_vmap)
        torchdiffeq_module()

    def config(self):
        return dict(window=self.window, method=self.method, gradient=self.gradient, eta=self.eta,
                    substeps=self.substeps, rtol=self.rtol, atol=self.atol,
                    store_every=self.store_every, use_vmap=self.use_vmap)

    def _grid(self, func, y0, t):
        """Fixed-grid times: ``substeps`` per unit of tau, exact at every integer."""
        pieces = []
        for a, b in zip(t[:-1], t[1:]):
            n = int(round(abs(float(b - a)) * self.substeps))
            j = torch.arange(n, dtype=t.dtype, device=t.device) / self.substeps
            pieces.append(a + torch.sign(b - a) * j)
        pieces.append(t[-1:])
        return torch.cat(pieces)

    def window_losses(self, rule, theta, slots, meta_loss):
        """Per-slot UnrollOut results, differentiable w.r.t. theta."""
        ml = get_meta_loss(meta_loss)
        # A last-step meta-loss keeps only the window's last validation batch (same draws), and
        # with the adjoint the training batches are redrawn on demand in blocks of ~sqrt(T) steps
        # (engine.LazyWindow): nothing of size T is stored.
        lazy = (int(math.ceil(math.sqrt(self.window)))
                if ml.last_only and self.gradient == "adjoint" else 0)
        return run_slots(slots, self.window, ml.needs_valid,
                         lambda g: self._solve_group(rule, theta, g, ml), self.use_vmap,
                         last_valid=ml.last_only, lazy_block=lazy)

    def estimate(self, rule, theta, slots, meta_loss):
        outs = self.window_losses(rule, theta, slots, meta_loss)
        return mean_meta_gradient(theta, outs), outs

    def _solve_group(self, rule, theta, g: SlotGroup, ml: MetaLoss) -> UnrollOut:
        torchdiffeq = torchdiffeq_module()
        T, K, apply = self.window, g.size, g.apply
        pkeys = list(g.params)
        state0 = g.slots[0].state
        fkeys = [k for k, v in state0.items() if v.is_floating_point() and k != "step"]
        bad = [k for k in state0 if k not in fkeys and k != "step"]
        if bad:
            raise ValueError(f"continuous scheme: rule state {bad[0]!r} is not a float tensor, "
                             "so it cannot be part of the ODE state")
        has_step = "step" in state0
        tb, vb, bufs = g.train, g.valid, g.buffers                          # [K, T, ...]
        train_at = (tb.at if isinstance(tb, LazyWindow)
                    else lambda k: tuple(x[:, k] for x in tb))                  # step k's [K, ...]
        step0 = g.state["step"] if has_step else None
        y0 = tuple(g.params[k] for k in pkeys) + tuple(g.state[k] for k in fkeys)
        n_p = len(pkeys)
        train_losses: Dict[int, torch.Tensor] = {}

        def one(p, b, sf, step, batch):
            s = dict(sf)
            if has_step:
                s["step"] = step
            updates, s2, loss = rule_step(rule, theta, apply, p, b, s, batch)
            return ([updates[k].to(p[k].dtype) for k in pkeys],
                    [s2[k].to(sf[k].dtype) - sf[k] for k in fkeys], loss)
        one_v = g.vmap(one)

        def velocity(tau, y, k):
            """dz/dtau on piece k (tau = t / eta; dz/dt is this divided by eta)."""
            p = dict(zip(pkeys, y[:n_p]))
            sf = dict(zip(fkeys, y[n_p:]))
            batch = train_at(k)
            step = step0 + k if has_step else torch.zeros(K)
            dp, ds, loss = one_v(p, bufs, sf, step, batch)
            if k not in train_losses:  # the first evaluation on piece k is at z(k eta): log it
                train_losses[k] = loss.detach()
            return tuple(dp) + tuple(ds)

        ode = torchdiffeq.odeint_adjoint if self.gradient == "adjoint" else torchdiffeq.odeint
        kw = dict(method=self.method, rtol=self.rtol, atol=self.atol)
        if self.gradient == "adjoint":
            kw["adjoint_params"] = tuple(v for v in theta.values() if v.requires_grad)
        dtype = y0[0].dtype
        if self.method in FIXED_GRID:
            # one solve over the window; the field reads its piece from tau (boundaries are exact
            # integers and perturb=True keeps every stage inside its piece)
            def field(tau, y):
                return velocity(tau, y, min(max(int(math.floor(float(tau.detach()))), 0), T - 1))

            if ml.last_only:  # keep the solution every store_every steps only
                ts = torch.tensor(sorted(set(range(0, T, self.store_every)) | {T}), dtype=dtype)
            else:
                ts = torch.arange(T + 1, dtype=dtype)
            sol = ode(field, y0, ts, options=dict(grid_constructor=self._grid, perturb=True), **kw)
            at = lambda i: tuple(x[-1 if ml.last_only else i] for x in sol)
        else:
            ys = [y0]
            for k in range(T):
                field = lambda tau, y, k=k: velocity(tau, y, k)
                sol = ode(field, ys[-1], torch.tensor([float(k), k + 1.0], dtype=dtype), **kw)
                ys.append(tuple(x[-1] for x in sol))
            at = lambda i: ys[i]

        # the nested meta-loss (metaopt.meta.unroll), step k's loss on the solution after step k
        loss_at = g.vmap(lambda p, b, tb_, vb_: ml(apply, p, b, tb_, vb_),
                         in_dims=(0, 0, 0, 0 if ml.needs_valid else None))
        batch_at = lambda src, k: tuple(x[:, k] for x in src) if src is not None else None
        vk = lambda k: 0 if ml.last_only else k  # last_only: valid holds the last batch only
        per_step = [loss_at(dict(zip(pkeys, at(k + 1)[:n_p])), bufs, train_at(k),
                            batch_at(vb, vk(k))) for k in range(T) if ml.reads(k, T)]
        meta = torch.stack(per_step).mean(0)
        train = torch.stack([train_losses[k] for k in range(T)]).mean(0)
        yT = at(T)
        s_end = dict(zip(fkeys, yT[n_p:]))
        if has_step:
            s_end["step"] = step0 + T
        return UnrollOut(meta, train, dict(zip(pkeys, yT[:n_p])),
                         {k: s_end[k] for k in state0})  # the rule's own key order
