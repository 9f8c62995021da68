"""Data that ship with the installed packages: scikit-learn's toy sets and Python's own text.

Nothing here downloads. Loaders return plain tensors, so a user's own data go through the same
path: build ``ArrayDataset(x, y)`` / ``SequenceDataset(tokens, seq_len)`` from any tensors and
hand it to a task builder (``MLPTask``, ``ConvTask``, ``CharLMTask``).

Preprocessing choices (documented once, here):

* ``digits``: pixel values 0..16 scaled to [0, 1]; images ``[N, 1, 8, 8]`` (or ``[N, 64]`` with
  ``flat=True``); not standardized.
* ``breast_cancer``, ``wine``, ``diabetes``: ``load_sklearn`` returns the raw features.
  :func:`make_dataset` standardizes them with *train-split* statistics only (mean/std of the
  train part, applied to all three parts), so the valid/test parts stay unseen. Regression
  targets (``diabetes``) are standardized the same way.
"""
from __future__ import annotations

import ast
import codecs
import functools
import sysconfig
from pathlib import Path
from typing import Iterable, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from metaopt.tasks.base import SPLITS, ArrayDataset

# name -> (sklearn loader name, is classification)
SKLEARN_DATASETS = {
    "digits": ("load_digits", True),
    "breast_cancer": ("load_breast_cancer", True),
    "wine": ("load_wine", True),
    "diabetes": ("load_diabetes", False),
}


def resolve_dtype(dtype) -> torch.dtype:
    """Accept ``torch.float64`` or the string ``"float64"`` (what a YAML config holds)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    d = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise ValueError(f"Invalid dtype: {dtype!r} (use a floating dtype such as 'float32')")
    return d


def check_dataset_name(name: str) -> str:
    """``name`` if it is a known scikit-learn dataset (a key of ``SKLEARN_DATASETS``), else a
    ValueError listing the known ones."""
    if name not in SKLEARN_DATASETS:
        raise ValueError(f"Unknown dataset: {name!r} (known: {', '.join(SKLEARN_DATASETS)})")
    return name


@functools.lru_cache(maxsize=None)
def _load_raw(name: str) -> Tuple[np.ndarray, np.ndarray]:
    """The raw numpy arrays, loaded once per process and frozen (callers get copies)."""
    import sklearn.datasets

    loader, _ = SKLEARN_DATASETS[check_dataset_name(name)]
    x, y = getattr(sklearn.datasets, loader)(return_X_y=True)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def is_classification(name: str) -> bool:
    return SKLEARN_DATASETS[check_dataset_name(name)][1]


def num_classes(y: Tensor) -> int:
    return int(y.max()) + 1


def load_sklearn(name: str, dtype=torch.float32, flat: bool = False) -> Tuple[Tensor, Tensor]:
    """``(x, y)`` tensors of one of scikit-learn's bundled data sets (see module docstring).

    Classification targets are ``int64`` class ids; regression targets have ``dtype``.
    ``digits`` images are ``[N, 1, 8, 8]`` in [0, 1] unless ``flat=True`` (``[N, 64]``).
    """
    dtype = resolve_dtype(dtype)
    x, y = _load_raw(name)
    xt = torch.tensor(x, dtype=dtype)
    if name == "digits":
        xt = xt / 16.0
        if not flat:
            xt = xt.reshape(-1, 1, 8, 8)
    yt = torch.tensor(y, dtype=torch.int64) if is_classification(name) else torch.tensor(y, dtype=dtype)
    return xt, yt


def standardize_(ds: ArrayDataset, x: bool = True, y: bool = False, eps: float = 1e-8) -> ArrayDataset:
    """Standardize features (and float targets) in place with the train split's mean and std."""
    for attr, on in (("x", x), ("y", y)):
        if not on:
            continue
        parts = getattr(ds, attr)
        ref = parts["train"]
        if not ref.is_floating_point():
            continue
        mean = ref.mean(0, keepdim=True)
        std = ref.std(0, keepdim=True).clamp_min(eps)
        for s in SPLITS:
            parts[s] = (parts[s] - mean) / std
    return ds


@functools.lru_cache(maxsize=32)
def _cached_dataset(name: str, split_seed: int, fractions: Tuple[float, ...], dtype: torch.dtype,
                    flat: bool, standardize: bool) -> ArrayDataset:
    x, y = load_sklearn(name, dtype=dtype, flat=flat)
    ds = ArrayDataset(x, y, fractions=fractions, seed=split_seed, name=name)
    if standardize and name != "digits":
        standardize_(ds, x=True, y=not is_classification(name))
    return ds


def make_dataset(name: str, split_seed: int = 0, fractions: Sequence[float] = (0.6, 0.2, 0.2),
                 dtype=torch.float32, flat: bool = False, standardize: bool = True) -> ArrayDataset:
    """A bundled data set split by ``split_seed`` (and standardized with train statistics).

    Cached per arguments: tasks sampled from one family share one (read-only) dataset object.
    """
    return _cached_dataset(check_dataset_name(name), int(split_seed),
                           tuple(float(f) for f in fractions), resolve_dtype(dtype), bool(flat),
                           bool(standardize))


# -- text ------------------------------------------------------------------------------------

#: Pure-Python standard-library modules whose docstrings make up :func:`load_text`. The list is
#: fixed; a module missing from some Python version is skipped. The text is therefore
#: deterministic for one Python installation (and changes only slightly across versions).
TEXT_MODULES = (
    "argparse", "collections", "configparser", "contextlib", "dataclasses", "datetime",
    "difflib", "doctest", "email.message", "enum", "fractions", "functools", "heapq", "inspect",
    "ipaddress", "json", "logging", "os", "pathlib", "random", "shutil", "smtplib",
    "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "turtle",
    "typing", "unittest.case", "urllib.parse", "zipfile", "codecs",
)


def stdlib_source(module: str):
    """The source text of a module of Python's standard library (read from disk, not imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = module.replace(".", "/")
    for p in (root / f"{rel}.py", root / rel / "__init__.py"):
        if p.is_file():
            return p.read_text(encoding="utf-8")
    return None


def _docstrings(source: str) -> Iterable[str]:
    """Docstrings of a module, its classes and functions, in source order (parsed, not
    imported, so it works under ``python -OO`` and has no import side effects)."""
    def visit(node):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc
        for child in ast.iter_child_nodes(node):
            yield from visit(child)
    yield from visit(ast.parse(source))


def _zen() -> str:
    """The Zen of Python, decoded from ``this.py`` without importing it (import prints it)."""
    src = stdlib_source("this")
    if src is None:
        return ""
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "s" for t in node.targets):
            return codecs.decode(ast.literal_eval(node.value), "rot13")
    return ""


def to_ascii(text: str) -> str:
    """Tabs to four spaces, no carriage returns, any other non-printable or non-ASCII char to '?'."""
    text = text.replace("\t", "    ").replace("\r", "")
    return "".join(c if (" " <= c <= "~" or c == "\n") else "?" for c in text)


@functools.lru_cache(maxsize=None)
def load_text() -> str:
    """Character-level English/code text that ships with Python (~0.5M characters).

    The Zen of Python followed by the docstrings of :data:`TEXT_MODULES`, separated by blank
    lines, reduced to printable ASCII plus newline (others become ``?``), so the vocabulary
    has at most 96 symbols.
    """
    parts = [_zen()]
    for m in TEXT_MODULES:
        src = stdlib_source(m)
        if src is not None:
            parts.extend(_docstrings(src))
    return to_ascii("\n\n".join(p.strip() for p in parts if p.strip())) + "\n"


class CharVocab:
    """Characters <-> integer ids. ``CharVocab.from_text(text)`` uses the sorted set of chars."""

    def __init__(self, chars: Iterable[str]):
        self.chars = tuple(chars)
        if len(set(self.chars)) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise ValueError("CharVocab needs distinct single characters")
        self.index = {c: i for i, c in enumerate(self.chars)}
        # Fast path for encode: a 0x110000-free lookup table over the code points in the vocab.
        top = max((ord(c) for c in self.chars), default=0) + 1
        self._table = np.full(top, -1, dtype=np.int64)
        for c, i in self.index.items():
            self._table[ord(c)] = i

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def __repr__(self) -> str:
        return f"CharVocab(size={len(self)})"

    def encode(self, text: str) -> Tensor:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ok = codes < len(self._table)
        ids = np.full(codes.shape, -1, dtype=np.int64)
        ids[ok] = self._table[codes[ok]]
        if (ids < 0).any():
            bad = sorted({chr(c) for c in codes[ids < 0]})
            raise ValueError(f"Characters not in the vocabulary: {bad[:10]!r}")
        return torch.from_numpy(ids)

    def decode(self, ids) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return "".join(self.chars[int(i)] for i in ids)


# -- option parsing shared by the family constructors ------------------------------------------

def as_choices(value, option: str, kind=int) -> Tuple:
    """A family option that is either one value or a list of values to sample from."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        value = (value,)
    out = tuple(kind(v) for v in value)
    if not out:
        raise ValueError(f"Invalid {option}: {value!r} (need at least one choice)")
    return out


def as_range(value, option: str, positive: bool = True) -> Tuple[float, float]:
    """A family option that is either one number (fixed) or a ``(lo, hi)`` range."""
    if isinstance(value, (int, float)):
        value = (value, value)
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {option}: {value!r} (need a number or a (lo, hi) pair)") from None
    if hi < lo or (positive and lo <= 0) or (not positive and lo < 0):
        kind = "0 < lo <= hi" if positive else "0 <= lo <= hi"
        raise ValueError(f"Invalid {option}: {value!r} (need {kind})")
    return lo, hi


def uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + float(torch.rand((), generator=generator, dtype=torch.float64)) * (hi - lo)


def jsonable(value):
    """Constructor args as JSON/YAML-friendly values (tuples -> lists, dtypes -> names)."""
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    return value
