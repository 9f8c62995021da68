"""Synthetic memory tasks for fast-weight layers (pure data; no model code).

* Ba et al. (2016) associative retrieval: ``K`` distinct letters each followed by a digit,
  then ``??`` and one of the letters; the target is that letter's digit.
  ``c9k8j3f1??c -> 9`` (K = 4, sequence length 2K + 3 = 11). Splits 100k/10k/20k.
* Schlag, Irie & Schmidhuber (2021) capacity task: ``N`` keys (symbols) bound to random
  one-hot values. Setting 1 writes each key once (``N`` writes); setting 2 writes every key
  twice, the second time with a fresh value, in a new random order (``2N`` writes), and the
  model must return the most recent value. Then every key is queried once.

All randomness flows from explicit ``torch.Generator`` objects.
"""
from __future__ import annotations

import string
from typing import Dict, Tuple

import torch
from torch import Tensor

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
