"""Rule checkpoints: tensors in safetensors, everything else in JSON. Nothing is unpickled.

A rule checkpoint (what :meth:`metaopt.optim.LearnedOptimizer.from_pretrained` reads) is a
directory holding ``theta.safetensors`` + ``rule.json`` (rule name, constructor kwargs, theta
shapes, and the parameter spec for spec-dependent rules). Rules shipped with the package live in
``metaopt/pretrained/<name>/`` and are addressed by name.

This module sits in ``rules/`` so that both ``meta/`` (which writes checkpoints while training)
and ``optim/`` (which reads them) can use it without ``optim`` importing ``meta``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from metaopt.rules.base import Rule, make_rule
from metaopt.types import FlatSpec, Params

__all__ = ["PRETRAINED_DIR", "CheckpointError", "save_tensors", "load_tensors", "write_json",
           "read_json", "save_rule", "load_rule", "resolve_rule_path", "check_theta",
           "spec_mismatch"]

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"


class CheckpointError(ValueError):
    """A checkpoint, state_dict or theta that does not fit (wrong format, rule, keys or
    shapes); the message names the key."""


def save_tensors(tensors: Dict[str, Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> Dict[str, Tensor]:
    return load_file(str(path))


def write_json(obj, path: Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def save_rule(path, rule: Rule, theta: Params, spec: Optional[FlatSpec] = None, extra=None) -> Path:
    """Write ``theta.safetensors`` + ``rule.json`` into directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(theta, path / "theta.safetensors")
    meta = {"rule": rule.describe(), "theta_shapes": {k: list(v.shape) for k, v in theta.items()},
            "spec": spec.to_json() if (spec is not None and rule.spec_dependent) else None,
            "format": "metaopt-rule-v1"}
    if extra:
        meta.update(extra)
    write_json(meta, path / "rule.json")
    return path


def resolve_rule_path(name_or_path) -> Path:
    """A rule checkpoint directory, or the name of a rule shipped in metaopt/pretrained."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = PRETRAINED_DIR / str(name_or_path)
    if not shipped.exists():
        known = sorted(p.name for p in PRETRAINED_DIR.iterdir() if p.is_dir())
        raise CheckpointError(f"No checkpoint at {str(name_or_path)!r} and no shipped rule of that "
                              f"name (shipped: {known})")
    return shipped


def load_rule(path) -> Tuple[Rule, Params, dict]:
    """Read a rule checkpoint; checks theta against the rule's expected shapes."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not (path / "rule.json").exists() or not (path / "theta.safetensors").exists():
        raise CheckpointError(f"Not a rule checkpoint: {path} (needs rule.json and theta.safetensors)")
    meta = read_json(path / "rule.json")
    cfg = dict(meta["rule"])
    rule = make_rule(cfg.pop("name"), **cfg)
    theta = load_tensors(path / "theta.safetensors")
    spec = FlatSpec.from_json(meta["spec"]) if meta.get("spec") else None
    expected = rule.init_theta(spec, torch.Generator().manual_seed(0)) if (spec or not rule.spec_dependent) else None
    if expected is not None:
        check_theta(theta, expected, where=str(path))
    return rule, theta, meta


def check_theta(theta: Params, expected: Params, where: str = "checkpoint") -> None:
    """One-line error naming the first key whose presence or shape differs."""
    missing = sorted(set(expected) - set(theta))
    unexpected = sorted(set(theta) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: theta is missing {missing[0]!r} (rule expects keys {sorted(expected)})")
    if unexpected:
        raise CheckpointError(f"{where}: theta has unexpected key {unexpected[0]!r} for this rule")
    for k in expected:
        if tuple(theta[k].shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{where}: theta[{k!r}] has shape {list(theta[k].shape)}, "
                                  f"rule expects {list(expected[k].shape)}")


def spec_mismatch(stored: Optional[Sequence], spec: FlatSpec, names: bool = False) -> Optional[str]:
    """Why a spec-dependent rule trained for ``stored`` (a checkpoint's ``spec``: ``[name,
    shape]`` pairs) does not fit the parameters ``spec``, or None when it fits. Shapes and the
    number of tensors must agree; with ``names``, the parameter names too."""
    stored = [(n, tuple(s)) for n, s in (stored or [])]
    for (n, s), (m, t) in zip(stored, zip(spec.names, spec.shapes)):
        if s != tuple(t) or (names and n != m):
            return (f"rule was trained for parameter {n!r} of shape {list(s)}; this model's {m!r} "
                    f"has shape {list(t)}")
    if len(stored) != spec.num_tensors:
        return (f"rule was trained for {len(stored)} parameter tensors; this model has "
                f"{spec.num_tensors}")
    return None
