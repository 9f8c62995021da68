"""Checkpoints: tensors in safetensors, everything else in JSON/YAML. Nothing is unpickled.

A rule checkpoint (what LearnedOptimizer.from_pretrained reads) is a directory or file pair:
``theta.safetensors`` + ``rule.json`` (rule name, constructor kwargs, theta shapes, and the
parameter spec for spec-dependent rules).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

# Rule serialization (save_rule, load_rule, safetensors/JSON helpers) lives in metaopt/rules/io.py,
# so that optim/ can read checkpoints without importing meta/.


# Atomic checkpoint directories: write into a temp sibling (``staging_dir``), then swap it in
# (``commit_dir``), so a killed run never leaves half a checkpoint.
def staging_path(final: Path) -> Path:
    """Where the checkpoint that will become ``final`` is written first."""
    final = Path(final)
    return final.with_name(final.name + ".tmp")


def staging_dir(final: Path) -> Path:
    """A fresh, empty :func:`staging_path` of ``final``."""
    tmp = staging_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(final: Path, tmp: Path) -> None:
    """Swap the fully written ``tmp`` in as ``final`` (the previous one is removed after)."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
