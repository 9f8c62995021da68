"""Synthetic memory tasks for fast-weight layers (pure data; no model code).

* Ba et al. (2016) associative retrieval: ``K`` distinct letters each followed by a digit,
  then ``??`` and one of the letters; the target is that letter's digit.
  ``c9k8j3f1??c -> 9`` (K = 4, sequence length 2K + 3 = 11). Splits 100k/10k/20k.
* Schlag, Irie & Schmidhuber (2021) capacity task: ``N`` keys (symbols) bound to random
  one-hot values. Setting 1 writes each key once (``N`` writes); setting 2 writes every key
  twice, the second time with a fresh value, in a new random order (``2N`` writes), and the
  model must return the most recent value. Then every key is queried once.

All randomness flows from explicit ``torch.Generator`` objects. ``AssocRetrievalFamily``
(registered as ``assoc_retrieval``) makes the retrieval task a task family for
``metaopt-train`` / ``metaopt-eval`` (learned by a plain tanh RNN).
"""
from __future__ import annotations

import functools
import string
from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn

from metaopt.tasks.base import ArrayDataset, TaskFamily, choice, log_uniform
from metaopt.tasks.data import resolve_dtype, as_choices, as_range, jsonable
from metaopt.tasks.mlp import SupervisedModule, SupervisedTask

LETTERS = string.ascii_lowercase
DIGITS = string.digits
RETRIEVAL_VOCAB = LETTERS + DIGITS + "?"  # 37 tokens: 0-25 letters, 26-35 digits, 36 '?'
QUERY_TOKEN = RETRIEVAL_VOCAB.index("?")
RETRIEVAL_SPLITS = {"train": 100_000, "valid": 10_000, "test": 20_000}


def make_retrieval(n: int, num_pairs: int = 4, generator: torch.Generator = None
                   ) -> Tuple[Tensor, Tensor]:
    """``n`` retrieval sequences: tokens ``(n, 2K+3)`` (long) and target digits ``(n,)`` in 0..9."""
    if not 1 <= num_pairs <= len(LETTERS):
        raise ValueError(f"Invalid num_pairs: {num_pairs} (need 1..{len(LETTERS)})")
    if n < 1:
        raise ValueError(f"Invalid n: {n}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    keys = torch.rand(n, len(LETTERS), generator=g).argsort(dim=1)[:, :num_pairs]  # distinct
    vals = torch.randint(0, 10, (n, num_pairs), generator=g)
    which = torch.randint(0, num_pairs, (n,), generator=g)
    x = torch.empty(n, 2 * num_pairs + 3, dtype=torch.long)
    x[:, 0:2 * num_pairs:2] = keys
    x[:, 1:2 * num_pairs:2] = vals + len(LETTERS)
    x[:, 2 * num_pairs] = QUERY_TOKEN
    x[:, 2 * num_pairs + 1] = QUERY_TOKEN
    x[:, -1] = keys.gather(1, which[:, None])[:, 0]
    y = vals.gather(1, which[:, None])[:, 0]
    return x, y


def retrieval_splits(num_pairs: int = 4, seed: int = 0, sizes: Dict[str, int] = None
                     ) -> Dict[str, Tuple[Tensor, Tensor]]:
    """Ba et al.'s fixed train/valid/test sets (100k/10k/20k by default), one seed for all."""
    sizes = dict(RETRIEVAL_SPLITS if sizes is None else sizes)
    g = torch.Generator().manual_seed(seed)
    return {s: make_retrieval(n, num_pairs, g) for s, n in sizes.items()}


def decode_retrieval(x: Tensor) -> str:
    """Tokens of one sequence back to text (``'c9k8j3f1??c'``)."""
    return "".join(RETRIEVAL_VOCAB[int(t)] for t in x)


def capacity_batch(batch_size: int, num_keys: int, d_value: int = 8, setting: int = 2,
                   generator: torch.Generator = None) -> Dict[str, Tensor]:
    """One batch of the capacity task.

    Returns ``write_keys (B, Tw)`` (key ids), ``write_values (B, Tw, d_value)`` (one-hot),
    ``query_keys (B, N)`` and ``targets (B, N, d_value)``: the value most recently bound to
    each queried key. ``Tw = N`` (setting 1) or ``2N`` (setting 2).
    """
    if setting not in (1, 2):
        raise ValueError(f"Invalid setting: {setting} (use 1 or 2)")
    if num_keys < 1 or d_value < 1 or batch_size < 1:
        raise ValueError(f"Invalid sizes: num_keys={num_keys}, d_value={d_value}, "
                         f"batch_size={batch_size}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    B, N = batch_size, num_keys

    def perm():
        return torch.rand(B, N, generator=g).argsort(dim=1)

    keys = [perm() for _ in range(setting)]
    vals = [torch.randint(0, d_value, (B, N), generator=g) for _ in range(setting)]
    write_keys = torch.cat(keys, dim=1)
    write_ids = torch.cat(vals, dim=1)
    # the last binding of key j: position of j in the last permutation
    last = torch.empty(B, N, dtype=torch.long)
    last.scatter_(1, keys[-1], vals[-1])
    query_keys = perm()
    target_ids = last.gather(1, query_keys)
    eye = torch.eye(d_value)
    return {"write_keys": write_keys, "write_values": eye[write_ids],
            "query_keys": query_keys, "targets": eye[target_ids]}


# -- a task family for metaopt-train / metaopt-eval -------------------------------------------------
# A plain tanh RNN (the fast-weight layers live in metaopt.fastweights, which tasks/ must not
# import), written as an explicit loop over Linear layers so that torch.func can vmap it.


class RetrievalRNNModule(SupervisedModule):
    """Embedding -> tanh RNN -> last state -> 10 digit logits; cross entropy."""

    def __init__(self, hidden: int = 20, embed: int = 16):
        super().__init__("ce")
        self.embed = nn.Embedding(len(RETRIEVAL_VOCAB), embed)
        self.inp = nn.Linear(embed, hidden)
        self.rec = nn.Linear(hidden, hidden, bias=False)
        self.head = nn.Linear(hidden, 10)

    def outputs(self, x: Tensor) -> Tensor:
        e = self.inp(self.embed(x))
        h = torch.zeros_like(e[..., 0, :])
        for t in range(x.shape[-1]):
            h = torch.tanh(e[..., t, :] + self.rec(h))
        return self.head(h)


@functools.lru_cache(maxsize=4)
def _retrieval_dataset(num_pairs: int, num_examples: int, split_seed: int) -> ArrayDataset:
    x, y = make_retrieval(num_examples, num_pairs, torch.Generator().manual_seed(split_seed))
    return ArrayDataset(x, y, fractions=(10 / 13, 1 / 13, 2 / 13), seed=split_seed,
                        name=f"retrieval{num_pairs}")


class RetrievalTask(SupervisedTask):
    def __init__(self, data: ArrayDataset, hidden: int = 20, embed: int = 16,
                 batch_size: int = 128, init_scale: float = 1.0, name: str = "assoc_retrieval",
                 dtype=torch.float32):
        if hidden < 1 or embed < 1:
            raise ValueError(f"Invalid hidden/embed: {hidden}/{embed}")
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size}")
        module = RetrievalRNNModule(hidden, embed).to(resolve_dtype(dtype))
        structure = ("assoc_retrieval", data.x["train"].shape[1], hidden, embed, int(batch_size))
        super().__init__(name, module, data=data, batch_size=batch_size, init_scale=init_scale,
                         structure=structure)


class AssocRetrievalFamily(TaskFamily):
    """Ba et al.'s associative retrieval (``num_pairs`` pairs, sequence ``2K + 3``) learned by a
    tanh RNN; ``hidden`` and ``batch_sizes`` may be lists to sample from, ``init_scale`` a range.
    ``num_examples`` sequences split 100/10/20 (Ba et al.'s 100k/10k/20k at the default 130k)."""

    name = "assoc_retrieval"

    def __init__(self, num_pairs: int = 4, hidden=(20,), embed: int = 16, batch_sizes=(128,),
                 init_scale=(0.5, 2.0), num_examples: int = 130_000, split_seed: int = 0,
                 dtype=torch.float32):
        if not 1 <= int(num_pairs) <= len(LETTERS):
            raise ValueError(f"Invalid num_pairs: {num_pairs} (need 1..{len(LETTERS)})")
        if int(num_examples) < 13:
            raise ValueError(f"Invalid num_examples: {num_examples}")
        self.num_pairs, self.embed = int(num_pairs), int(embed)
        self.hidden = as_choices(hidden, "hidden")
        self.batch_sizes = as_choices(batch_sizes, "batch_sizes")
        self.init_scale = as_range(init_scale, "init_scale")
        self.num_examples, self.split_seed = int(num_examples), int(split_seed)
        self.dtype = resolve_dtype(dtype)

    @property
    def data(self) -> ArrayDataset:
        return _retrieval_dataset(self.num_pairs, self.num_examples, self.split_seed)

    def sample(self, generator: torch.Generator) -> RetrievalTask:
        hidden = choice(generator, self.hidden)
        batch_size = choice(generator, self.batch_sizes)
        init_scale = log_uniform(generator, *self.init_scale)
        return RetrievalTask(self.data, hidden, self.embed, batch_size, init_scale,
                             name=self.name, dtype=self.dtype)

    def config(self) -> Dict[str, Any]:
        return {"num_pairs": self.num_pairs, "hidden": list(self.hidden), "embed": self.embed,
                "batch_sizes": list(self.batch_sizes), "init_scale": jsonable(self.init_scale),
                "num_examples": self.num_examples, "split_seed": self.split_seed,
                "dtype": jsonable(self.dtype)}
