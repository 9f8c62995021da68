"""Shared CLI plumbing: where conf/ lives and one-line errors instead of tracebacks.

The top-level ``conf/`` is the source of truth. A wheel install carries a copy inside the
package (``metaopt/conf``, written by setup.py's build step), which is used when present; an
editable install reads ``conf/`` from the source tree.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

PACKAGED_CONF_DIR = Path(__file__).resolve().parents[1] / "conf"   # wheel install
SOURCE_CONF_DIR = Path(__file__).resolve().parents[2] / "conf"     # source tree / editable
CONF_DIR = PACKAGED_CONF_DIR if (PACKAGED_CONF_DIR / "train.yaml").is_file() else SOURCE_CONF_DIR


def config_dir() -> str:
    if not CONF_DIR.is_dir():
        raise SystemExit(f"error: metaopt's configs not found (looked in {PACKAGED_CONF_DIR} and "
                         f"{SOURCE_CONF_DIR}); reinstall metaopt (pip install .)")
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
