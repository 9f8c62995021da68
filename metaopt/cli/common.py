"""Shared CLI plumbing: where conf/ lives and one-line errors instead of tracebacks."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def config_dir() -> str:
    if not CONF_DIR.is_dir():
        raise SystemExit(f"error: metaopt's conf/ directory not found at {CONF_DIR}; install the "
                         "repository in editable mode (pip install -e .)")
    return str(CONF_DIR)


def one_line_errors(fn):
    """Bad input (config values, checkpoints) ends the run with 'error: ...' on one line."""
    from metaopt.meta.checkpoint import CheckpointError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, CheckpointError, FileNotFoundError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
    return wrapper
