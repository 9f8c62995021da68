"""The three in-context tasks of the plastic-transformer comparison, as batches of sequences.

Every task's ``batch(batch_size, generator)`` returns a dict of tensors:
``x`` the inputs (token ids ``(B, T)`` or features ``(B, T, input_dim)``), ``y`` the targets
``(B, T)``, ``mask`` ``(B, T)`` the scored positions, ``kind`` ``(B, T)`` the token kind of each
position (names in ``task.kinds``; the modulation figure averages over them). ``loss(out, batch)``
is the training loss on the scored positions, ``metrics(out, batch)`` adds the task's readable
figure (accuracy / MSE).

* ``copy``: ``length`` random symbols (of ``n_symbols``), a delay of blanks, a delimiter, then
  ``length - 1`` blanks during which the model must output the symbols in order (targets at the
  delimiter and the recall blanks). With ``random_delay`` the delay is drawn per sequence from
  ``0..delay`` (blanks pad the end), so the recall must key on the delimiter rather than on
  absolute positions. Cross-entropy, per-symbol accuracy.
* ``regression``: in-context linear regression (Garg et al. 2022): ``w ~ N(0, I/dim)`` per
  sequence, pairs ``(x_i, y_i = w.x_i + noise)`` interleaved as tokens ``[x_i, 0]``, ``[0, y_i]``;
  at every x-token the model predicts ``y_i`` from the earlier pairs. MSE (``E y^2 = 1``).
* ``fewshot``: N-way K-shot episodes on scikit-learn's 8x8 digits (``load_digits``): per episode
  ``n_way`` random classes get a random label order; the support tokens are ``[image, one-hot
  label, 0]``, then ``n_query`` query tokens ``[image, 0, 1]`` whose labels are predicted. Train
  and test episodes draw their images from disjoint parts of the data (``test_fraction``),
  so a test episode shows images never trained on, under labels fixed only within the episode.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from metaopt.tasks.data import load_sklearn

PLASTIC_TASKS = ("copy", "regression", "fewshot")
Batch = Dict[str, Tensor]


class CopyTask:
    """Delayed copying; the vocabulary is ``n_symbols`` symbols, a blank and a delimiter."""

    name = "copy"
    kinds = ("symbol", "delay", "delimiter", "recall", "pad")

    def __init__(self, length: int = 16, delay: int = 16, n_symbols: int = 8,
                 random_delay: bool = True):
        if length < 1 or delay < 0 or n_symbols < 2:
            raise ValueError(f"Invalid copy task: length={length}, delay={delay}, "
                             f"n_symbols={n_symbols} (need length >= 1, delay >= 0, n_symbols >= 2)")
        self.length, self.delay, self.n_symbols = int(length), int(delay), int(n_symbols)
        self.random_delay = bool(random_delay)
        self.blank, self.delim = self.n_symbols, self.n_symbols + 1
        self.seq_len = 2 * self.length + self.delay
        self.io = {"vocab_size": self.n_symbols + 2, "output_dim": self.n_symbols}

    def batch(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Batch:
        L, B, T = self.length, batch_size, self.seq_len
        s = torch.randint(0, self.n_symbols, (B, L), generator=generator)
        d = (torch.randint(0, self.delay + 1, (B,), generator=generator) if self.random_delay
             else torch.full((B,), self.delay))
        pos = torch.arange(T)
        start = (L + d)[:, None]                                # the delimiter's position
        x = torch.full((B, T), self.blank)
        x[:, :L] = s
        x[torch.arange(B), L + d] = self.delim
        mask = (pos >= start) & (pos < start + L)
        y = torch.zeros_like(x)
        y[mask] = s.reshape(-1)                                 # row-major: in order per row
        kind = torch.full((B, T), 4)
        kind[:, :L] = 0
        kind[(pos >= L) & (pos < start)] = 1
        kind[mask] = 3
        kind[pos == start] = 2
        return {"x": x, "y": y, "mask": mask, "kind": kind}

    def loss(self, out: Tensor, b: Batch) -> Tensor:
        return F.cross_entropy(out[b["mask"]], b["y"][b["mask"]])

    def metrics(self, out: Tensor, b: Batch) -> Dict[str, float]:
        acc = (out[b["mask"]].argmax(-1) == b["y"][b["mask"]]).double().mean().item()
        return {"loss": self.loss(out, b).item(), "accuracy": acc}


class RegressionTask:
    """In-context linear regression, ``n_points`` pairs in ``dim`` dimensions."""

    name = "regression"
    kinds = ("x", "y")

    def __init__(self, n_points: int = 16, dim: int = 4, noise: float = 0.1):
        if n_points < 1 or dim < 1 or noise < 0:
            raise ValueError(f"Invalid regression task: n_points={n_points}, dim={dim}, "
                             f"noise={noise}")
        self.n_points, self.dim, self.noise = int(n_points), int(dim), float(noise)
        self.seq_len = 2 * self.n_points
        self.io = {"input_dim": self.dim + 1, "output_dim": 1}

    def batch(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Batch:
        n, d = self.n_points, self.dim
        w = torch.randn(batch_size, d, generator=generator) / d ** 0.5
        xs = torch.randn(batch_size, n, d, generator=generator)
        ys = (xs * w[:, None]).sum(-1) + self.noise * torch.randn(batch_size, n, generator=generator)
        x = torch.zeros(batch_size, 2 * n, d + 1)
        x[:, 0::2, :d] = xs
        x[:, 1::2, d] = ys
        y = torch.zeros(batch_size, 2 * n)
        y[:, 0::2] = ys
        mask = torch.zeros(batch_size, 2 * n, dtype=torch.bool)
        mask[:, 0::2] = True
        kind = (torch.arange(2 * n) % 2).expand(batch_size, -1)
        return {"x": x, "y": y, "mask": mask, "kind": kind, "w": w}

    def loss(self, out: Tensor, b: Batch) -> Tensor:
        return F.mse_loss(out[..., 0][b["mask"]], b["y"][b["mask"]])

    def metrics(self, out: Tensor, b: Batch) -> Dict[str, float]:
        err = (out[..., 0] - b["y"])[b["mask"]].reshape(len(b["y"]), -1).pow(2)  # (B, n_points)
        late = err[:, 2 * self.dim:] if self.n_points > 2 * self.dim else err
        return {"loss": err.mean().item(), "mse_late": late.mean().item()}

    def least_squares_mse(self, b: Batch, ridge: float = 1e-2) -> Dict[str, float]:
        """The reference: ridge regression on the earlier pairs at every x-token (zero weights
        before the first pair), the same ``loss`` / ``mse_late`` figures as :meth:`metrics`."""
        xs = b["x"][:, 0::2, :self.dim].double()
        ys = b["x"][:, 1::2, self.dim].double()
        errs = []
        for i in range(self.n_points):
            if i == 0:
                pred = torch.zeros(len(xs), dtype=torch.float64)
            else:
                X, Y = xs[:, :i], ys[:, :i]
                A = X.transpose(1, 2) @ X + ridge * torch.eye(self.dim, dtype=torch.float64)
                w = torch.linalg.solve(A, (X.transpose(1, 2) @ Y.unsqueeze(-1))).squeeze(-1)
                pred = (xs[:, i] * w).sum(-1)
            errs.append((pred - ys[:, i]) ** 2)
        err = torch.stack(errs, 1)
        late = err[:, 2 * self.dim:] if self.n_points > 2 * self.dim else err
        return {"loss": err.mean().item(), "mse_late": late.mean().item()}


class FewShotDigitsTask:
    """N-way K-shot episodes on the bundled 8x8 digits (images in [0, 1], 64 pixels)."""

    name = "fewshot"
    kinds = ("support", "query")

    def __init__(self, n_way: int = 5, k_shot: int = 1, n_query: int = 5, split: str = "train",
                 split_seed: int = 0, test_fraction: float = 0.4):
        if not 2 <= n_way <= 10 or k_shot < 1 or n_query < 1:
            raise ValueError(f"Invalid episode: n_way={n_way} (2..10), k_shot={k_shot}, "
                             f"n_query={n_query}")
        if split not in ("train", "test"):
            raise ValueError(f"Invalid split: {split!r} (use 'train' or 'test')")
        if not 0 < test_fraction < 1:
            raise ValueError(f"Invalid test_fraction: {test_fraction}")
        self.n_way, self.k_shot, self.n_query = int(n_way), int(k_shot), int(n_query)
        x, y = load_sklearn("digits", flat=True)
        g = torch.Generator().manual_seed(split_seed)
        self.pools = []
        for c in range(10):                      # per class: a fixed part of its images per split
            idx = torch.nonzero(y == c).squeeze(1)
            idx = idx[torch.randperm(len(idx), generator=g)]
            n_test = int(round(test_fraction * len(idx)))
            part = idx[:n_test] if split == "test" else idx[n_test:]
            if len(part) < self.k_shot + self.n_query:
                raise ValueError(f"Invalid episode: class {c} has {len(part)} {split} images, "
                                 f"fewer than k_shot + n_query = {self.k_shot + self.n_query}")
            self.pools.append(x[part])
        self.n_support = self.n_way * self.k_shot
        self.seq_len = self.n_support + self.n_query
        self.io = {"input_dim": 64 + self.n_way + 1, "output_dim": self.n_way}

    def batch(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Batch:
        N, K, Q = self.n_way, self.k_shot, self.n_query
        x = torch.zeros(batch_size, self.seq_len, 64 + N + 1)
        y = torch.zeros(batch_size, self.seq_len, dtype=torch.long)
        for e in range(batch_size):
            classes = torch.randperm(10, generator=generator)[:N]      # label j <-> classes[j]
            q_labels = torch.randint(0, N, (Q,), generator=generator)
            support_labels = torch.arange(N).repeat_interleave(K)
            order = torch.randperm(N * K, generator=generator)
            imgs_s, imgs_q = [], torch.zeros(Q, 64)
            for j in range(N):
                pool = self.pools[int(classes[j])]
                need = K + int((q_labels == j).sum())
                pick = pool[torch.randperm(len(pool), generator=generator)[:need]]
                imgs_s.append(pick[:K])
                imgs_q[q_labels == j] = pick[K:]
            imgs_s = torch.cat(imgs_s)[order]
            labels_s = support_labels[order]
            x[e, :N * K, :64] = imgs_s
            x[e, torch.arange(N * K), 64 + labels_s] = 1.0
            x[e, N * K:, :64] = imgs_q
            x[e, N * K:, -1] = 1.0
            y[e, :N * K] = labels_s
            y[e, N * K:] = q_labels
        mask = torch.zeros(batch_size, self.seq_len, dtype=torch.bool)
        mask[:, N * K:] = True
        return {"x": x, "y": y, "mask": mask, "kind": mask.long()}

    def loss(self, out: Tensor, b: Batch) -> Tensor:
        return F.cross_entropy(out[b["mask"]], b["y"][b["mask"]])

    def metrics(self, out: Tensor, b: Batch) -> Dict[str, float]:
        acc = (out[b["mask"]].argmax(-1) == b["y"][b["mask"]]).double().mean().item()
        return {"loss": self.loss(out, b).item(), "accuracy": acc}


def make_plastic_task(name: str, split: str = "train", **kwargs):
    """``copy`` / ``regression`` / ``fewshot`` with its keyword arguments; ``split`` only
    matters for ``fewshot`` (the synthetic tasks draw fresh sequences from the generator)."""
    if name == "copy":
        return CopyTask(**kwargs)
    if name == "regression":
        return RegressionTask(**kwargs)
    if name == "fewshot":
        return FewShotDigitsTask(split=split, **kwargs)
    raise ValueError(f"Unknown task: {name!r} (known: {', '.join(PLASTIC_TASKS)})")
