"""``anchored``: the per-tensor learned optimizer with a step that cannot run away -- the shipped
default.

It is the :mod:`pertensor <metaopt.rules.pertensor>` design (Adam's per-coordinate direction, a
small per-tensor controller that sets how far each tensor moves) with three changes that make it
robust by construction on models unlike the ones it was meta-trained on:

* **The step is anchored to the weight's scale at initialization**, not to its current scale.
  ``pertensor`` moves a matrix by ``lr * RMS(p_t)``: when a weight grows, its step grows with it,
  a positive feedback that a linear model on unnormalized inputs turns into a climbing loss.
  Here the step is ``lr * (RMS(p_0) + floor / sqrt(fan_in))``: a fixed, per-tensor length scale
  (muP-like), still invariant to a per-tensor reparameterization ``w = s w'`` (which rescales
  ``p_0`` too), and the controller sees how far the weight has moved from it (``growth``).
* **A warm-up that starts small**: the learning rate is multiplied by ``1 - exp(-t / tau)``
  (``tau`` learned, between 1 and 200 steps), so the first, poorly estimated Adam steps
  (``m / sqrt(v) = sign(g)`` at step 1) cannot overshoot a fresh problem.
* **AdamW's decoupled weight decay**, per param group, at the learned rate (see below).
* **Online rate adaptation** (``adapt_range > 0``): each tensor keeps a log-rate ``h_i`` that it
  integrates from the hypergradient signal ``cos(d_{t-1}, g_t)`` (last step's Adam direction
  against the new gradient: positive when steps are too short, negative when they overshoot),
  ``h_i <- clip(h_i + gain * cos, -adapt_range, adapt_range)``, and the rate is multiplied by
  ``exp(h_i)``. So the rule finds each problem's rate level within a factor ``e^adapt_range``
  of its base, whatever the model; the bound keeps the step finite and the controller sees
  ``h_i / adapt_range``. ``gain`` is meta-learned (``log_adapt_gain``).

Per parameter tensor ``i`` at step ``t``:

    m <- b1 m + (1-b1) g,   v <- b2 v + (1-b2) g^2
    d   = (m / (1-b1^t) + c_i g) / (sqrt(v / (1-b2^t)) + eps)
    lr_i = exp(log_lr_k + a_i + h_i) * anchor_i * (1 - exp(-t / tau))   k = matrix | vector
    anchor_i = RMS(p_0,i) + exp(log_floor) / sqrt(fan_in_i)   (matrices);   1 (vectors)
    p  <- p - lr_i * d - wd * lr_i * p                                   (wd: the group's weight_decay)

(``h_i = 0`` without ``adapt_range``.) ``(a_i, c_i)`` are the tanh-bounded outputs (``|a_i| <= max_log_mult``, ``|c_i| <= 1``) of an
MLP on per-tensor features that are all invariant to rescaling a tensor's weights and
gradients: ``cos(m_{t-1}, g_t)``, the gradient's signal-to-noise ``log(|m|^2 / sum v)``, a
gradient spike ``log(|g|^2 / sum v)``, the vector flag, the growth ``log((RMS(p_t) + f) /
(RMS(p_0) + f))`` and time features ``tanh(t / tau_j)``, ``log(1 + t) / 10``. With the output
layer at zero (a fresh theta) the rule is Adam with the anchored per-tensor rates and the warm-up.

Weight decay: ``weight_decay`` of a :class:`metaopt.optim.LearnedOptimizer` param group (passed
as ``ctx["weight_decay"]``, one value per tensor) is AdamW's decoupled decay ``p <- p - lr * wd *
p`` with ``lr`` the tensor's learned rate ``lr_i`` (times the group's ``lr`` multiplier). ``lr_i``
is the rate per unit of Adam direction, about 1e-3 for a typical layer, so ``weight_decay=0.01``
decays about as much as ``AdamW(lr=1e-3, weight_decay=0.01)``, and the decay follows the learned
schedule (warm-up included). ``weight_decay=0`` (the default) leaves the update untouched.

State: ``step`` (scalar), ``m``, ``v`` ([N], per coordinate), ``rms0`` ([T], per tensor: RMS of
each tensor when the state was created) and, with ``adapt_range``, ``h`` ([T], the adapted
log-rates).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from metaopt.rules.base import default_scales, flat_views, register_rule
from metaopt.rules.pertensor import TINY, PerTensorRule, powsum
from metaopt.types import FlatSpec, safe_sqrt, segment_sum

#: bounds of the learned warm-up time constant (steps)
WARMUP_RANGE = (1.0, 200.0)
#: the largest ``adapt_range`` (the adapted rate stays within a factor e^ADAPT_MAX of the base)
ADAPT_MAX = 10.0
#: a gradient up to e^SPIKE_FREE times its running RMS^2 is not braked (minibatch noise)
SPIKE_FREE = 2.0


def weight_decays(ctx, n: int, like: Tensor) -> Optional[Tensor]:
    """``ctx["weight_decay"]`` as a [T] tensor, or None when absent or all zero."""
    wd = (ctx or {}).get("weight_decay")
    if wd is None:
        return None
    if isinstance(wd, Tensor):   # tests pass tensors; LearnedOptimizer passes a list of floats
        wd = wd.detach().cpu().reshape(-1).tolist()
    wd = [float(x) for x in (wd if isinstance(wd, (list, tuple)) else [wd])]
    if len(wd) != n:
        raise ValueError(f"ctx['weight_decay'] has {len(wd)} values for {n} parameter tensors")
    if not any(wd):   # decided on the host list: no device read
        return None
    return torch.as_tensor(wd, dtype=like.dtype).to(like.device, non_blocking=True)


@register_rule
class AnchoredRule(PerTensorRule):
    """The shipped default: :class:`PerTensorRule` with the step anchored to each tensor's
    initial scale, a learned warm-up and decoupled weight decay (see the module docstring)."""
    name = "anchored"
    state_layout = {"step": "global", "m": "coord", "v": "coord", "rms0": "tensor", "h": "tensor"}
    supports_weight_decay = True

    def __init__(self, hidden_size: int = 32, lr_matrix: float = 0.03, lr_vector: float = 3e-3,
                 floor: float = 0.1, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 time_taus: Sequence[float] = (10, 100, 1000, 10000), max_log_mult: float = 2.0,
                 warmup: float = 5.0, max_relative: float = 0.0, adapt_range: float = 0.0,
                 adapt_gain: float = 0.3, adapt_down: Optional[float] = None,
                 adapt_brake: float = 0.0):
        super().__init__(hidden_size=hidden_size, lr_matrix=lr_matrix, lr_vector=lr_vector,
                         floor=floor, beta1=beta1, beta2=beta2, eps=eps, time_taus=time_taus,
                         max_log_mult=max_log_mult)
        lo, hi = WARMUP_RANGE
        if not lo <= warmup <= hi:
            raise ValueError(f"Invalid warmup: {warmup} (must be in [{lo:g}, {hi:g}] steps)")
        self.warmup = float(warmup)
        if not 0.0 <= max_relative < 1.0:
            raise ValueError(f"Invalid max_relative: {max_relative} (must be in [0, 1))")
        self.max_relative = float(max_relative)
        if not 0.0 <= adapt_range <= ADAPT_MAX:
            raise ValueError(f"Invalid adapt_range: {adapt_range} (must be in [0, {ADAPT_MAX:g}])")
        if not adapt_gain > 0:
            raise ValueError(f"Invalid adapt_gain: {adapt_gain} (must be > 0)")
        self.adapt_range, self.adapt_gain = float(adapt_range), float(adapt_gain)
        adapt_down = self.adapt_range if adapt_down is None else float(adapt_down)
        if not 0.0 <= adapt_down <= ADAPT_MAX:
            raise ValueError(f"Invalid adapt_down: {adapt_down} (must be in [0, {ADAPT_MAX:g}])")
        self.adapt_down = adapt_down
        if not adapt_brake >= 0:
            raise ValueError(f"Invalid adapt_brake: {adapt_brake} (must be >= 0)")
        self.adapt_brake = float(adapt_brake)

    def config(self):
        cfg = {**super().config(), "warmup": self.warmup, "max_relative": self.max_relative}
        if self.adapt_range:
            cfg.update(adapt_range=self.adapt_range, adapt_gain=self.adapt_gain,
                       adapt_down=self.adapt_down, adapt_brake=self.adapt_brake)
        return cfg

    @property
    def num_inputs(self) -> int:
        return super().num_inputs + 1 + (1 if self.adapt_range else 0)   # + growth (+ h)

    def init_theta(self, spec=None, generator=None):
        theta = super().init_theta(spec, generator)
        theta["log_warmup"] = torch.tensor(math.log(self.warmup))
        if self.max_relative:
            # a third controller output sets the exponent of the relative part (see controller)
            theta["w1"] = torch.zeros(self.hidden_size, 3)
            theta["b1"] = torch.zeros(3)
            theta["logit_relative"] = torch.tensor(0.0)
        if self.adapt_range:
            theta["log_adapt_gain"] = torch.tensor(math.log(self.adapt_gain))
        return theta

    def init(self, params):
        spec = FlatSpec.of(params)
        p = spec.flatten(params)
        rms0 = torch.stack([t.detach().pow(2).mean().sqrt() for t in params.values()]) \
            if params else p.new_zeros(0)
        state = {"step": p.new_zeros(()), "m": torch.zeros_like(p), "v": torch.zeros_like(p),
                 "rms0": rms0.to(p.dtype)}
        if self.adapt_range:
            state["h"] = torch.zeros_like(state["rms0"])
        return state

    def _adapt(self, theta, h_prev: Tensor, dg: Tensor, dd: Tensor, stats: Tensor,
               t: Tensor) -> Tensor:
        """The adapted log-rate ``h`` [T]: ``clamp(h_prev + gain * cos(d_{t-1}, g_t) - brake *
        relu(spike), -down, range)`` from ``dg = <d_{t-1}, g_t>``, ``dd = |d_{t-1}|^2`` and the
        controller's statistics (``spike = log(mean g_t^2 / mean v_hat)``: a gradient larger than
        its running second moment, the mark of a step that went too far)."""
        gg, vsum = stats[:, 2], stats[:, 3]
        cos = dg * torch.rsqrt(dd * gg + TINY)
        gain = torch.exp(theta["log_adapt_gain"].to(cos.dtype))
        h = h_prev + gain * cos
        if self.adapt_brake:
            spike = torch.log(gg / (vsum / (1 - self.beta2 ** t) + TINY) + 1e-8)
            h = h - self.adapt_brake * torch.relu(spike - SPIKE_FREE)
        return h.clamp(-self.adapt_down, self.adapt_range)

    def _prev_direction(self, m_prev: Tensor, v_prev: Tensor, step_prev: Tensor) -> Tensor:
        """Last step's Adam direction up to a per-tensor factor: ``m / (sqrt(v / bc2) + eps)``
        (all zero before the first step)."""
        bc2 = (1 - self.beta2 ** step_prev).clamp_min(1 - self.beta2)
        return m_prev / (safe_sqrt(v_prev / bc2) + self.eps)

    # -- the per-tensor controller (shared by ``update`` and ``step_``) -------------------------
    def controller(self, theta, spec: FlatSpec, stats: Tensor, step: Tensor,
                   rms0: Tensor = None, h: Tensor = None) -> Tuple[Tensor, Tensor]:
        """``stats`` [T, 6] per tensor: <m_prev, g>, |m_prev|^2, |g|^2, sum v (new), |p|^2, numel;
        ``rms0`` [T]; ``step`` = t (>= 1); ``h`` [T] the adapted log-rate (with ``adapt_range``).
        Returns the learning rate lr_i [T] and the gradient share c [T]."""
        dtype, device = stats.dtype, stats.device
        is_vec, inv_sqrt_fan = self._static(spec, dtype, device)
        dot, mm, gg, vsum, pp, n = stats.unbind(-1)
        b1, b2 = self.beta1, self.beta2
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        th = {k: v.to(dtype) for k, v in theta.items()}
        m_new_sq = b1 * b1 * mm + 2 * b1 * (1 - b1) * dot + (1 - b1) ** 2 * gg
        v_mean = vsum / bc2 / n + TINY
        cos = dot * torch.rsqrt(mm * gg + TINY)
        snr = torch.log(m_new_sq / (bc1 * bc1) / n / v_mean + 1e-8)
        spike = torch.log(gg / n / v_mean + 1e-8)
        floor = torch.exp(th["log_floor"]) * inv_sqrt_fan
        growth = torch.log((torch.sqrt(pp / n) + floor) / (rms0 + floor))
        tf = torch.tanh(step / self._const("taus", self.time_taus, dtype, device))
        glob = torch.cat([tf, torch.log1p(step).reshape(1) / 10])
        per = [cos, snr.clamp(-10, 2) / 5, spike.clamp(-10, 5) / 5, is_vec, growth.clamp(-3, 3) / 3]
        if self.adapt_range:
            per.append(h / self.adapt_range)
        log_adapt = h
        x = torch.cat([torch.stack(per, -1), glob.expand(cos.shape[0], glob.shape[0])], -1)
        hid = torch.relu(x @ th["w0"] + th["b0"])
        out = hid @ th["w1"] + th["b1"]
        a = self.max_log_mult * torch.tanh(out[:, 0] / self.max_log_mult)
        c = torch.tanh(out[:, 1])
        log_base = torch.where(is_vec > 0, th["log_lr_vector"], th["log_lr_matrix"])
        anchor = rms0 + floor
        if self.max_relative:
            # anchor^(1 - r) * current^r with a learned r_i <= max_relative < 1: the step may follow
            # the weight's growth, but sub-linearly (dw/dt ~ w^r grows polynomially, never
            # exponentially), and the controller sees the growth to turn r down
            r = self.max_relative * torch.sigmoid(th["logit_relative"] + out[:, 2])
            anchor = anchor * torch.exp(r * torch.log((torch.sqrt(pp / n) + floor) / anchor))
        anchor = torch.where(is_vec > 0, torch.ones_like(rms0), anchor)
        lo, hi = WARMUP_RANGE
        tau = torch.exp(th["log_warmup"].clamp(math.log(lo), math.log(hi)))
        warm = -torch.expm1(-step / tau)
        log_lr = log_base + a + (log_adapt if self.adapt_range else 0.0)
        return torch.exp(log_lr) * anchor * warm, c

    # -- reference (differentiable, vmappable) path ------------------------------------------------
    def update(self, theta, grads, state, params, ctx=None):
        spec, seg, g, p, m, v, step, t, stats = self._reference_stats(grads, state, params)
        new = {"step": step, "m": m, "v": v, "rms0": state["rms0"]}
        h = None
        if self.adapt_range:
            T = spec.num_tensors
            q = self._prev_direction(state["m"], state["v"], t - 1)
            h = new["h"] = self._adapt(theta, state["h"].to(g.dtype), segment_sum(q * g, seg, T),
                                       segment_sum(q * q, seg, T), stats, t)
        lr, c = self.controller(theta, spec, stats, t, state["rms0"].to(g.dtype), h)
        den = safe_sqrt(v / (1 - self.beta2 ** t)) + self.eps
        d = (m / (1 - self.beta1 ** t) + c[seg] * g) / den
        u = -lr[seg] * d
        wd = weight_decays(ctx, spec.num_tensors, g)
        if wd is not None:
            u = u - (wd * lr)[seg] * p
        return spec.unflatten(u), new

    # -- in-place fast path --------------------------------------------------------------------------
    def _prev_dots(self, state, grads, spec) -> Tuple[Tensor, Tensor]:
        """Per tensor ``<d_{t-1}, g_t>`` and ``|d_{t-1}|^2`` [T] from the moments before they move,
        with whole-tensor ops and no host read (off the CPU; there ``_fast_stats`` computes them
        in its pass)."""
        q = flat_views(self._prev_direction(state["m"], state["v"],
                                            state["step"].to(state["v"].dtype)), spec)
        dg = torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(q, grads)])
        return dg, torch.stack(powsum(q, 2))

    @torch.no_grad()
    def step_(self, theta, params, grads, state, spec, ctx=None, scales=None):
        scales = default_scales(scales, len(params))
        params, grads = list(params), list(grads)
        v_all = state["v"]
        cpu = v_all.device.type == "cpu"
        prev_eps = None
        if self.adapt_range:   # <d_{t-1}, g_t> and |d_{t-1}|^2, before the moments move
            if cpu:            # in _fast_stats' pass (d up to sqrt(bc2), which cos does not see)
                sp = float(state["step"])
                prev_eps = self.eps * math.sqrt(max(1 - self.beta2 ** sp, 1 - self.beta2))
            else:
                dots = self._prev_dots(state, grads, spec)
        m_views, _, step, t, stats = self._fast_stats(params, grads, state, spec, prev_eps)
        if prev_eps is not None:
            dots, stats = (stats[:, 6], stats[:, 7]), stats[:, :6]
        new = {"step": step, "m": state["m"], "v": v_all, "rms0": state["rms0"]}
        h = None
        if self.adapt_range:
            h = new["h"] = self._adapt(theta, state["h"], dots[0], dots[1], stats, t)
        lr, c = self.controller(theta, spec, stats, t, state["rms0"], h)
        # decoupled decay on the weights before this step's update (inside _apply_'s pass)
        self._apply_(params, grads, m_views, v_all, spec, lr, c, t, scales,
                     weight_decays(ctx, len(params), v_all))
        return new
