"""A tiny causal transformer language model on characters.

Pre-norm blocks (``LayerNorm -> causal self-attention -> residual``, ``LayerNorm -> GELU MLP ->
residual``), learned token and position embeddings, a final LayerNorm and a linear head; the
loss is the mean next-character cross entropy. Data: :func:`metaopt.tasks.data.load_text`
(or any text / token tensor you pass) through :class:`SequenceDataset`.

Attention runs ``F.scaled_dot_product_attention`` pinned to the MATH backend: the fused CPU
kernel has no vmap batching rule, no forward-mode AD and no double backward, and meta-training
needs all three (vmapped tasks, forward-mode estimators, backprop through inner gradients).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from metaopt.tasks.base import SequenceDataset, Task, TaskFamily, choice, log_uniform
from metaopt.tasks.data import (CharVocab, resolve_dtype, as_choices, as_range, jsonable,
                                load_text)


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, mlp_ratio * d_model)
        self.out = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.n_heads
        qkv = self.qkv(self.ln1(x)).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        with sdpa_kernel(SDPBackend.MATH):
            a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharLMModule(nn.Module):
    """A tiny pre-norm causal transformer LM; ``forward(x, y)`` returns the mean next-
    character cross entropy."""
    def __init__(self, vocab_size: int, seq_len: int, d_model: int = 32, n_layers: int = 1,
                 n_heads: int = 2, mlp_ratio: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def logits(self, x: Tensor) -> Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[-1], device=x.device))
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h))

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        logits = self.logits(x)
        if y is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class CharLMTask(Task):
    """A character (or any token) language model on a :class:`SequenceDataset`."""

    def __init__(self, data: SequenceDataset, vocab_size: int, d_model: int = 32,
                 n_layers: int = 1, n_heads: int = 2, mlp_ratio: int = 4, batch_size: int = 16,
                 init_scale: float = 1.0, name: str = "char_lm", dtype=torch.float32):
        if d_model < 1 or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"Invalid n_heads: {n_heads} (must divide d_model={d_model})")
        if n_layers < 0:
            raise ValueError(f"Invalid n_layers: {n_layers}")
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size}")
        module = CharLMModule(vocab_size, data.seq_len, d_model, n_layers, n_heads, mlp_ratio)
        module = module.to(resolve_dtype(dtype))
        structure = ("char_lm", vocab_size, data.seq_len, d_model, n_layers, n_heads, mlp_ratio,
                     int(batch_size))
        super().__init__(name, module, data=data, batch_size=batch_size, init_scale=init_scale,
                         structure=structure)

    def logits(self, params, x: Tensor) -> Tensor:
        return torch.func.functional_call(self.module, {**params, **self.buffers}, (x,))


@functools.lru_cache(maxsize=4)
def _encoded(text: str):
    vocab = CharVocab.from_text(text)
    return vocab, vocab.encode(text)


class CharLMFamily(TaskFamily):
    """Tiny transformers on Python's bundled text (or ``text=...``). ``d_model``, ``n_layers``,
    ``n_heads`` and ``batch_size`` may be lists to sample from; ``init_scale`` a range.
    The text is split contiguously 80/10/10 into train/valid/test."""

    name = "char_lm"

    def __init__(self, seq_len: int = 32, d_model=32, n_layers=1, n_heads=2, batch_size=16,
                 init_scale=(0.5, 2.0), mlp_ratio: int = 4, text: Optional[str] = None,
                 dtype=torch.float32):
        self.seq_len = int(seq_len)
        if self.seq_len < 1:
            raise ValueError(f"Invalid seq_len: {seq_len}")
        self.d_model = as_choices(d_model, "d_model")
        self.n_layers = as_choices(n_layers, "n_layers")
        self.n_heads = as_choices(n_heads, "n_heads")
        self.batch_size = as_choices(batch_size, "batch_size")
        for d in self.d_model:
            for h in self.n_heads:
                if h < 1 or d % h:
                    raise ValueError(f"Invalid n_heads: {h} (must divide d_model={d})")
        if min(self.n_layers) < 0:
            raise ValueError(f"Invalid n_layers: {n_layers!r}")
        if min(self.batch_size) < 1:
            raise ValueError(f"Invalid batch_size: {batch_size!r}")
        self.init_scale = as_range(init_scale, "init_scale")
        self.mlp_ratio = int(mlp_ratio)
        self.text = text
        self.dtype = resolve_dtype(dtype)
        self.vocab, tokens = _encoded(load_text() if text is None else text)
        self.data = SequenceDataset(tokens, self.seq_len, name="text")

    def sample(self, generator: torch.Generator) -> CharLMTask:
        d_model = choice(generator, self.d_model)
        n_layers = choice(generator, self.n_layers)
        n_heads = choice(generator, self.n_heads)
        batch_size = choice(generator, self.batch_size)
        init_scale = log_uniform(generator, *self.init_scale)
        return CharLMTask(self.data, len(self.vocab), d_model, n_layers, n_heads, self.mlp_ratio,
                          batch_size, init_scale, name=self.name, dtype=self.dtype)

    def config(self) -> Dict[str, Any]:
        def one(v):
            return v[0] if len(v) == 1 else list(v)
        cfg = {"seq_len": self.seq_len, "d_model": one(self.d_model),
               "n_layers": one(self.n_layers), "n_heads": one(self.n_heads),
               "batch_size": one(self.batch_size), "init_scale": jsonable(self.init_scale),
               "mlp_ratio": self.mlp_ratio, "dtype": jsonable(self.dtype)}
        if self.text is not None:
            cfg["text"] = self.text
        return cfg
