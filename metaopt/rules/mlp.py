"""A learned per-coordinate MLP update rule (learned_optimization's MLP LOpt, in PyTorch).

Inputs per coordinate (flat view of all parameters): parameter, gradient, momenta at several
decays, RMS (sqrt of a 0.999 second moment), gradient and momenta divided by that RMS, a
"vector parameter" flag; each per-coordinate feature is normalized by its RMS over its tensor.
Global inputs: time features ``tanh(t / tau)``; optionally per-layer activation statistics and
the loss surprise (see :mod:`metaopt.rules.features`).

Output: ``step = direction * exp(magnitude * 1e-3) * 1e-3 * exp(log_scale)``, ``p <- p - step``.
The 1e-3 multipliers keep an untrained rule's steps tiny and stable; ``log_scale`` (a learned
scalar, 0 at init so the fresh rule is exactly the formula above) lets meta-training move the
overall step size in log space instead of growing every output weight.

``step_`` is an in-place no-grad fast path (see :mod:`metaopt.rules.base`) used by
:class:`metaopt.optim.LearnedOptimizer`. It never builds the [N, F] feature matrix: it walks the
flat layout in windows of ``chunk_rows`` coordinates (so the [rows, hidden] intermediates stay in
cache), updating the moments and summing the squared features per tensor in a first pass; in a
second pass, within one tensor, the per-tensor RMS normalization is folded into the rows of the
first-layer weights and the per-tensor inputs (vector flag, time, loss surprise, activations)
into the first-layer bias, so each window costs one ``addmm`` per layer.
"""
from __future__ import annotations

from functools import lru_cache
from typing import List, Sequence, Tuple

import math

import torch

from metaopt.activations import NUM_ACT_FEATURES
from metaopt.rules.base import Rule, default_scales, register_rule
from metaopt.rules.features import (SURPRISE_LAYOUT, act_features, init_surprise_state,
                                    loss_surprise, normalize_per_tensor, require_loss,
                                    time_features)
from metaopt.rules.layout import COORD, GLOBAL
from metaopt.types import FlatSpec, safe_sqrt


@lru_cache(maxsize=64)
def _windows(numels: Tuple[int, ...], rows: int) -> List[Tuple[int, int, Tuple[Tuple[int, int, int], ...]]]:
    """Cut the flat layout into windows ``[start, stop)`` of at most ``rows`` coordinates; each
    window lists its pieces ``(tensor index, begin, end)`` (coordinates within that tensor)."""
    out, pieces, start, pos = [], [], 0, 0
    for t, n in enumerate(numels):
        b = 0
        while b < n:
            e = min(n, b + rows - (pos - start))
            pieces.append((t, b, e))
            pos += e - b
            b = e
            if pos - start == rows:
                out.append((start, pos, tuple(pieces)))
                pieces, start = [], pos
    if pieces:
        out.append((start, pos, tuple(pieces)))
    return out


def _build_consts(numels: Tuple[int, ...], vec: Tuple[bool, ...], dtype, device):
    seg = torch.repeat_interleave(torch.arange(len(numels)), torch.tensor(numels))
    onehot = torch.nn.functional.one_hot(seg, len(numels)).to(dtype=dtype, device=device)
    counts = torch.tensor(numels, dtype=dtype, device=device)
    return onehot, onehot / counts, torch.tensor(vec, dtype=dtype, device=device)


_consts_cached = lru_cache(maxsize=64)(_build_consts)


def _consts(spec: FlatSpec, dtype, device):
    """(one-hot layout [N, T], one-hot / numel [N, T], vector flags [T]) of a flat layout;
    cached per layout (built in the graph when torch.compile traces the rule)."""
    key = (tuple(spec.numels), tuple(len(s) <= 1 for s in spec.shapes), dtype,
           torch.device(device) if device is not None else torch.device("cpu"))
    return _build_consts(*key) if torch.compiler.is_compiling() else _consts_cached(*key)


@register_rule
class MLPRule(Rule):
    """learned_optimization's per-coordinate MLP optimizer: normalized per-coordinate
    features in, ``direction * exp(magnitude * 1e-3) * 1e-3`` out."""
    name = "mlp"
    #: ``m`` is [len(decays), N]: one momentum per decay, per coordinate
    state_layout = {"step": GLOBAL, "m": COORD, "v": COORD, **SURPRISE_LAYOUT}
    #: coordinates per window in ``step_``
    chunk_rows: int = 16384

    def __init__(self, hidden_size: int = 32, num_layers: int = 2,
                 decays: Sequence[float] = (0.5, 0.9, 0.99, 0.999), rms_decay: float = 0.999,
                 time_taus: Sequence[float] = (1, 3, 10, 30, 100, 300, 1000, 3000),
                 act_features: bool = False, loss_features: bool = False,
                 step_mult: float = 1e-3, exp_mult: float = 1e-3):
        if hidden_size < 1:
            raise ValueError(f"Invalid hidden_size: {hidden_size}")
        if num_layers < 1:
            raise ValueError(f"Invalid num_layers: {num_layers}")
        if len(decays) < 3 or not all(0 < d < 1 for d in decays):
            raise ValueError(f"Invalid decays: {list(decays)} (need >= 3 values in (0, 1))")
        if not 0 < rms_decay < 1:
            raise ValueError(f"Invalid rms_decay: {rms_decay}")
        self.hidden_size, self.num_layers = int(hidden_size), int(num_layers)
        self.decays, self.rms_decay = tuple(float(d) for d in decays), float(rms_decay)
        self.time_taus = tuple(float(t) for t in time_taus)
        self.act_features, self.loss_features = bool(act_features), bool(loss_features)
        self.needs_activations, self.needs_loss = self.act_features, self.loss_features
        self.step_mult, self.exp_mult = float(step_mult), float(exp_mult)

    def config(self):
        return dict(hidden_size=self.hidden_size, num_layers=self.num_layers,
                    decays=list(self.decays), rms_decay=self.rms_decay,
                    time_taus=list(self.time_taus), act_features=self.act_features,
                    loss_features=self.loss_features, step_mult=self.step_mult,
                    exp_mult=self.exp_mult)

    @property
    def num_inputs(self) -> int:
        k = len(self.decays)
        n = 2 + k + 1 + 1 + k + 1  # p, g, m_k, rms, g/rms, m_k/rms, vector flag
        n += len(self.time_taus)
        n += NUM_ACT_FEATURES if self.act_features else 0
        n += 1 if self.loss_features else 0
        return n

    def init_theta(self, spec=None, generator=None):
        sizes = [self.num_inputs] + [self.hidden_size] * self.num_layers + [2]
        theta = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            theta[f"w{i}"] = torch.randn(a, b, generator=generator) / math.sqrt(a)
            theta[f"b{i}"] = torch.zeros(b)
        theta["log_scale"] = torch.zeros(())
        return theta

    def init(self, params):
        p = FlatSpec.of(params).flatten(params)
        state = {"step": p.new_zeros(()), "m": p.new_zeros((len(self.decays),) + p.shape),
                 "v": torch.zeros_like(p)}
        if self.loss_features:
            state.update(init_surprise_state(p))
        return state

    def features(self, g, p, m, v, spec, step, ctx, state):
        """The [N, num_inputs] input matrix, as the rule's MLP sees it (for inspection and tests;
        :meth:`update` computes the same first layer without building it)."""
        seg = spec.segment_ids(g.device)
        per_coord = normalize_per_tensor(self._per_coord(p, g, m, v), seg, spec.num_tensors)
        per_tensor, extra = self._per_tensor_inputs(spec, step, ctx, state, g.dtype, g.device)
        return torch.cat([per_coord, per_tensor[seg]], dim=1), extra

    @staticmethod
    def _per_coord(p, g, m, v):
        """[N, F] un-normalized per-coordinate inputs: p, g, m_k, sqrt(v), g / sqrt(v), m_k / sqrt(v)
        (``_raw_features`` writes the same rows, transposed, in place)."""
        rsq = torch.rsqrt(v + 1e-12)
        return torch.stack([p, g, *m, safe_sqrt(v), g * rsq, *(m * rsq)], dim=1)

    def _per_tensor_inputs(self, spec, step, ctx, state, dtype, device):
        """[num_tensors, 1 + globals (+ act)]: vector flag, time features (and loss surprise),
        activation statistics -- the inputs shared by every coordinate of a tensor."""
        T = spec.num_tensors
        is_vec = _consts(spec, dtype, device)[2]
        glob = [time_features(step, self.time_taus)]
        extra = {}
        if self.loss_features:
            s, mean, var = loss_surprise(state, require_loss(ctx, self.name))
            glob.append(s.reshape(1))
            extra.update(loss_mean=mean, loss_var=var)
        glob = torch.cat(glob).to(dtype)
        cols = [is_vec[:, None], glob.expand(T, glob.shape[0])]
        if self.act_features:
            cols.append(act_features(spec, ctx, dtype, device))
        return torch.cat(cols, dim=1), extra

    def update(self, theta, grads, state, params, ctx=None):
        spec = FlatSpec.of(params)
        g, p = spec.flatten(grads), spec.flatten(params)
        dtype, device = g.dtype, g.device
        onehot, mean_w, _ = _consts(spec, dtype, device)  # [N, T], [N, T] / numel, [T]
        decays = torch.tensor(self.decays, dtype=dtype, device=device)[:, None]
        m = decays * state["m"] + (1 - decays) * g
        v = self.rms_decay * state["v"] + (1 - self.rms_decay) * g * g
        per_coord = self._per_coord(p, g, m, v)                                          # [N, F]
        F = per_coord.shape[1]
        # per-tensor RMS normalization of every column and the per-tensor inputs, through the
        # one-hot [N, T] layout matrix: two skinny matmuls instead of index_add + gather (fewer,
        # vmap-friendly ops; the same numbers as features() up to summation order)
        inv_rms = torch.rsqrt(mean_w.transpose(0, 1) @ (per_coord * per_coord) + 1e-8)  # [T, F]
        per_tensor, extra = self._per_tensor_inputs(spec, state["step"].to(dtype), ctx, state,
                                                    dtype, device)
        w0, b0 = theta["w0"].to(dtype), theta["b0"].to(dtype)
        bias = per_tensor @ w0[F:] + b0                                                 # [T, H]
        x = (per_coord * (onehot @ inv_rms)) @ w0[:F] + onehot @ bias                   # [N, H]
        for i in range(1, self.num_layers + 1):
            x = torch.relu(x) @ theta[f"w{i}"].to(dtype) + theta[f"b{i}"].to(dtype)
        direction, magnitude = x[:, 0], x[:, 1]
        step = direction * torch.exp(magnitude * self.exp_mult) * self.step_mult
        step = step * torch.exp(theta["log_scale"].to(dtype))
        new_state = {"step": state["step"] + 1, "m": m, "v": v, **extra}
        return spec.unflatten(-step), new_state

    # -- in-place fast path ----------------------------------------------------------------------
    def _raw_features(self, out, p, g, m, v):
        """Un-normalized per-coordinate features, transposed: ``out`` [F, r] (rows as in
        :meth:`features`: p, g, m_k, sqrt(v), g / sqrt(v), m_k / sqrt(v))."""
        k = len(self.decays)
        out[0].copy_(p)
        out[1].copy_(g)
        out[2:2 + k].copy_(m)
        torch.sqrt(v, out=out[2 + k])
        rsq = torch.rsqrt(v + 1e-12)
        torch.mul(g, rsq, out=out[3 + k])
        torch.mul(m, rsq, out=out[4 + k:])
        return out

    @torch.no_grad()
    def step_(self, theta, params, grads, state, spec, ctx=None, scales=None):
        scales = default_scales(scales, len(params))
        m_all, v_all = state["m"], state["v"]
        dtype, device = v_all.dtype, v_all.device
        F, T = 2 * len(self.decays) + 4, spec.num_tensors
        numels = spec.numels
        windows = _windows(numels, int(self.chunk_rows))
        rows = max((b - a for a, b, _ in windows), default=0)
        flat_p = [p.reshape(-1) for p in params]  # views (copies are written back at the end)
        flat_g = [g.reshape(-1) for g in grads]
        dec = torch.tensor(self.decays, dtype=dtype, device=device)[:, None]
        one_m_dec = 1 - dec
        rd = self.rms_decay
        buf = torch.empty(F * rows, dtype=dtype, device=device)

        def window_pg(pieces):
            if len(pieces) == 1:
                t, b, e = pieces[0]
                return flat_p[t][b:e], flat_g[t][b:e]
            return (torch.cat([flat_p[t][b:e] for t, b, e in pieces]),
                    torch.cat([flat_g[t][b:e] for t, b, e in pieces]))

        def local_seg(pieces):
            return torch.repeat_interleave(
                torch.tensor([t for t, _, _ in pieces], device=device),
                torch.tensor([e - b for _, b, e in pieces], device=device))

        # pass 1: moments in place; per-tensor sums of the squared per-coordinate features
        sumsq = torch.zeros(T, F, dtype=dtype, device=device)
        for a, b, pieces in windows:
            p_c, g_c = window_pg(pieces)
            m_c, v_c = m_all[:, a:b], v_all[a:b]
            m_c.mul_(dec).addcmul_(one_m_dec, g_c)
            v_c.mul_(rd).addcmul_(g_c, g_c, value=1 - rd)
            x = self._raw_features(buf[:F * (b - a)].view(F, b - a), p_c, g_c, m_c, v_c)
            sq = x * x
            if len(pieces) == 1:
                sumsq[pieces[0][0]] += sq.sum(1)
            else:
                sumsq.index_add_(0, local_seg(pieces), sq.t())
        counts = torch.tensor(numels, dtype=dtype, device=device)
        r = torch.rsqrt(sumsq / counts[:, None] + 1e-8)  # [T, F], as normalize_per_tensor

        # per-tensor inputs, folded into a per-tensor first-layer bias
        per_tensor, extra = self._per_tensor_inputs(spec, state["step"].to(dtype), ctx, state,
                                                    dtype, device)
        w = [theta[f"w{i}"].to(dtype) for i in range(self.num_layers + 1)]
        bias = [theta[f"b{i}"].to(dtype) for i in range(self.num_layers + 1)]
        w0, w0_rest = w[0][:F], w[0][F:]
        bias0 = torch.addmm(bias[0], per_tensor, w0_rest)  # [T, H]
        w0_t = r[:, :, None] * w0  # [T, F, H]: row c of tensor t's W0 times 1/RMS_t(c)
        mult = self.step_mult * float(torch.exp(theta["log_scale"].to(dtype)))

        # pass 2: the MLP on each window, and the parameter update
        for a, b, pieces in windows:
            p_c, g_c = window_pg(pieces)
            x = self._raw_features(buf[:F * (b - a)].view(F, b - a), p_c, g_c,
                                   m_all[:, a:b], v_all[a:b])
            if len(pieces) == 1:
                t = pieces[0][0]
                h = torch.addmm(bias0[t], x.t(), w0_t[t])
            else:
                seg = local_seg(pieces)
                h = torch.addmm(bias0[seg], (x * r.t()[:, seg]).t(), w0)
            for i in range(1, self.num_layers + 1):
                h.relu_()
                h = torch.addmm(bias[i], h, w[i])
            step = torch.mul(h[:, 1], self.exp_mult).exp_().mul_(h[:, 0])
            lo = 0
            for t, pb, pe in pieces:
                flat_p[t][pb:pe].add_(step[lo:lo + pe - pb], alpha=-mult * scales[t])
                lo += pe - pb
        for p, fp in zip(params, flat_p):
            if fp.data_ptr() != p.data_ptr() or not p.is_contiguous():
                p.copy_(fp.view(p.shape))
        return {"step": state["step"] + 1, "m": m_all, "v": v_all, **extra}
