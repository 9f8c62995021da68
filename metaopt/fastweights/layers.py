"""Fast-weight layers, batch first ``(B, T, d)``.

* :class:`FastWeightRNN` (Ba et al. 2016): a ReLU RNN whose hidden state settles for ``S``
  inner steps under a fast matrix ``A(t) = lambda A(t-1) + eta h(t) h(t)^T`` (with layer
  normalization), so it attends to its recent past.
* :class:`FastWeightProgrammer` (Schlag, Irie & Schmidhuber 2021): the slow net projects each
  input to a key, value and query (and a per-step rate); a write rule programs the fast matrix
  ``W`` within the sequence; the layer outputs ``W_t q_t``. Rules: see
  :mod:`metaopt.fastweights.rules`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.fastweights import rules as R


class FastWeightRNN(nn.Module):
    """``h0 = relu(W h(t) + C x(t+1))``; ``h_{s+1} = relu(LN(W h(t) + C x(t+1) + A(t) h_s))``
    for ``s < S``; ``h(t+1) = h_S``. ``W`` starts at ``w_init * I`` (Ba et al. use 0.05).
    ``forward(x)`` returns all hidden states ``(B, T, hidden)``."""

    def __init__(self, input_size: int, hidden_size: int, decay: float = 0.95,
                 fast_lr: float = 0.5, inner_steps: int = 1, layer_norm: bool = True,
                 w_init: float = 0.05, form: str = "matrix"):
        super().__init__()
        if form not in ("matrix", "attention"):
            raise ValueError(f"Invalid form: {form!r} (use 'matrix' or 'attention')")
        self.form = form
        if hidden_size < 1:
            raise ValueError(f"Invalid hidden_size: {hidden_size}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"Invalid decay (lambda): {decay} (need 0 <= decay <= 1)")
        if fast_lr < 0:
            raise ValueError(f"Invalid fast_lr (eta): {fast_lr}")
        if inner_steps < 0:
            raise ValueError(f"Invalid inner_steps (S): {inner_steps}")
        self.hidden_size = hidden_size
        self.decay, self.fast_lr, self.inner_steps = float(decay), float(fast_lr), int(inner_steps)
        self.C = nn.Linear(input_size, hidden_size)
        self.W = nn.Parameter(w_init * torch.eye(hidden_size))
        self.ln = nn.LayerNorm(hidden_size) if layer_norm else nn.Identity()

    def forward(self, x: Tensor, h0: Optional[Tensor] = None) -> Tensor:
        """``form="matrix"`` keeps ``A`` (the reference); ``form="attention"`` never builds it:
        ``A(t) h = eta sum_tau lambda^(t - tau) h(tau) (h(tau) . h)`` over the past states,
        cheaper while ``t < hidden_size`` (Ba et al. Sec. 3.1). Both are tested equal."""
        if self.form == "attention":
            return self._forward_attention(x, h0)
        B, T, _ = x.shape
        h = x.new_zeros(B, self.hidden_size) if h0 is None else h0
        A = x.new_zeros(B, self.hidden_size, self.hidden_size)
        cx = self.C(x)
        hs = []
        for t in range(T):
            A = self.decay * A + self.fast_lr * h.unsqueeze(-1) * h.unsqueeze(-2)
            pre = h @ self.W.T + cx[:, t]
            hn = F.relu(pre)
            for _ in range(self.inner_steps):
                hn = F.relu(self.ln(pre + torch.bmm(A, hn.unsqueeze(-1)).squeeze(-1)))
            h = hn
            hs.append(h)
        return torch.stack(hs, 1)

    def _forward_attention(self, x: Tensor, h0: Optional[Tensor]) -> Tensor:
        B, T, _ = x.shape
        h = x.new_zeros(B, self.hidden_size) if h0 is None else h0
        cx = self.C(x)
        past = [h]                                  # h(1..t): the states A(t) is built from
        hs = []
        for t in range(T):
            P = torch.stack(past, 1)                # (B, t+1, R)
            n = P.shape[1]
            c = self.fast_lr * self.decay ** torch.arange(n - 1, -1, -1, dtype=x.dtype,
                                                          device=x.device)
            pre = h @ self.W.T + cx[:, t]
            hn = F.relu(pre)
            for _ in range(self.inner_steps):
                att = torch.bmm(P, hn.unsqueeze(-1)).squeeze(-1) * c      # (B, t+1)
                hn = F.relu(self.ln(pre + torch.bmm(att.unsqueeze(1), P).squeeze(1)))
            h = hn
            hs.append(h)
            past.append(h)
        return torch.stack(hs, 1)


class FastWeightProgrammer(nn.Module):
    """Keys/values/queries projected from the input, a feature map on keys and queries
    (``identity``, ``elu1`` = elu+1, ``dpfp`` with ``nu``), optional key normalization
    (``none``/``sum``/``l2``), ``n_heads`` independent fast matrices, an output projection.

    ``rule``: ``sum``, ``delta`` (``beta = sigmoid(w x)``), ``hebbian`` (gate
    ``m = tanh(w x)``, fast-weight ``decay``), ``ttt`` (inner rate
    ``eta = ttt_lr * sigmoid(w x)``, ``ttt_mini_batch``, ``ttt_norm``), ``learned``
    (:class:`~metaopt.fastweights.rules.WriteNet` with ``beta`` as in delta).
    ``mode="chunkwise"`` uses the parallel form (sum/delta only).
    """

    def __init__(self, input_size: int, d_key: int = 32, d_value: int = 32,
                 output_size: Optional[int] = None, n_heads: int = 1, rule: str = "delta",
                 feature_map: str = "identity", dpfp_nu: int = 1, normalize: str = "l2",
                 mode: str = "recurrent", chunk_size: int = 64, decay: float = 1.0,
                 ttt_mini_batch: int = 16, ttt_lr: float = 1.0, ttt_norm: bool = True,
                 learned_hidden: int = 16):
        super().__init__()
        if rule not in R.WRITE_RULES:
            raise ValueError(f"Unknown rule: {rule!r} (known: {', '.join(R.WRITE_RULES)})")
        if mode not in ("recurrent", "chunkwise"):
            raise ValueError(f"Invalid mode: {mode!r} (use 'recurrent' or 'chunkwise')")
        if mode == "chunkwise" and rule not in R.CHUNKWISE_RULES:
            raise ValueError(f"Invalid mode: 'chunkwise' has no form for rule {rule!r} "
                             f"(only {', '.join(R.CHUNKWISE_RULES)})")
        if normalize not in R.NORMALIZATIONS:
            raise ValueError(f"Unknown normalize: {normalize!r} (known: {', '.join(R.NORMALIZATIONS)})")
        for name, val in (("d_key", d_key), ("d_value", d_value), ("n_heads", n_heads),
                          ("chunk_size", chunk_size), ("ttt_mini_batch", ttt_mini_batch),
                          ("dpfp_nu", dpfp_nu)):
            if int(val) < 1:
                raise ValueError(f"Invalid {name}: {val}")
        self.rule, self.mode, self.chunk_size = rule, mode, int(chunk_size)
        self.n_heads, self.d_key, self.d_value = int(n_heads), int(d_key), int(d_value)
        self.feature, self.nu, self.normalize = feature_map, int(dpfp_nu), normalize
        self.d_feat = R.feature_dim(feature_map, d_key, dpfp_nu)
        self.decay, self.ttt_mini_batch, self.ttt_lr = float(decay), int(ttt_mini_batch), float(ttt_lr)
        H = self.n_heads
        self.q_proj = nn.Linear(input_size, H * d_key, bias=False)
        self.k_proj = nn.Linear(input_size, H * d_key, bias=False)
        self.v_proj = nn.Linear(input_size, H * d_value, bias=False)
        self.rate = nn.Linear(input_size, H) if rule != "sum" else None
        self.out_proj = nn.Linear(H * d_value, output_size or input_size)
        self.ttt_ln = nn.LayerNorm(d_value) if (rule == "ttt" and ttt_norm) else None
        self.write_net = R.WriteNet(learned_hidden) if rule == "learned" else None

    def _heads(self, x: Tensor, d: int) -> Tensor:  # (B, T, H*d) -> (B*H, T, d)
        B, T, _ = x.shape
        return x.reshape(B, T, self.n_heads, d).transpose(1, 2).reshape(B * self.n_heads, T, d)

    def keys(self, x: Tensor) -> Tensor:
        """Per-head keys of inputs ``x (B, T, input_size)``, feature-mapped and normalized as the
        rule writes them: ``(B*H, T, d_feat)``."""
        k = self._heads(self.k_proj(x), self.d_key)
        return R.normalize_keys(R.feature_map(k, self.feature, self.nu), self.normalize)

    def rates(self, x: Tensor) -> Optional[Tensor]:
        """Raw per-head write rates of ``x``: ``(B*H, T)`` (None for ``sum``, which has none)."""
        if self.rate is None:
            return None
        return self.rate(x).transpose(1, 2).reshape(-1, x.shape[1])

    def write(self, x: Tensor, v: Tensor, W0: Optional[Tensor] = None) -> Tensor:
        """The fast matrix ``W (B*H, dv, dk)`` after writing the per-head values ``v`` under the
        keys and rates of ``x`` (no queries: read it with :meth:`read`)."""
        _, W = self.program(None, self.keys(x), v, self.rates(x), W0)
        return W

    def qkv(self, x: Tensor):
        q = self._heads(self.q_proj(x), self.d_key)
        v = self._heads(self.v_proj(x), self.d_value)
        q = R.normalize_keys(R.feature_map(q, self.feature, self.nu), self.normalize)
        return q, self.keys(x), v, self.rates(x)

    def program(self, q: Tensor, k: Tensor, v: Tensor, r: Optional[Tensor],
                W0: Optional[Tensor] = None):
        """Run the write rule on per-head ``q, k, v`` and raw rates ``r``; returns ``(y, W)``."""
        rule, mode = self.rule, self.mode
        if rule == "sum":
            if mode == "chunkwise":
                return R.sum_chunkwise(q, k, v, W0, self.chunk_size)
            return R.sum_recurrent(q, k, v, W0)
        if rule == "delta":
            beta = torch.sigmoid(r)
            if mode == "chunkwise":
                return R.delta_chunkwise(q, k, v, beta, W0, self.chunk_size)
            return R.delta_recurrent(q, k, v, beta, W0)
        if rule == "hebbian":
            return R.hebbian_recurrent(q, k, v, torch.tanh(r), self.decay, W0)
        if rule == "ttt":
            ln = None if self.ttt_ln is None else (self.ttt_ln.weight, self.ttt_ln.bias)
            return R.ttt_recurrent(q, k, v, self.ttt_lr * torch.sigmoid(r), self.ttt_mini_batch,
                                   W0, ln)
        return R.learned_recurrent(q, k, v, torch.sigmoid(r), self.write_net, W0)

    def read(self, W: Tensor, q: Tensor) -> Tensor:
        """Read a programmed ``W (B, dv, dk)`` with queries ``q (B, n, dk)``, as the rule does
        (``ttt`` with ``ttt_norm`` reads through its inner LayerNorm)."""
        y = torch.bmm(q, W.transpose(1, 2))
        if self.ttt_ln is not None:
            y = self.ttt_ln(y)
        return y

    def forward(self, x: Tensor, W0: Optional[Tensor] = None, return_state: bool = False):
        B, T, _ = x.shape
        q, k, v, r = self.qkv(x)
        y, W = self.program(q, k, v, r, W0)
        y = y.reshape(B, self.n_heads, T, self.d_value).transpose(1, 2).reshape(B, T, -1)
        out = self.out_proj(y)
        return (out, W) if return_state else out
