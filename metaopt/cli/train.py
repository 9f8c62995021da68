"""``metaopt-train``: meta-train a rule on a task family; returns the final meta-loss.

    metaopt-train                                   # the task mixture, pertensor rule, nested scheme
    metaopt-train --config-name=shipped             # the shipped default's recipe (anchored rule)
    metaopt-train rule=layerwise_lr task.widths=[64] task.depths=[2] meta.outer_steps=200
    metaopt-train resume=true hydra.run.dir=<the killed run's dir>
    torchrun --nproc_per_node=2 -m metaopt.cli.train hydra.run.dir=runs/ddp   # 2 processes

Under torchrun every rank runs this same command; rank 0's run directory is used by all
(see metaopt.meta.distributed).
"""
from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from metaopt.cli.common import (check_known_keys, config_dir, one_line_errors,
                                primary_config_keys, register_resolvers)
from metaopt.cli.config import (build_family, build_local, build_rule, build_scheme,
                                build_train_config, register_configs)

log = logging.getLogger("metaopt.train")
register_configs()
register_resolvers()

#: config keys a resumed run may change: how long it runs and how it logs, not what it trains
RESUME_MAY_CHANGE = ("meta.outer_steps", "meta.max_seconds", "meta.progress", "meta.log_every",
                     "meta.checkpoint_every", "resume", "threads", "distributed")
#: compared first, so a changed rule/task/scheme is reported as that, not as one of its fields
_RESUME_FIRST = ("rule.name", "task.family", "scheme.name")


def _flatten(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: dict, now: dict, where: str) -> None:
    """``resume=true`` continues the run in the checkpoint: the config must be the one it was
    started with, up to ``RESUME_MAY_CHANGE``. The first differing key is a one-line error."""
    a, b = _flatten(saved), _flatten(now)
    free = lambda k: any(k == f or k.startswith(f + ".") for f in RESUME_MAY_CHANGE)
    keys = [k for k in _RESUME_FIRST if k in a or k in b]
    keys += sorted(k for k in set(a) | set(b) if k not in keys and not free(k))
    missing = object()
    for k in keys:
        x, y = a.get(k, missing), b.get(k, missing)
        if x != y:
            show = lambda v: "unset" if v is missing else repr(v)
            what = ("the rule changed" if k == "rule.name" else "the task changed"
                    if k == "task.family" else "the scheme changed" if k == "scheme.name"
                    else "the config changed")
            raise ValueError(f"resume: {what}: {k} is {show(y)} now but {show(x)} in {where}; "
                             f"resume with the run's own config (only "
                             f"{', '.join(RESUME_MAY_CHANGE)} may change) or start a new run "
                             f"in another hydra.run.dir")


def run_train(cfg: DictConfig, out_dir: str) -> float:
    import torch
    from metaopt.meta import MetaTrainer
    from metaopt.meta.distributed import Distributed

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    dcfg = cfg.get("distributed") or {}
    dist = Distributed.from_env(dcfg.get("backend", "auto"), dcfg.get("timeout_s", 1800))
    out_dir = _shared_out_dir(dist, out_dir)
    train_cfg = build_train_config(cfg.meta)
    family = build_family(cfg.task, train_cfg.dtype)
    rule = build_rule(cfg.rule)
    scheme = build_scheme(cfg.scheme)
    family, scheme = build_local(cfg.get("local"), family, scheme)
    trainer = MetaTrainer(rule, family, scheme, train_cfg, out_dir,
                          resolved_config=OmegaConf.to_container(cfg, resolve=True), dist=dist)
    if cfg.resume:
        saved = trainer.ckpt_dir / "config.yaml"
        if saved.is_file():
            import yaml
            check_resume_config(yaml.safe_load(saved.read_text()), trainer.resolved_config,
                                str(saved))
        trainer.load_checkpoint()
        log.info("resumed from %s at outer step %d", trainer.ckpt_dir, trainer.outer_step)
    final = trainer.run()
    if dist.is_main:
        log.info("final meta-loss %.5f; rule checkpoint: %s", final, trainer.ckpt_dir)
        print(f"rule checkpoint: {trainer.ckpt_dir}")
    dist.shutdown()
    return final


def _shared_out_dir(dist, out_dir: str) -> str:
    """Rank 0's run directory, on every rank. Hydra gave each rank its own (timestamped) one; a
    rank whose directory differs removes it when it holds nothing but hydra's own files."""
    shared = dist.broadcast_str(str(out_dir))
    if shared != str(out_dir):
        import shutil
        from pathlib import Path
        own = Path(out_dir)
        if own.is_dir() and {p.name for p in own.iterdir()} <= {".hydra", "train.log"}:
            shutil.rmtree(own, ignore_errors=True)
    return shared


@hydra.main(config_path=config_dir(), config_name="train", version_base=None)
@one_line_errors
def main(cfg: DictConfig) -> float:
    import os
    from hydra.types import RunMode
    hc = HydraConfig.get()
    check_known_keys(cfg, primary_config_keys())
    if hc.mode == RunMode.MULTIRUN and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("metaopt-train -m (multirun) under torchrun is not supported: launch one "
                         "torchrun per run, or sweep with hydra/launcher=submitit_slurm")
    return run_train(cfg, hc.runtime.output_dir)


if __name__ == "__main__":
    main()
