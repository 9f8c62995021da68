"""What a fast-weight layer writes within one sequence: the fast matrix ``W_t`` after each
position and the write strength the slow net chose there.

:func:`fast_weight_trace` uses only the layer's public ``qkv`` and ``program`` methods: ``W_t``
is ``program`` run on the first ``t`` positions (T short runs, so keep sequences short), and
the write strength is the rule's per-position rate from ``qkv``: ``sigmoid(r)`` for ``delta``
and ``learned`` (beta), ``tanh(r)`` for ``hebbian`` (the neuromodulating gate),
``ttt_lr * sigmoid(r)`` for ``ttt`` (the inner learning rate), 1 for ``sum``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from metaopt.fastweights.layers import FastWeightProgrammer

__all__ = ["FastWeightTrace", "fast_weight_trace", "plot_fast_weights"]


@dataclass
class FastWeightTrace:
    W: np.ndarray          # [T, d_value, d_feat] fast matrix after each position
    strength: np.ndarray   # [T] write strength at each position
    rule: str
    head: int = 0


@torch.no_grad()
def fast_weight_trace(layer: FastWeightProgrammer, x: Tensor, head: int = 0) -> FastWeightTrace:
    """``x``: one input sequence ``(T, d)`` or ``(1, T, d)`` (already embedded)."""
    if not isinstance(layer, FastWeightProgrammer):
        raise TypeError(f"layer: expected a FastWeightProgrammer, got {type(layer).__name__}")
    if x.dim() == 2:
        x = x[None]
    if x.dim() != 3 or x.shape[0] != 1:
        raise ValueError(f"x: expected one sequence (T, d) or (1, T, d), got shape {tuple(x.shape)}")
    if not 0 <= head < layer.n_heads:
        raise ValueError(f"head: {head} (the layer has {layer.n_heads} heads)")
    q, k, v, r = layer.qkv(x)
    q, k, v = q[head:head + 1], k[head:head + 1], v[head:head + 1]
    r = r[head:head + 1] if r is not None else None
    T = x.shape[1]
    Ws = []
    for t in range(1, T + 1):
        _, W = layer.program(q[:, :t], k[:, :t], v[:, :t], r[:, :t] if r is not None else None)
        Ws.append(W[0].double().cpu().numpy())
    if r is None:
        strength = np.ones(T)
    elif layer.rule == "hebbian":
        strength = torch.tanh(r[0]).double().numpy()
    elif layer.rule == "ttt":
        strength = (layer.ttt_lr * torch.sigmoid(r[0])).double().numpy()
    else:
        strength = torch.sigmoid(r[0]).double().numpy()
    return FastWeightTrace(np.stack(Ws), strength, layer.rule, head)


def plot_fast_weights(trace: FastWeightTrace, path=None, positions: Optional[Sequence[int]] = None,
                      tokens: Optional[Sequence[str]] = None, title: Optional[str] = None):
    """Top: the fast matrix after a few positions (shared colour scale); bottom: the write
    strength at every position and the Frobenius norm of ``W_t``. ``tokens``: labels of the
    positions (e.g. the characters of the sequence)."""
    T = len(trace.strength)
    if positions is None:
        positions = sorted(set(np.linspace(0, T - 1, min(4, T)).round().astype(int).tolist()))
    bad = [p for p in positions if not 0 <= p < T]
    if bad:
        raise ValueError(f"positions: {bad[0]} is outside 0..{T - 1}")
    if tokens is not None and len(tokens) != T:
        raise ValueError(f"tokens: {len(tokens)} labels for {T} positions")
    n = len(positions)
    fig = plt.figure(figsize=(max(8, 2.6 * n), 6), layout="constrained")
    gs = fig.add_gridspec(2, n, height_ratios=[1.2, 1])
    vmax = float(np.abs(trace.W[list(positions)]).max()) or 1.0
    im = None
    for i, p in enumerate(positions):
        ax = fig.add_subplot(gs[0, i])
        im = ax.imshow(trace.W[p], cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto",
                       interpolation="nearest")
        lab = f" ({tokens[p]!r})" if tokens is not None else ""
        ax.set_title(f"W after position {p}{lab}", fontsize=9)
        ax.set_xlabel("key feature")
        if i == 0:
            ax.set_ylabel("value dimension")
    fig.colorbar(im, ax=fig.axes[:n], fraction=0.02, label="fast weight")
    ax = fig.add_subplot(gs[1, :])
    pos = np.arange(T)
    ax.bar(pos, trace.strength, color="C0", label="write strength")
    ax.set_xlabel("position in sequence")
    ax.set_ylabel("write strength")
    if tokens is not None:
        ax.set_xticks(pos, list(tokens))
    ax2 = ax.twinx()
    ax2.plot(pos, np.linalg.norm(trace.W.reshape(T, -1), axis=1), "k.-", label="||W||")
    ax2.set_ylabel("||W_t|| (Frobenius)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    fig.suptitle(title or f"fast weights, rule {trace.rule!r} (head {trace.head})")
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
