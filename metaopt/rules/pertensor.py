"""``pertensor``: a learned optimizer that is cheap and generalizes -- the shipped default.

What it computes, per parameter tensor ``i`` at step ``t`` (all tensors at once):

    m <- b1 m + (1-b1) g,   v <- b2 v + (1-b2) g^2              (Adam's moments, per coordinate)
    den = sqrt(v / (1-b2^t)) + eps
    d   = (m / (1-b1^t)) / den  +  c_i * g / den                (Adam direction + learned Nesterov-like
                                                                  share of the fresh gradient)
    p  <- p - lr_i * d
    lr_i = exp(log_lr_k + a_i) * scale_i                         k = matrix | vector
    scale_i = RMS(p_i) + exp(log_floor) / sqrt(fan_in_i)  (matrices: relative to the weight's size;
              1 for vectors -- biases and norm gains -- whose rate is absolute)

``(a_i, c_i) = tanh-bounded outputs of a small MLP`` (hidden 32) applied to each tensor's feature
vector -- the *per-tensor controller*. Its inputs are all scale-free, so the same theta serves any
width, init scale or loss scale:

* ``cos(m_{t-1}, g_t)`` -- alignment of the new gradient with the momentum (the hypergradient
  signal: positive means steps are too short, negative means oscillation);
* ``log(mean m^2 / mean v)`` -- signal-to-noise of the gradient (momentum energy vs second moment);
* ``log(mean g^2 / mean v)`` -- is this gradient unusually large for this tensor (a spike)?
* a vector-parameter flag (biases and norm gains take a separate path: ``log_lr_vector``);
* time features ``tanh(t / tau)`` (tau = 10 .. 10^4) and ``log(1 + t) / 10``: a learned schedule
  (warm-up, decay) that never needs the total number of steps.

Why this design (the measurements are in the README's "learned optimizer" section):

* **Per-tensor, not per-coordinate, network.** A per-coordinate MLP of hidden size h costs
  ~4h FLOPs and >= h passes over memory per parameter; our old ``mlp`` rule measured 42x
  ``torch.optim.Adam(foreach=True).step`` (h = 32) and 28x (h = 8). The controller here costs
  O(number of tensors); the per-coordinate work is Adam's plus five per-tensor reductions and one
  extra ``addcdiv``, about 2x Adam's memory traffic.
* **Strong hand-designed direction.** Adam's direction is already scale-invariant per coordinate;
  the controller only has to learn *how far* to go per tensor and per phase of training, which is
  where tuned Adam loses (one global, constant learning rate).
* **Relative step size.** ``scale_i`` makes the step proportional to the weight's RMS (VeLO,
  LARS, Adafactor), so a random per-tensor reparameterization ``w = s * w'`` (the Celo task
  augmentation used in meta-training) leaves the trajectory of ``w`` unchanged for matrices; the
  floor handles zero-initialized weights.
* **Bounded outputs.** ``a_i`` is ``3 tanh``-bounded (a factor of e^3 either way) and ``c_i`` is
  ``tanh``-bounded, so no theta can produce an unbounded step; with the output layer zero at init
  the fresh rule is exactly Adam with relative learning rates -- a sane optimizer before any
  meta-training.

State: ``step`` (scalar), ``m`` and ``v`` ([N] over the flat view, like the ``adam`` rule).
``step_`` is the in-place fast path used by :class:`metaopt.optim.LearnedOptimizer`; it works on
per-tensor views and never concatenates the parameters.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from metaopt.rules.base import Rule, default_scales, flat_views, register_rule
from metaopt.types import FlatSpec, safe_sqrt, segment_sum

TINY = 1e-30
#: coordinates per chunk of the CPU fast path: the reductions, the moment updates and the update
#: of one chunk (4 arrays of 1 MiB) run while it is in cache; torch's foreach ops on CPU make one
#: pass over memory per op instead
CHUNK = 1 << 18


def powsum(tensors, p):
    """Per-tensor sum of |x|^p as a list of 0-d tensors (one multi-tensor kernel on CUDA)."""
    if hasattr(torch, "_foreach_powsum"):
        return torch._foreach_powsum(tensors, p)
    return [x.abs().pow(p).sum() for x in tensors]


def _fan_in(shape: Tuple[int, ...]) -> int:
    if len(shape) <= 1:
        return 1
    return max(1, math.prod(shape) // shape[0])


def _is_vector(shape: Tuple[int, ...]) -> bool:
    return sum(1 for d in shape if d > 1) <= 1


@register_rule
class PerTensorRule(Rule):
    """Adam's direction scaled per tensor by a small learned controller, the step relative
    to the weight's current RMS (see the module docstring)."""
    name = "pertensor"
    state_layout = {"step": "global", "m": "coord", "v": "coord"}

    def __init__(self, hidden_size: int = 32, lr_matrix: float = 0.03, lr_vector: float = 3e-3,
                 floor: float = 0.1, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 time_taus: Sequence[float] = (10, 100, 1000, 10000), max_log_mult: float = 3.0):
        for k, v in dict(hidden_size=hidden_size, lr_matrix=lr_matrix, lr_vector=lr_vector,
                         floor=floor, max_log_mult=max_log_mult).items():
            if not v > 0:
                raise ValueError(f"Invalid {k}: {v}")
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta1: {beta1}")
        if not 0.0 < beta2 < 1.0:
            raise ValueError(f"Invalid beta2: {beta2}")
        if not eps > 0:
            raise ValueError(f"Invalid eps: {eps}")
        self.hidden_size = int(hidden_size)
        self.lr_matrix, self.lr_vector, self.floor = float(lr_matrix), float(lr_vector), float(floor)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.time_taus = tuple(float(t) for t in time_taus)
        self.max_log_mult = float(max_log_mult)

    def config(self):
        return dict(hidden_size=self.hidden_size, lr_matrix=self.lr_matrix,
                    lr_vector=self.lr_vector, floor=self.floor, beta1=self.beta1,
                    beta2=self.beta2, eps=self.eps, time_taus=list(self.time_taus),
                    max_log_mult=self.max_log_mult)

    @property
    def num_inputs(self) -> int:
        return 4 + len(self.time_taus) + 1

    def init_theta(self, spec=None, generator=None):
        F, H = self.num_inputs, self.hidden_size
        return {
            "w0": torch.randn(F, H, generator=generator) / math.sqrt(F),
            "b0": torch.zeros(H),
            "w1": torch.zeros(H, 2),   # zero output layer: the fresh rule is relative-lr Adam
            "b1": torch.zeros(2),
            "log_lr_matrix": torch.tensor(math.log(self.lr_matrix)),
            "log_lr_vector": torch.tensor(math.log(self.lr_vector)),
            "log_floor": torch.tensor(math.log(self.floor)),
        }

    def init(self, params):
        p = FlatSpec.of(params).flatten(params)
        return {"step": p.new_zeros(()), "m": torch.zeros_like(p), "v": torch.zeros_like(p)}

    # -- the per-tensor controller (shared by ``update`` and ``step_``) -------------------------
    def _const(self, what: str, values, dtype, device) -> Tensor:
        """A constant tensor, built once per (values, dtype, device): a host-to-device copy every
        step would synchronize (torch.cuda.set_sync_debug_mode reports it)."""
        cache = self.__dict__.setdefault("_consts", {})
        key = (what, tuple(values), dtype, str(device))
        if key not in cache:
            cache[key] = torch.tensor(list(values), dtype=dtype).to(device)
        return cache[key]

    def _static(self, spec: FlatSpec, dtype, device):
        """Per-tensor constants: vector flag [T], 1/sqrt(fan_in) [T]."""
        is_vec = self._const("is_vec", [float(_is_vector(s)) for s in spec.shapes], dtype, device)
        fan = self._const("fan", [float(_fan_in(s)) for s in spec.shapes], dtype, device)
        return is_vec, fan.rsqrt()

    def controller(self, theta, spec: FlatSpec, stats: Tensor, step: Tensor) -> Tuple[Tensor, Tensor]:
        """``stats`` [T, 6] per tensor: <m_prev, g>, |m_prev|^2, |g|^2, sum v (new), |p|^2, numel.
        ``step`` = t (>= 1). Returns the learning rate [T] and the gradient share c [T]."""
        dtype, device = stats.dtype, stats.device
        is_vec, inv_sqrt_fan = self._static(spec, dtype, device)
        dot, mm, gg, vsum, pp, n = stats.unbind(-1)
        b1, b2 = self.beta1, self.beta2
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        m_new_sq = b1 * b1 * mm + 2 * b1 * (1 - b1) * dot + (1 - b1) ** 2 * gg
        v_mean = vsum / bc2 / n + TINY
        cos = dot * torch.rsqrt(mm * gg + TINY)
        snr = torch.log(m_new_sq / (bc1 * bc1) / n / v_mean + 1e-8)
        spike = torch.log(gg / n / v_mean + 1e-8)
        p_rms = torch.sqrt(pp / n)
        tf = torch.tanh(step / self._const("taus", self.time_taus, dtype, device))
        glob = torch.cat([tf, torch.log1p(step).reshape(1) / 10])
        # every input is invariant to rescaling a tensor's weights (and its gradients)
        x = torch.cat([torch.stack([cos, snr.clamp(-10, 2) / 5, spike.clamp(-10, 5) / 5,
                                    is_vec], -1),
                       glob.expand(cos.shape[0], glob.shape[0])], -1)
        th = {k: v.to(dtype) for k, v in theta.items()}
        h = torch.relu(x @ th["w0"] + th["b0"])
        out = h @ th["w1"] + th["b1"]
        a = self.max_log_mult * torch.tanh(out[:, 0] / self.max_log_mult)
        c = torch.tanh(out[:, 1])
        log_base = torch.where(is_vec > 0, th["log_lr_vector"], th["log_lr_matrix"])
        scale = torch.where(is_vec > 0, torch.ones_like(p_rms),
                            p_rms + torch.exp(th["log_floor"]) * inv_sqrt_fan)
        return torch.exp(log_base + a) * scale, c

    # -- reference (differentiable, vmappable) path ------------------------------------------------
    def _reference_stats(self, grads, state, params):
        """The moments and per-tensor statistics of ``update`` (differentiable, vmappable):
        (spec, seg, g, p, m, v, step, t, stats) with ``stats`` as :meth:`controller` reads it."""
        spec = FlatSpec.of(params)
        g, p = spec.flatten(grads), spec.flatten(params)
        T = spec.num_tensors
        seg = spec.segment_ids(g.device)
        m_prev, v_prev = state["m"], state["v"]
        step = state["step"] + 1
        t = step.to(g.dtype)
        m = self.beta1 * m_prev + (1 - self.beta1) * g
        v = self.beta2 * v_prev + (1 - self.beta2) * g * g
        n = torch.tensor(spec.numels, dtype=g.dtype, device=g.device)
        sums = [segment_sum(x, seg, T) for x in (m_prev * g, m_prev * m_prev, g * g, v, p * p)]
        stats = torch.stack(sums + [n], -1)
        return spec, seg, g, p, m, v, step, t, stats

    def update(self, theta, grads, state, params, ctx=None):
        spec, seg, g, p, m, v, step, t, stats = self._reference_stats(grads, state, params)
        lr, c = self.controller(theta, spec, stats, t)
        den = safe_sqrt(v / (1 - self.beta2 ** t)) + self.eps
        d = (m / (1 - self.beta1 ** t) + c[seg] * g) / den
        return spec.unflatten(-lr[seg] * d), {"step": step, "m": m, "v": v}

    # -- in-place fast path --------------------------------------------------------------------------
    def _fast_stats(self, params, grads, state, spec, prev_eps=None):
        """The in-place half of ``step_``: per-tensor reductions before the moments move, then
        the moments updated in place. Returns (m_views, v_views, step, t, stats); ``t`` is the
        new step as a tensor on the state's device (never read on the host). CPU only: with
        ``prev_eps``, ``stats`` has two more columns, ``<q, g>`` and ``|q|^2`` with ``q = m_prev /
        (sqrt(v_prev) + prev_eps)`` (the last Adam direction up to a factor), from the same pass."""
        m_all, v_all = state["m"], state["v"]
        dtype, device = v_all.dtype, v_all.device
        b1, b2 = self.beta1, self.beta2
        m_views, v_views = flat_views(m_all, spec), flat_views(v_all, spec)
        step = state["step"] + 1
        if device.type == "cpu":   # tensor by tensor, chunk by chunk, in cache
            # <m_prev,g>, |m_prev|^2, |g|^2, sum v, |p|^2 (, <q, g>, |q|^2)
            cols = 5 if prev_eps is None else 7
            r = torch.empty(len(params), cols, dtype=dtype)
            buf = None if prev_eps is None else torch.empty(
                min(CHUNK, max(p.numel() for p in params)), dtype=dtype)
            for i, (mv, gv, pv, vv) in enumerate(zip(m_views, grads, params, v_views)):
                mf, gf, pf, vf = mv.view(-1), gv.reshape(-1), pv.reshape(-1), vv.view(-1)
                n = mf.numel()
                k = max(1, -(-n // CHUNK))
                part = r[i:i + 1] if k == 1 else torch.empty(k, cols, dtype=dtype)
                for j in range(k):
                    sl = slice(j * CHUNK, (j + 1) * CHUNK)
                    mc, gc, pc, vc, q = mf[sl], gf[sl], pf[sl], vf[sl], part[j]
                    if buf is not None:
                        d = torch.sqrt(vc, out=buf[:mc.numel()]).add_(prev_eps)
                        torch.div(mc, d, out=d)
                        torch.dot(d, gc, out=q[5])
                        torch.dot(d, d, out=q[6])
                    torch.dot(mc, gc, out=q[0])
                    torch.dot(mc, mc, out=q[1])
                    torch.dot(gc, gc, out=q[2])
                    torch.dot(pc, pc, out=q[4])
                    mc.lerp_(gc, 1 - b1)
                    vc.mul_(b2).addcmul_(gc, gc, value=1 - b2)
                    torch.sum(vc, 0, out=q[3])
                if k > 1:
                    torch.sum(part, 0, out=r[i])
        else:   # accelerators: multi-tensor kernels, nothing read on the host
            mm, gg, pp = powsum(m_views, 2), powsum(grads, 2), powsum(params, 2)
            dot = [x.sum() for x in torch._foreach_mul(m_views, grads)]  # no foreach dot product
            torch._foreach_lerp_(m_views, grads, 1 - b1)
            torch._foreach_mul_(v_views, b2)
            torch._foreach_addcmul_(v_views, grads, grads, value=1 - b2)
            vsum = powsum(v_views, 1)                                    # v >= 0
            r = torch.stack([torch.stack(x) for x in (dot, mm, gg, vsum, pp)], -1)
        n = self._const("numel", spec.numels, dtype, device)
        stats = torch.cat([r[:, :5], n[:, None], r[:, 5:]], -1)
        return m_views, v_views, step, step.to(dtype), stats

    def _apply_(self, params, grads, m_views, v_all, spec, lr, c, t, scales, wd=None) -> None:
        """``p -= s_i lr_i (m / (1 - b1^t) + c_i g) / (sqrt(v / (1 - b2^t)) + eps)``, in place,
        after ``p *= 1 - s_i wd_i lr_i`` when ``wd`` [T] is given. ``t``: the step, a tensor."""
        b1, b2 = self.beta1, self.beta2
        v_views = flat_views(v_all, spec)
        if v_all.device.type == "cpu":   # host reads of CPU tensors are free
            tf = float(t)
            bc1, sb2 = 1 - b1 ** tf, math.sqrt(1 - b2 ** tf)
            eps = self.eps * sb2         # sqrt(v / bc2) + eps = (sqrt(v) + eps sqrt(bc2)) / sqrt(bc2)
            lr_l, c_l = lr.tolist(), c.tolist()
            wd_l = wd.tolist() if wd is not None else None
            buf = torch.empty(min(CHUNK, max(p.numel() for p in params)), dtype=v_all.dtype)
            for i, (p, g, mv, vv) in enumerate(zip(params, grads, m_views, v_views)):
                a = -lr_l[i] * scales[i] * sb2
                am, ag = a / bc1, a * c_l[i]
                keep = 1.0 - scales[i] * wd_l[i] * lr_l[i] if wd_l is not None else 1.0
                if not p.is_contiguous():   # no flat view of p: whole-tensor ops
                    d = vv.sqrt().add_(eps)
                    if keep != 1.0:
                        p.mul_(keep)
                    p.addcdiv_(mv, d, value=am).addcdiv_(g, d, value=ag)
                    continue
                pf, gf, mf, vf = p.view(-1), g.reshape(-1), mv.view(-1), vv.view(-1)
                for s in range(0, pf.numel(), CHUNK):
                    sl = slice(s, s + CHUNK)
                    pc = pf[sl]
                    d = torch.sqrt(vf[sl], out=buf[:pc.numel()]).add_(eps)
                    if keep != 1.0:
                        pc.mul_(keep)
                    pc.addcdiv_(mf[sl], d, value=am).addcdiv_(gf[sl], d, value=ag)
            return
        # accelerators: per-tensor factors as 0-d device tensors (the ScalarList overloads need
        # host floats, and the packed-Tensor overload of _foreach_addcdiv_ requires CPU scalars)
        dtype, device = v_all.dtype, v_all.device
        sc = torch.as_tensor(scales, dtype=dtype).to(device, non_blocking=True)
        a = -lr * sc
        bc1 = 1 - b1 ** t
        den = torch._foreach_sqrt(v_views)
        torch._foreach_div_(den, torch.sqrt(1 - b2 ** t))   # 0-d tensor overload: no sync
        torch._foreach_add_(den, self.eps)                  # (the 0-d tensor overload of add reads it)
        if wd is not None:
            torch._foreach_mul_(params, list((1 + a * wd).unbind()))
        # den * bc1 / a: p += m / that = (a / bc1) m / den; a == 0 gives inf, so a zero step
        torch._foreach_mul_(den, list((bc1 / a).unbind()))
        torch._foreach_addcdiv_(params, m_views, den)
        # then * 1 / (bc1 c): p += g / that = a c g / den (c == 0: inf, no gradient share)
        torch._foreach_mul_(den, list((bc1 * c).reciprocal().unbind()))
        torch._foreach_addcdiv_(params, grads, den)

    @torch.no_grad()
    def step_(self, theta, params, grads, state, spec, ctx=None, scales=None):
        scales = default_scales(scales, len(params))
        params, grads = list(params), list(grads)
        m_views, _, step, t, stats = self._fast_stats(params, grads, state, spec)
        v_all = state["v"]
        lr, c = self.controller(theta, spec, stats, t)
        self._apply_(params, grads, m_views, v_all, spec, lr, c, t, scales)
        return {"step": step, "m": state["m"], "v": v_all}
