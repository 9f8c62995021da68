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
    from metaopt.rules.io import CheckpointError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, CheckpointError, FileNotFoundError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
    return wrapper


def group_options(group: str) -> str:
    """The options of config group ``group`` (ConfigStore entries and conf/<group>/*.yaml),
    comma-separated: the option lists of the apps' ``--help``."""
    from hydra.core.config_store import ConfigStore
    names = {k[:-5] for k in ConfigStore.instance().repo.get(group, {}) if k.endswith(".yaml")}
    d = CONF_DIR / group
    if d.is_dir():
        names |= {p.stem for p in d.glob("*.yaml")}
    return ", ".join(sorted(names))


def register_resolvers() -> None:
    from omegaconf import OmegaConf
    if not OmegaConf.has_resolver("metaopt_options"):
        OmegaConf.register_new_resolver("metaopt_options", group_options)


def check_known_keys(cfg, primary_keys=()) -> None:
    """A key that no config declares (``+meta.outer_stepz=3``, the fix hydra suggests for a
    typo) is an error naming the key, not a silently ignored value or a TypeError deep in a
    constructor. Typed nodes (structured configs) may hold only their dataclass's fields; the
    top level only the config groups and the primary config's own keys (``primary_keys``)."""
    import dataclasses
    from omegaconf import DictConfig, OmegaConf

    def walk(node, path):
        t = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(t):
            fields = [f.name for f in dataclasses.fields(t)]
            for k in node.keys():
                if k not in fields:
                    raise ValueError(f"unknown config key {path}{k} ({t.__name__} has "
                                     f"{', '.join(fields)})")
        for k in node.keys():
            v = node._get_node(k)
            if isinstance(v, DictConfig) and not v._is_missing() and not v._is_none():
                walk(v, f"{path}{k}.")

    if primary_keys:
        from hydra.core.hydra_config import HydraConfig
        groups = {g.split("/")[0] for g in HydraConfig.get().runtime.choices
                  if not g.startswith("hydra")}
        allowed = set(primary_keys) | groups
        for k in cfg.keys():
            if k not in allowed:
                raise ValueError(f"unknown config key {k} (this app's keys: "
                                 f"{', '.join(sorted(allowed))})")
    walk(cfg, "")


def primary_config_keys() -> set:
    """The top-level keys the running app's primary config file declares (besides its
    groups); empty when the file is not in metaopt's conf/ (then the top level is not checked)."""
    import yaml
    from hydra.core.hydra_config import HydraConfig
    name = HydraConfig.get().job.config_name
    path = CONF_DIR / f"{name}.yaml"
    if not name or not path.is_file():
        return set()
    data = yaml.safe_load(path.read_text()) or {}
    return set(data) - {"defaults", "hydra"}
