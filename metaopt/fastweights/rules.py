"""Write rules for fast weights: how a sequence programs a matrix ``W`` (``d_value x d_key``).

Every rule is a recurrence ``W_t = W_{t-1} + write(W_{t-1}, k_t, v_t, ...)`` and a read
``y_t = W_t q_t`` (the read sees the current write). Shapes, batch first: ``q, k (B, T, dk)``,
``v (B, T, dv)``, per-step scalars ``(B, T)``, ``W (B, dv, dk)``.

* ``sum``     (linear attention, Katharopoulos et al. 2020): ``W += v k^T``.
* ``delta``   (DeltaNet, Schlag et al. 2021): ``W += beta (v - W k) k^T``; this is one step of
  online gradient descent with step ``beta`` on ``1/2 ||W k - v||^2``.
* ``hebbian`` (neuromodulated, Miconi et al. 2019): ``W = decay W + m v k^T`` with a signed,
  learned gate ``m_t``.
* ``ttt``     (TTT-Linear, Sun et al. 2024): mini-batch gradient descent on
  ``l(W) = ||f(W k) - v||^2`` (``f`` = identity or a LayerNorm); inside a mini-batch every
  gradient is taken at the mini-batch's first ``W`` and the steps add up causally.
  With ``W0 = 0``, one mini-batch covering the sequence (batch GD), ``eta = 1/2`` and no norm,
  this is exactly causal linear attention; with mini-batch 1 it is the delta rule (``beta = 2 eta``).
* ``learned`` a small per-coordinate network produces the write:
  ``u_i = beta (a v_i + b (Wk)_i + mlp(v_i, (Wk)_i, beta, |k|^2)_i)``, ``W += u k^T``
  (initialized at the sum rule: ``a = 1, b = 0``, mlp output zero).

Pass ``q=None`` to only write (returns ``(None, W)``).

``*_recurrent`` are the readable references (any rule); ``sum_chunkwise`` and
``delta_chunkwise`` are the chunkwise-parallel forms (tested equal): within a chunk of ``C``
steps the writes are a triangular system (the WY form of DeltaNet, Yang et al. 2024), so the
Python loop runs ``T / C`` times instead of ``T``.
``hebbian_parallel`` has no loop at all: the decayed, gated sum is one masked attention.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the fast-weight write rules of FastWeightProgrammer (not metaopt.rules.RULES, the optimizer rules)
WRITE_RULES = ("sum", "delta", "hebbian", "ttt", "learned")
CHUNKWISE_RULES = ("sum", "delta")


def _init_state(k: Tensor, v: Tensor, W0: Optional[Tensor]) -> Tensor:
    B, dk, dv = k.shape[0], k.shape[-1], v.shape[-1]
    if W0 is None:
        return k.new_zeros(B, dv, dk)
    if W0.shape != (B, dv, dk):
        raise ValueError(f"Invalid W0 shape: {tuple(W0.shape)} (expected {(B, dv, dk)})")
    return W0


def _matvec(W: Tensor, x: Tensor) -> Tensor:  # (B, dv, dk) @ (B, dk) -> (B, dv)
    return torch.bmm(W, x.unsqueeze(-1)).squeeze(-1)


def _stack(ys, dim: int = 1):
    return torch.stack(ys, dim) if ys else None


def _outer(u: Tensor, k: Tensor) -> Tensor:  # (B, dv), (B, dk) -> (B, dv, dk)
    return u.unsqueeze(-1) * k.unsqueeze(-2)


# -- recurrent references ---------------------------------------------------------------------
def sum_recurrent(q: Optional[Tensor], k: Tensor, v: Tensor, W0: Optional[Tensor] = None
                  ) -> Tuple[Tensor, Tensor]:
    """Sum rule (linear attention) step by step: ``W += v_t k_t^T``, read ``W q_t``.
    Returns ``(y (B, T, dv) or None, final W)``."""
    W = _init_state(k, v, W0)
    ys = []
    for t in range(k.shape[1]):
        W = W + _outer(v[:, t], k[:, t])
        if q is not None:
            ys.append(_matvec(W, q[:, t]))
    return _stack(ys), W


def delta_recurrent(q: Optional[Tensor], k: Tensor, v: Tensor, beta: Tensor,
                    W0: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Delta rule step by step: ``W += beta_t (v_t - W k_t) k_t^T`` (``beta (B, T)``).
    Returns ``(y or None, final W)``."""
    W = _init_state(k, v, W0)
    ys = []
    for t in range(k.shape[1]):
        kt = k[:, t]
        u = beta[:, t, None] * (v[:, t] - _matvec(W, kt))
        W = W + _outer(u, kt)
        if q is not None:
            ys.append(_matvec(W, q[:, t]))
    return _stack(ys), W


def _decay(decay, B: int) -> Tensor:
    """A float or per-sequence ``(B,)`` decay as something that scales ``W (B, dv, dk)``."""
    return decay.reshape(B, 1, 1) if isinstance(decay, Tensor) else decay


def hebbian_recurrent(q: Optional[Tensor], k: Tensor, v: Tensor, gate: Tensor, decay=1.0,
                      W0: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Neuromodulated Hebbian rule: ``W = decay W + m_t v_t k_t^T`` with the signed gate
    ``m = gate (B, T)``; ``decay`` a float or a per-sequence tensor ``(B,)``.
    Returns ``(y or None, final W)``."""
    W = _init_state(k, v, W0)
    lam = _decay(decay, k.shape[0])
    ys = []
    for t in range(k.shape[1]):
        W = lam * W + _outer(gate[:, t, None] * v[:, t], k[:, t])
        if q is not None:
            ys.append(_matvec(W, q[:, t]))
    return _stack(ys), W


def _layer_norm_fwd_bwd(z: Tensor, target: Tensor, gain: Tensor, bias: Tensor, eps: float):
    """Output ``LN(z) * gain + bias`` and the gradient of ``||out - target||^2`` w.r.t. ``z``."""
    mu = z.mean(-1, keepdim=True)
    sigma = (z.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    xh = (z - mu) / sigma
    out = xh * gain + bias
    dxh = 2 * (out - target) * gain
    dz = (dxh - dxh.mean(-1, keepdim=True) - xh * (dxh * xh).mean(-1, keepdim=True)) / sigma
    return out, dz


def ttt_recurrent(q: Optional[Tensor], k: Tensor, v: Tensor, lr: Tensor, mini_batch: int = 16,
                  W0: Optional[Tensor] = None, ln: Optional[Tuple[Tensor, Tensor]] = None,
                  eps: float = 1e-5) -> Tuple[Tensor, Tensor]:
    """TTT-Linear. ``lr (B, T)`` is the per-token inner learning rate; ``ln = (gain, bias)``
    puts a LayerNorm in the inner model (``f(Wk) = LN(Wk)``), also applied to the read."""
    if mini_batch < 1:
        raise ValueError(f"Invalid mini_batch: {mini_batch}")
    W = _init_state(k, v, W0)
    ys = []
    T = k.shape[1]
    for s in range(0, T, mini_batch):
        K, V, eta = k[:, s:s + mini_batch], v[:, s:s + mini_batch], lr[:, s:s + mini_batch]
        Z = torch.bmm(K, W.transpose(1, 2))                       # W_start k_t   (B, b, dv)
        if ln is None:
            G = 2 * (Z - V)                                       # d l / d (W k)
        else:
            _, G = _layer_norm_fwd_bwd(Z, V, ln[0], ln[1], eps)
        G = eta.unsqueeze(-1) * G
        if q is not None:  # W_t = W_start - sum_{tau <= t} G_tau k_tau^T ;  y_t = f(W_t q_t)
            Q = q[:, s:s + mini_batch]
            Y = torch.bmm(Q, W.transpose(1, 2)) - torch.bmm(
                torch.tril(torch.bmm(Q, K.transpose(1, 2))), G)
            if ln is not None:
                mu = Y.mean(-1, keepdim=True)
                Y = (Y - mu) / (Y.var(-1, unbiased=False, keepdim=True) + eps).sqrt() * ln[0] + ln[1]
            ys.append(Y)
        W = W - torch.bmm(G.transpose(1, 2), K)
    return (torch.cat(ys, 1) if ys else None), W


class WriteNet(nn.Module):
    """The ``learned`` rule's write network, shared across value coordinates (like a
    per-coordinate learned optimizer): input ``(v_i, (Wk)_i, beta, |k|^2)``."""

    n_features = 4

    def __init__(self, hidden: int = 16):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"Invalid hidden: {hidden}")
        self.a = nn.Parameter(torch.ones(()))
        self.b = nn.Parameter(torch.zeros(()))
        self.fc1 = nn.Linear(self.n_features, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, v: Tensor, Wk: Tensor, beta: Tensor, k: Tensor) -> Tensor:
        kk = (k * k).sum(-1, keepdim=True).expand_as(v)
        feats = torch.stack([v, Wk, beta[:, None].expand_as(v), kk], -1)
        mlp = self.fc2(torch.tanh(self.fc1(feats))).squeeze(-1)
        return beta[:, None] * (self.a * v + self.b * Wk + mlp)


def learned_recurrent(q: Optional[Tensor], k: Tensor, v: Tensor, beta: Tensor, net: WriteNet,
                      W0: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Learned write: ``W += u_t k_t^T`` with ``u`` from the per-coordinate write network
    ``net`` (:class:`WriteNet`). Returns ``(y or None, final W)``."""
    W = _init_state(k, v, W0)
    ys = []
    for t in range(k.shape[1]):
        kt = k[:, t]
        u = net(v[:, t], _matvec(W, kt), beta[:, t], kt)
        W = W + _outer(u, kt)
        if q is not None:
            ys.append(_matvec(W, q[:, t]))
    return _stack(ys), W


# -- chunkwise-parallel forms -------------------------------------------------------------------
def _chunk(x: Tensor, C: int) -> Tensor:
    """(B, T, ...) -> (B, n, C, ...), zero-padded at the end (a zero key/beta writes nothing)."""
    B, T = x.shape[:2]
    pad = (-T) % C
    if pad:
        x = torch.cat([x, x.new_zeros(B, pad, *x.shape[2:])], 1)
    return x.reshape(B, -1, C, *x.shape[2:])


def sum_chunkwise(q: Optional[Tensor], k: Tensor, v: Tensor, W0: Optional[Tensor] = None,
                  chunk_size: int = 64) -> Tuple[Tensor, Tensor]:
    """The sum rule in chunks of ``chunk_size`` steps (equal to :func:`sum_recurrent`, with
    ``T / chunk_size`` Python iterations). Returns ``(y or None, final W)``."""
    if chunk_size < 1:
        raise ValueError(f"Invalid chunk_size: {chunk_size}")
    W = _init_state(k, v, W0)
    T = k.shape[1]
    K, V = _chunk(k, chunk_size), _chunk(v, chunk_size)
    if q is None:
        return None, W + torch.bmm(v.transpose(1, 2), k)
    Q = _chunk(q, chunk_size)
    intra = torch.tril(Q @ K.transpose(-1, -2)) @ V            # (B, n, C, dv), all chunks at once
    ys = []
    for i in range(K.shape[1]):
        ys.append(torch.bmm(Q[:, i], W.transpose(1, 2)) + intra[:, i])
        W = W + torch.bmm(V[:, i].transpose(1, 2), K[:, i])
    return torch.cat(ys, 1)[:, :T], W


def hebbian_parallel(q: Optional[Tensor], k: Tensor, v: Tensor, gate: Tensor, decay=1.0,
                     W0: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """:func:`hebbian_recurrent` without a loop over time (tested equal): unrolled,
    ``W_t = decay^(t+1) W0 + sum_{s <= t} decay^(t-s) m_s v_s k_s^T``, so the reads are one
    masked, decayed attention ``y = (tril(Q K^T) * decay^(t-s) * m_s) V`` (plus ``W0``'s part).
    Memory ``O(B T^2)``: meant for short sequences (``T`` up to a few hundred)."""
    B, T = k.shape[:2]
    W = _init_state(k, v, W0)
    lam = torch.as_tensor(decay, dtype=k.dtype, device=k.device).expand(B) \
        if not isinstance(decay, Tensor) else decay
    t = torch.arange(T, device=k.device)
    lag = (t[:, None] - t[None, :]).clamp_min(0).to(k.dtype)           # (T, T): t - s
    causal = t[:, None] >= t[None, :]
    D = torch.where(causal, lam.reshape(B, 1, 1) ** lag, torch.zeros((), dtype=k.dtype,
                                                                     device=k.device))
    last = lam.reshape(B, 1) ** (T - 1 - t.to(k.dtype))                # decay^(T-1-s)   (B, T)
    W_end = torch.bmm((v * (gate * last).unsqueeze(-1)).transpose(1, 2), k)
    if W0 is not None:
        W_end = W_end + lam.reshape(B, 1, 1) ** T * W
    if q is None:
        return None, W_end
    y = torch.bmm(torch.bmm(q, k.transpose(1, 2)) * D * gate.unsqueeze(1), v)
    if W0 is not None:
        y = y + lam.reshape(B, 1, 1) ** (t.to(k.dtype) + 1).reshape(1, T, 1) * \
            torch.bmm(q, W.transpose(1, 2))
    return y, W_end


def delta_chunkwise(q: Optional[Tensor], k: Tensor, v: Tensor, beta: Tensor,
                    W0: Optional[Tensor] = None, chunk_size: int = 64) -> Tuple[Tensor, Tensor]:
    """Within a chunk, the pseudo-values ``u_t = beta_t (v_t - W_{t-1} k_t)`` solve
    ``(I + tril(diag(beta) K K^T, -1)) U = diag(beta) (V - K W_start^T)``; the inverse does not
    depend on ``W_start``, so it is computed for all chunks at once."""
    if chunk_size < 1:
        raise ValueError(f"Invalid chunk_size: {chunk_size}")
    W = _init_state(k, v, W0)
    T = k.shape[1]
    K, V = _chunk(k, chunk_size), _chunk(v, chunk_size)
    Bt = _chunk(beta, chunk_size)                               # (B, n, C)
    C = K.shape[2]
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    L = torch.tril(Bt.unsqueeze(-1) * (K @ K.transpose(-1, -2)), -1)
    Tinv = torch.linalg.solve_triangular(eye + L, eye.expand_as(L), upper=False,
                                         unitriangular=True)
    A = Tinv * Bt.unsqueeze(-2)                                 # (I + L)^-1 diag(beta)
    AK, AV = A @ K, A @ V
    if q is not None:
        Q = _chunk(q, chunk_size)
        QK = torch.tril(Q @ K.transpose(-1, -2))
    ys = []
    for i in range(K.shape[1]):
        U = AV[:, i] - torch.bmm(AK[:, i], W.transpose(1, 2))
        if q is not None:
            ys.append(torch.bmm(Q[:, i], W.transpose(1, 2)) + torch.bmm(QK[:, i], U))
        W = W + torch.bmm(U.transpose(1, 2), K[:, i])
    return (torch.cat(ys, 1)[:, :T] if ys else None), W


# -- feature maps -------------------------------------------------------------------------------
FEATURE_MAPS = ("identity", "elu1", "dpfp")


def feature_dim(name: str, d: int, nu: int = 1) -> int:
    if name not in FEATURE_MAPS:
        raise ValueError(f"Unknown feature_map: {name!r} (known: {', '.join(FEATURE_MAPS)})")
    return 2 * nu * d if name == "dpfp" else d


def feature_map(x: Tensor, name: str, nu: int = 1) -> Tensor:
    """Key/query feature map ``name``: ``identity``, ``elu1`` (``elu(x) + 1``) or ``dpfp``
    (Schlag et al.'s deterministic parameter-free projection of order ``nu``, ``2 nu d``
    features)."""
    if name == "identity":
        return x
    if name == "elu1":
        return F.elu(x) + 1
    if name == "dpfp":  # Schlag et al.: products of rectified [x, -x] with rolled copies
        r = torch.cat([F.relu(x), F.relu(-x)], -1)
        return torch.cat([r * r.roll(i, dims=-1) for i in range(1, nu + 1)], -1)
    raise ValueError(f"Unknown feature_map: {name!r} (known: {', '.join(FEATURE_MAPS)})")


NORMALIZATIONS = ("none", "sum", "l2")


def normalize_keys(x: Tensor, how: str, eps: float = 1e-6) -> Tensor:
    if how == "none":
        return x
    if how == "sum":
        return x / (x.sum(-1, keepdim=True) + eps)
    if how == "l2":
        return x / (x.norm(dim=-1, keepdim=True) + eps)
    raise ValueError(f"Unknown normalize: {how!r} (known: {', '.join(NORMALIZATIONS)})")
