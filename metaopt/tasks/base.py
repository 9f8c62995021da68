"""Task = what is optimized: initial params, a loss over (params, batch), and data splits.

A task owns an ``nn.Module`` whose ``forward(*batch)`` returns the scalar loss (model and
criterion together). Its parameters are never used directly: every loss is evaluated with
``torch.func.functional_call(module, {**params, **buffers}, batch)``, so params are plain
dicts of tensors and an unroll is a pure function that ``torch.func`` can differentiate and
vmap. Task-specific constants (a quadratic's matrix) are module *buffers*, so tasks that share
a ``signature`` (same module structure and shapes) can be vmapped together, each with its own
buffers.

All randomness comes from explicit ``torch.Generator`` objects.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Hashable, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metaopt.activations import ActivationRecorder
from metaopt.types import Batch, Params

SPLITS = ("train", "valid", "test")


class ArrayDataset:
    """Inputs/targets split once into fixed train/valid/test parts by a seed.

    Pass any tensors (or a torchvision dataset's ``.data``/``.targets``): ``ArrayDataset(x, y)``.
    """

    def __init__(self, x: Tensor, y: Tensor, fractions=(0.6, 0.2, 0.2), seed: int = 0,
                 name: str = "data"):
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) <= 0:
            raise ValueError(f"Invalid fractions: {fractions} (need 3 positive parts summing to 1)")
        self.name = name
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=g)
        n_tr = int(round(fractions[0] * len(x)))
        n_va = int(round(fractions[1] * len(x)))
        idx = {"train": perm[:n_tr], "valid": perm[n_tr:n_tr + n_va], "test": perm[n_tr + n_va:]}
        self.x = {s: x[i] for s, i in idx.items()}
        self.y = {s: y[i] for s, i in idx.items()}

    def size(self, split: str) -> int:
        return len(self.x[check_split(split)])

    def sample(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        n = self.size(split)
        i = torch.randint(0, n, (batch_size,), generator=generator)
        return self.x[split][i], self.y[split][i]

    def full(self, split: str) -> Batch:
        return self.x[check_split(split)], self.y[split]

    def to(self, dtype: torch.dtype) -> "ArrayDataset":
        for s in SPLITS:
            if self.x[s].is_floating_point():
                self.x[s] = self.x[s].to(dtype)
            if self.y[s].is_floating_point():
                self.y[s] = self.y[s].to(dtype)
        return self


class SequenceDataset:
    """One long token sequence split into contiguous train/valid/test parts; batches are
    random windows ``(x = seq[i:i+L], y = seq[i+1:i+L+1])``."""

    def __init__(self, tokens: Tensor, seq_len: int, fractions=(0.8, 0.1, 0.1), name="text"):
        self.name = name
        self.seq_len = seq_len
        n = len(tokens)
        a, b = int(fractions[0] * n), int((fractions[0] + fractions[1]) * n)
        self.parts = {"train": tokens[:a], "valid": tokens[a:b], "test": tokens[b:]}
        for s, p in self.parts.items():
            if len(p) <= seq_len + 1:
                raise ValueError(f"seq_len={seq_len} is too long for the {s} split ({len(p)} tokens)")

    def size(self, split: str) -> int:
        return len(self.parts[check_split(split)]) - self.seq_len - 1

    def sample(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        seq = self.parts[check_split(split)]
        start = torch.randint(0, self.size(split), (batch_size,), generator=generator)
        idx = start[:, None] + torch.arange(self.seq_len + 1)
        w = seq[idx]
        return w[:, :-1], w[:, 1:]

    def full(self, split: str, max_windows: int = 256) -> Batch:
        seq = self.parts[check_split(split)]
        n = min(self.size(split) // self.seq_len, max_windows)
        idx = torch.arange(n)[:, None] * self.seq_len + torch.arange(self.seq_len + 1)
        w = seq[idx]
        return w[:, :-1], w[:, 1:]


def check_split(split: str) -> str:
    """``split`` if it is one of ``SPLITS``, else a ValueError naming them."""
    if split not in SPLITS:
        raise ValueError(f"Invalid split: {split!r} (use one of {SPLITS})")
    return split


class Task:
    """One optimization problem. Subclasses (or families) build ``module`` and ``data``."""

    def __init__(self, name: str, module: nn.Module, data=None, batch_size: int = 64,
                 buffers: Optional[Params] = None, init_scale: float = 1.0,
                 structure: Hashable = None):
        self.name = name
        self.module = module
        self.data = data
        self.batch_size = int(batch_size)
        self.init_scale = float(init_scale)
        self.buffers: Params = dict(buffers) if buffers is not None else dict(module.named_buffers())
        self.structure = structure
        # The module only describes structure; its own parameter storage is never trained.
        for p in module.parameters():
            p.requires_grad_(False)

    # -- parameters ------------------------------------------------------------------------
    def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self.module.named_parameters()}

    def init_params(self, generator: torch.Generator) -> Params:
        """Fan-in scaled normal weights (times ``init_scale``), zero biases, unit norm gains."""
        out = {}
        for n, p in self.module.named_parameters():
            leaf = n.rsplit(".", 1)[-1]
            if p.dim() >= 2:
                fan_in = p[0].numel()
                w = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                out[n] = w * (self.init_scale / math.sqrt(fan_in))
            elif leaf == "bias":
                out[n] = torch.zeros_like(p)
            else:  # LayerNorm gains and other vectors keep the module's own init
                out[n] = p.detach().clone()
        return out

    # -- loss --------------------------------------------------------------------------------
    def apply(self, params: Params, buffers: Params, batch: Batch, stats: bool = False):
        """The pure loss function shared by all tasks of one signature (vmappable)."""
        tensors = {**params, **buffers}
        if not stats:
            return functional_call(self.module, tensors, tuple(batch))
        with ActivationRecorder(self.module) as rec:
            loss = functional_call(self.module, tensors, tuple(batch))
        return loss, dict(rec.stats)

    def loss(self, params: Params, batch: Batch) -> Tensor:
        return self.apply(params, self.buffers, batch)

    # -- data --------------------------------------------------------------------------------
    def sample_batch(self, split: str, generator: torch.Generator) -> Batch:
        return self.data.sample(split, self.batch_size, generator)

    def sample_batches(self, split: str, n: int, generator: torch.Generator,
                       keep_last: bool = False) -> Batch:
        """``n`` batches stacked along a new leading dim (one per inner step), written into one
        preallocated tensor per part; ``keep_last``: the generator advances by all ``n`` draws
        but only the last batch is kept ([1, ...])."""
        first = self.sample_batch(split, generator)
        if keep_last:
            last = first
            for _ in range(n - 1):
                last = self.sample_batch(split, generator)
            return tuple(x.unsqueeze(0) for x in last)
        out = tuple(torch.empty((n,) + tuple(x.shape), dtype=x.dtype, device=x.device)
                    for x in first)
        for o, x in zip(out, first):
            o[0] = x
        for t in range(1, n):
            for o, x in zip(out, self.sample_batch(split, generator)):
                o[t] = x
        return out

    def full_batch(self, split: str) -> Batch:
        return self.data.full(split)

    def evaluate(self, params: Params, split: str = "valid") -> float:
        with torch.no_grad():
            return float(self.loss(params, self.full_batch(split)))

    # -- grouping ------------------------------------------------------------------------------
    @property
    def signature(self) -> Hashable:
        """Tasks with equal signatures share ``apply`` and all shapes, so they can be vmapped."""
        return (type(self).__name__, self.name, self.structure,
                tuple(self.param_shapes().items()),
                tuple((k, tuple(v.shape)) for k, v in self.buffers.items()), self.batch_size)

    def __repr__(self) -> str:
        n = sum(math.prod(s) for s in self.param_shapes().values())
        return f"{type(self).__name__}({self.name!r}, params={n}, batch_size={self.batch_size})"


class TaskFamily:
    """A distribution over tasks: ``sample(generator) -> Task``."""

    name: str = "family"

    def sample(self, generator: torch.Generator) -> Task:
        raise NotImplementedError

    def sample_seeded(self, seed: int) -> Task:
        """Tasks are reproducible from one integer (what checkpoints store)."""
        return self.sample(torch.Generator().manual_seed(int(seed)))


class FixedFamily(TaskFamily):
    """A family with one member (a single task)."""

    def __init__(self, task_fn: Callable[[], Task], name: str = "fixed"):
        self.task_fn = task_fn
        self.name = name
        self._task = None

    def sample(self, generator: torch.Generator) -> Task:
        if self._task is None:
            self._task = self.task_fn()
        return self._task


def choice(generator: torch.Generator, options):
    return options[int(torch.randint(0, len(options), (1,), generator=generator))]


def log_uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    u = float(torch.rand((), generator=generator))
    return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
