"""Plastic transformers: a decoder-only transformer whose blocks carry a fast-weight branch that
the sequence itself programs, by a neuromodulated Hebbian rule or by gradient-based plasticity.

A block is the usual pre-LayerNorm one plus a branch beside the MLP, reading the same
normalized residual stream ``u``::

    h <- h + Attn(LN1 h)
    u  = LN2 h
    h <- h + MLP(u) + FastBranch(u)            (FastBranch = 0 when plasticity is off)

The branch projects each ``u_t`` to a query, a key (pre-synaptic activity, L2-normalized), a
value (post-synaptic activity) and a **modulatory signal** ``eta_t`` per head, computed from
``u_t`` by a learned linear map; it reads ``y_t = F_t q_t`` and outputs ``out_proj(y)`` (no bias,
so an unwritten ``F = 0`` adds exactly nothing). The two rules for the fast matrix ``F``:

* ``hebbian`` (neuromodulated Hebbian, Miconi et al. 2019):
  ``F_t = decay * F_{t-1} + eta_t v_t k_t^T`` with a signed gate ``eta_t = eta_max tanh(w.u_t + b)``
  and a learned per-head ``decay = sigmoid(.)`` (starting at ``decay``).
* ``gradient`` (gradient-based plasticity, Duan et al. 2023; the delta rule / TTT-style
  self-supervised step): ``F_t = F_{t-1} - eta_t grad_F l_t(F_{t-1})`` with the local
  reconstruction loss ``l_t(F) = 1/2 ||F k_t - v_t||^2`` and a step
  ``eta_t = eta_max sigmoid(w.u_t + b)`` -- which is ``F += eta_t (v_t - F k_t) k_t^T``.

Both have a readable recurrent reference (``form="recurrent"``: a Python loop over time; for the
gradient rule the gradient is taken by autograd, :func:`gradient_recurrent`) and a fast form
(``form="parallel"``: :func:`~metaopt.fastweights.rules.hebbian_parallel`, one masked attention;
:func:`~metaopt.fastweights.rules.delta_chunkwise`, one triangular solve), tested equal.
``model(x, return_aux=True)`` also returns each layer's modulatory signal ``(B, heads, T)``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad

from metaopt.fastweights import rules as R

#: the models compared: no fast branch, Hebbian branch, gradient-based branch
PLASTIC_RULES = ("static", "hebbian", "gradient")
FORMS = ("parallel", "recurrent")


def reconstruction_loss(W: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The gradient rule's local, self-supervised loss per sequence:
    ``1/2 ||W k - v||^2`` for ``W (B, dv, dk)``, ``k (B, dk)``, ``v (B, dv)`` -> ``(B,)``."""
    return 0.5 * (torch.bmm(W, k.unsqueeze(-1)).squeeze(-1) - v).pow(2).sum(-1)


def gradient_recurrent(q: Optional[Tensor], k: Tensor, v: Tensor, eta: Tensor,
                       W0: Optional[Tensor] = None,
                       local_loss: Callable[[Tensor, Tensor, Tensor], Tensor] = reconstruction_loss
                       ) -> Tuple[Optional[Tensor], Tensor]:
    """Gradient-based plasticity step by step, the gradient taken by autograd
    (``torch.func.grad``, differentiable): ``W_t = W_{t-1} - eta_t grad_W local_loss(W_{t-1},
    k_t, v_t)``, read ``y_t = W_t q_t``. ``local_loss`` returns one loss per sequence ``(B,)``;
    sequences are independent, so the gradient of their sum is each one's own gradient.
    With :func:`reconstruction_loss` this is the delta rule (``beta = eta``)."""
    B, T = k.shape[:2]
    W = k.new_zeros(B, v.shape[-1], k.shape[-1]) if W0 is None else W0
    g = grad(lambda W_, k_, v_: local_loss(W_, k_, v_).sum())
    ys = []
    for t in range(T):
        W = W - eta[:, t, None, None] * g(W, k[:, t], v[:, t])
        if q is not None:
            ys.append(torch.bmm(W, q[:, t].unsqueeze(-1)).squeeze(-1))
    return (torch.stack(ys, 1) if ys else None), W


class PlasticBranch(nn.Module):
    """The fast-weight branch of a :class:`PlasticBlock` (see the module docstring).

    ``rule``: ``hebbian`` or ``gradient``; ``n_heads`` fast matrices of ``d_head x d_head``;
    ``eta_max`` bounds the modulatory signal; ``decay`` (Hebbian only) the initial decay, learned
    per head when ``learn_decay``; ``form``: ``parallel`` (fast) or ``recurrent`` (reference)."""

    def __init__(self, d_model: int, n_heads: int = 2, d_head: Optional[int] = None,
                 rule: str = "hebbian", eta_max: float = 1.0, decay: float = 0.9,
                 learn_decay: bool = True, form: str = "parallel"):
        super().__init__()
        if rule not in ("hebbian", "gradient"):
            raise ValueError(f"Invalid rule: {rule!r} (use 'hebbian' or 'gradient')")
        if form not in FORMS:
            raise ValueError(f"Invalid form: {form!r} (use 'parallel' or 'recurrent')")
        if n_heads < 1:
            raise ValueError(f"Invalid n_heads: {n_heads}")
        if eta_max <= 0:
            raise ValueError(f"Invalid eta_max: {eta_max}")
        if not 0.0 < decay < 1.0 and not (decay == 1.0 and not learn_decay):
            raise ValueError(f"Invalid decay: {decay} (need 0 < decay < 1, or 1 with learn_decay=False)")
        self.rule, self.form, self.eta_max = rule, form, float(eta_max)
        self.n_heads = int(n_heads)
        self.d_head = int(d_head or max(1, d_model // n_heads))
        H, dh = self.n_heads, self.d_head
        self.q_proj = nn.Linear(d_model, H * dh, bias=False)
        self.k_proj = nn.Linear(d_model, H * dh, bias=False)
        self.v_proj = nn.Linear(d_model, H * dh, bias=False)
        self.mod = nn.Linear(d_model, H)                 # the modulatory signal, one per head
        self.out_proj = nn.Linear(H * dh, d_model, bias=False)
        if rule == "hebbian":
            logit = torch.full((H,), math.log(decay / (1 - decay)) if decay < 1 else math.inf)
            if learn_decay:
                self.decay_logit = nn.Parameter(logit)
            else:
                self.register_buffer("decay_logit", logit)

    def _heads(self, x: Tensor) -> Tensor:  # (B, T, H*dh) -> (B*H, T, dh)
        B, T, _ = x.shape
        return x.reshape(B, T, self.n_heads, self.d_head).transpose(1, 2).reshape(-1, T, self.d_head)

    def modulation(self, u: Tensor) -> Tensor:
        """The modulatory signal ``eta (B, heads, T)`` of inputs ``u (B, T, d_model)``: the
        signed Hebbian gate ``eta_max tanh(.)`` or the gradient step ``eta_max sigmoid(.)``."""
        z = self.mod(u).transpose(1, 2)
        return self.eta_max * (torch.tanh(z) if self.rule == "hebbian" else torch.sigmoid(z))

    def decay(self) -> Optional[Tensor]:
        """The Hebbian rule's per-head decay ``(heads,)`` (None for the gradient rule)."""
        return torch.sigmoid(self.decay_logit) if self.rule == "hebbian" else None

    def forward(self, u: Tensor, return_aux: bool = False):
        B, T, _ = u.shape
        q = F.normalize(self._heads(self.q_proj(u)), dim=-1)
        k = F.normalize(self._heads(self.k_proj(u)), dim=-1)
        v = self._heads(self.v_proj(u))
        eta = self.modulation(u)                                   # (B, H, T)
        m = eta.reshape(B * self.n_heads, T)
        if self.rule == "hebbian":
            lam = self.decay().repeat(B)                           # (B*H,), head-minor like m
            fn = R.hebbian_parallel if self.form == "parallel" else R.hebbian_recurrent
            y, W = fn(q, k, v, m, lam)
        elif self.form == "parallel":
            y, W = R.delta_chunkwise(q, k, v, m, None, chunk_size=T)
        else:
            y, W = gradient_recurrent(q, k, v, m)
        y = y.reshape(B, self.n_heads, T, self.d_head).transpose(1, 2).reshape(B, T, -1)
        out = self.out_proj(y)
        return (out, {"modulation": eta, "W": W}) if return_aux else out


class CausalSelfAttention(nn.Module):
    """Plain multi-head causal softmax attention (written out, so float64 gradcheck and the
    static/plastic comparison see exactly the same operations)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"Invalid n_heads: {n_heads} (must divide d_model={d_model})")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (t.reshape(B, T, self.n_heads, -1).transpose(1, 2)
                   for t in self.qkv(x).split(C, -1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, T, C))


class PlasticBlock(nn.Module):
    """A pre-LN decoder block with an optional fast-weight branch beside the MLP.

    ``rule="static"`` has no branch; ``hebbian`` / ``gradient`` add a :class:`PlasticBranch`
    (extra keyword arguments go to it). Setting ``block.plastic = False`` skips the branch, and
    the block then computes exactly what the static block with the same weights computes."""

    def __init__(self, d_model: int, n_heads: int = 2, mlp_ratio: int = 2, rule: str = "static",
                 **branch_kwargs):
        super().__init__()
        if rule not in PLASTIC_RULES:
            raise ValueError(f"Unknown rule: {rule!r} (known: {', '.join(PLASTIC_RULES)})")
        self.rule = rule
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))
        self.fast = None if rule == "static" else PlasticBranch(d_model, rule=rule, **branch_kwargs)
        self.plastic = self.fast is not None

    def forward(self, h: Tensor, return_aux: bool = False):
        h = h + self.attn(self.ln1(h))
        u = self.ln2(h)
        out, aux = self.mlp(u), None
        if self.fast is not None and self.plastic:
            fast, aux = self.fast(u, return_aux=True)
            out = out + fast
        h = h + out
        return (h, aux) if return_aux else h


class PlasticTransformer(nn.Module):
    """Decoder-only transformer of :class:`PlasticBlock` s for the plastic tasks.

    Inputs are token ids (``vocab_size``) or feature vectors (``input_dim``); a learned
    positional embedding up to ``max_len``; a final LayerNorm and a linear head to
    ``output_dim`` at every position. ``forward(x, return_aux=True)`` returns
    ``(outputs, {"modulation": [per layer (B, heads, T)]})`` (empty list for ``static``)."""

    def __init__(self, output_dim: int, vocab_size: Optional[int] = None,
                 input_dim: Optional[int] = None, d_model: int = 32, n_layers: int = 2,
                 n_heads: int = 2, max_len: int = 64, mlp_ratio: int = 2, rule: str = "static",
                 **branch_kwargs):
        super().__init__()
        if (vocab_size is None) == (input_dim is None):
            raise ValueError(f"Invalid inputs: give exactly one of vocab_size ({vocab_size}) "
                             f"and input_dim ({input_dim})")
        for name, val in (("output_dim", output_dim), ("d_model", d_model),
                          ("n_layers", n_layers), ("max_len", max_len)):
            if int(val) < 1:
                raise ValueError(f"Invalid {name}: {val}")
        self.rule, self.max_len = rule, int(max_len)
        self.embed = nn.Embedding(vocab_size, d_model) if vocab_size else nn.Linear(input_dim, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(max_len, d_model))
        self.blocks = nn.ModuleList(PlasticBlock(d_model, n_heads, mlp_ratio, rule, **branch_kwargs)
                                    for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, output_dim)

    def set_plasticity(self, on: bool) -> "PlasticTransformer":
        """Switch every block's fast branch on or off (off: the static transformer's output)."""
        for b in self.blocks:
            b.plastic = bool(on) and b.fast is not None
        return self

    def forward(self, x: Tensor, return_aux: bool = False):
        T = x.shape[1]
        if T > self.max_len:
            raise ValueError(f"Invalid sequence length: {T} (max_len={self.max_len})")
        h = self.embed(x) + self.pos[:T]
        mods: List[Tensor] = []
        for block in self.blocks:
            h, aux = block(h, return_aux=True)
            if aux is not None:
                mods.append(aux["modulation"])
        out = self.head(self.ln_f(h))
        return (out, {"modulation": mods}) if return_aux else out

    def modulation(self, x: Tensor) -> Dict[str, Tensor]:
        """The modulatory signals of ``x`` without gradients: ``{"layer{i}": (B, heads, T)}``."""
        with torch.no_grad():
            _, aux = self(x, return_aux=True)
        return {f"layer{i}": m for i, m in enumerate(aux["modulation"])}


def modulation_by_kind(net: PlasticTransformer, batch: Dict[str, Tensor], n_kinds: int) -> Tensor:
    """Mean modulatory signal per layer, head and token kind: ``(layers, heads, n_kinds)``
    (``batch["kind"] (B, T)`` as the tasks of :mod:`~metaopt.fastweights.plastic_tasks` give it;
    NaN for a kind that does not occur)."""
    mods = torch.stack(list(net.modulation(batch["x"]).values()))      # (L, B, H, T)
    kind = batch["kind"]
    out = torch.full((*mods.shape[:1], mods.shape[2], n_kinds), float("nan"))
    for c in range(n_kinds):
        sel = (kind == c)
        if sel.any():
            w = sel.to(mods.dtype)[None, :, None, :]                     # (1, B, 1, T)
            out[..., c] = (mods * w).sum((1, 3)) / w.sum((1, 3))
    return out

