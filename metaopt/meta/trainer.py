"""The meta-training loop, top to bottom.

theta <- outer optimizer step on the scheme's meta-gradient, once per outer step; K persistent
slots each carry one inner run across truncations. What makes it robust:

* non-finite inner loss / meta-loss / meta-gradient: the update is skipped (theta untouched),
  the offending slots are reset with fresh tasks, and the event is counted (``nonfinite``);
* checkpoints every ``checkpoint_every`` outer steps hold theta, the outer optimizer (its own
  ``state_dict()``: tensors in safetensors, the rest in JSON, no pickle), every RNG state and
  every slot (params, rule state, counters, batch generator), so ``resume=True``
  continues exactly where the last checkpoint was taken and reaches the same theta as a run
  that was never interrupted.
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor

from metaopt.meta.checkpoint import (CheckpointError, atomic_dir_write, check_theta, load_tensors,
                                     read_json, save_rule, save_tensors, write_json)
from metaopt.meta.schemes import Scheme
from metaopt.meta.slots import Slot, new_slot
from metaopt.meta.unroll import UnrollOut, check_meta_loss, get_meta_loss
from metaopt.rules.base import Rule
from metaopt.tasks.base import TaskFamily
from metaopt.types import FlatSpec, Params

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class TrainConfig:
    outer_steps: int = 300
    meta_batch: int = 8          # K slots (tasks) per outer step
    horizon: int = 500           # inner steps before a slot's task is replaced
    outer_lr: float = 3e-3
    clip_grad: float = 1.0       # global-norm clipping of the meta-gradient (0 = off)
    meta_loss: str = "valid_mean"
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 1
    dtype: str = "float32"
    progress: bool = True
    max_seconds: float = 0.0     # wall-clock budget of meta-training (0 = none): stop after the
                                 # outer step that crosses it, checkpoint and return

    def validate(self):
        for k in ("outer_steps", "meta_batch", "horizon", "checkpoint_every", "log_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"Invalid meta.{k}: {getattr(self, k)} (must be >= 1)")
        if self.outer_lr <= 0:
            raise ValueError(f"Invalid meta.outer_lr: {self.outer_lr}")
        if self.clip_grad < 0:
            raise ValueError(f"Invalid meta.clip_grad: {self.clip_grad}")
        if self.max_seconds < 0:
            raise ValueError(f"Invalid meta.max_seconds: {self.max_seconds} (must be >= 0)")
        if self.dtype not in DTYPES:
            raise ValueError(f"Invalid meta.dtype: {self.dtype!r} (use float32 or float64)")
        check_meta_loss(self.meta_loss)


class MetaTrainer:
    def __init__(self, rule: Rule, family: TaskFamily, scheme: Scheme, cfg: TrainConfig,
                 out_dir, resolved_config: Optional[dict] = None):
        cfg.validate()
        self.rule, self.family, self.scheme, self.cfg = rule, family, scheme, cfg
        self.out_dir = Path(out_dir)
        self.resolved_config = resolved_config or {}
        self.meta_loss = get_meta_loss(cfg.meta_loss)
        self.dtype = DTYPES[cfg.dtype]
        self.gen = torch.Generator().manual_seed(cfg.seed)
        probe = family.sample_seeded(cfg.seed)
        self.spec = FlatSpec.from_shapes(probe.param_shapes())
        theta = rule.init_theta(self.spec, self.gen)
        self.theta: Params = {k: v.to(self.dtype).requires_grad_(True) for k, v in theta.items()}
        self.opt = torch.optim.Adam(list(self.theta.values()), lr=cfg.outer_lr)
        self.outer_step = 0
        self.inner_steps = 0
        self.nonfinite = 0
        self.elapsed = 0.0
        self.slots: List[Slot] = [self._fresh_slot(first=True) for _ in range(cfg.meta_batch)]

    # -- slots ---------------------------------------------------------------------------------
    def _draw_seed(self) -> int:
        return int(torch.randint(0, 2 ** 31 - 1, (1,), generator=self.gen))

    def _fresh_slot(self, first: bool = False) -> Slot:
        seed = self._draw_seed()
        W = self.scheme.window
        horizon = self.cfg.horizon
        if first:
            # Random initial offsets: first runs end at random multiples of the window, so after the
            # first resets the meta-batch holds early and late phases of training at once.
            n = max(1, horizon // W)
            horizon = W * (1 + int(torch.randint(0, n, (1,), generator=self.gen)))
        slot = new_slot(self.family, self.rule, seed, horizon, self.dtype)
        if self.rule.spec_dependent and FlatSpec.of(slot.params) != self.spec:
            raise ValueError(f"rule {self.rule.name!r} learns one value per layer/parameter, so all "
                             f"tasks must share one parameter spec; task {slot.task!r} differs "
                             f"(fix the task family's architecture, e.g. task.widths=[64])")
        return slot

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> float:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.out_dir / "metrics.csv"
        fields = ["outer_step", "meta_loss", "train_loss", "grad_norm", "nonfinite",
                  "inner_steps", "wall_time"]
        new_log = not log_path.exists() or self.outer_step == 0
        if not new_log:  # resumed: drop rows logged after the checkpoint we resumed from
            with open(log_path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["outer_step"]) <= self.outer_step]
            with open(log_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(kept)
        log_f = open(log_path, "w" if new_log else "a", newline="")
        writer = csv.DictWriter(log_f, fieldnames=fields)
        if new_log:
            writer.writeheader()
        tb = _tensorboard(self.out_dir)
        bar = _progress(cfg.outer_steps, self.outer_step, cfg.progress)
        last_meta = float("nan")
        try:
            while self.outer_step < cfg.outer_steps:
                t0 = time.perf_counter()
                row = self.train_step()
                self.elapsed += time.perf_counter() - t0
                if math.isfinite(row["meta_loss"]):
                    last_meta = row["meta_loss"]
                row["wall_time"] = round(self.elapsed, 4)
                if self.outer_step % cfg.log_every == 0 or self.outer_step == cfg.outer_steps:
                    writer.writerow(row)
                    log_f.flush()
                    if tb is not None:
                        for k in ("meta_loss", "train_loss", "grad_norm"):
                            tb.add_scalar(k, row[k], self.outer_step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(meta_loss=f"{row['meta_loss']:.4f}", nonfinite=self.nonfinite)
                out_of_time = 0 < cfg.max_seconds <= self.elapsed
                if (self.outer_step % cfg.checkpoint_every == 0 or self.outer_step == cfg.outer_steps
                        or out_of_time):
                    self.save_checkpoint()
                if out_of_time:
                    break
        finally:
            log_f.close()
            if bar is not None:
                bar.close()
            if tb is not None:
                tb.close()
        return last_meta

    def train_step(self) -> Dict[str, float]:
        """One outer step: scheme meta-gradient, finite check, clipped outer update, slot resets."""
        out = self.scheme.meta_gradient(self.rule, self.theta, self.slots, self.meta_loss)
        self.outer_step += 1
        self.inner_steps += out.inner_steps * len(self.slots)
        bad_slots = [i for i, o in enumerate(out.outs) if not _finite(o)]
        grads_ok = all(torch.isfinite(g).all() for g in out.grads.values())
        grad_norm = float("nan")
        if bad_slots or not grads_ok:
            # Skip the update; theta and the healthy slots are untouched. Reset what diverged
            # (everything if only the meta-gradient overflowed: it cannot be attributed to a slot).
            self.nonfinite += 1
            for i in (bad_slots or range(len(self.slots))):
                self.slots[i] = self._fresh_slot()
        else:
            grad_norm = self._apply_grads(out.grads)
            self.slots = [self._fresh_slot() if s.done else s for s in out.slots]
        return {"outer_step": self.outer_step, "meta_loss": _mean(out.meta_losses),
                "train_loss": _mean(out.train_losses), "grad_norm": grad_norm,
                "nonfinite": self.nonfinite, "inner_steps": self.inner_steps}

    def _apply_grads(self, grads: Dict[str, Tensor]) -> float:
        params = list(self.theta.values())
        for k, p in self.theta.items():
            p.grad = grads[k].to(p.dtype)
        max_norm = self.cfg.clip_grad if self.cfg.clip_grad > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        before = [p.detach().clone() for p in params]
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if not all(torch.isfinite(p).all() for p in params):  # never write a NaN theta
            with torch.no_grad():
                for p, b in zip(params, before):
                    p.copy_(b)
            self.nonfinite += 1
        return norm

    def theta_detached(self) -> Params:
        return {k: v.detach().clone() for k, v in self.theta.items()}

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints" / "last"

    def save_checkpoint(self) -> Path:
        def write(d: Path):
            save_rule(d, self.rule, self.theta_detached(), self.spec)
            tensors, meta = self._trainer_state()
            save_tensors(tensors, d / "trainer.safetensors")
            write_json(meta, d / "trainer.json")
            if self.resolved_config:
                import yaml
                (d / "config.yaml").write_text(yaml.safe_dump(self.resolved_config, sort_keys=False))
        atomic_dir_write(self.ckpt_dir, write)
        return self.ckpt_dir

    def _trainer_state(self):
        tensors = {"rng.main": self.gen.get_state()}
        optimizer = tree_to_json(self.opt.state_dict(), tensors, "opt")
        slots_meta = []
        for i, s in enumerate(self.slots):
            tensors[f"slot{i}.rng"] = s.gen.get_state()
            for group, d in (("params", s.params), ("state", s.state), ("extra", s.extra)):
                for k, v in d.items():
                    tensors[f"slot{i}.{group}.{k}"] = v
            slots_meta.append({"seed": s.seed, "step": s.step, "horizon": s.horizon})
        meta = {"outer_step": self.outer_step, "inner_steps": self.inner_steps,
                "nonfinite": self.nonfinite, "elapsed": self.elapsed, "slots": slots_meta,
                "optimizer": optimizer, "theta_keys": list(self.theta),
                "scheme": {"name": self.scheme.name, **self.scheme.config()},
                "train": asdict(self.cfg)}
        return tensors, meta

    def load_checkpoint(self, path=None) -> None:
        d = Path(path) if path is not None else self.ckpt_dir
        if not (d / "trainer.json").exists():
            raise CheckpointError(f"resume: no checkpoint at {d}")
        meta = read_json(d / "trainer.json")
        if "optimizer" not in meta:
            raise CheckpointError(f"{d}: trainer checkpoint of an older format (no 'optimizer' "
                                  "entry) cannot be resumed; its rule still loads with load_rule")
        tensors = load_tensors(d / "trainer.safetensors")
        theta = load_tensors(d / "theta.safetensors")
        check_theta(theta, self.theta, where=str(d))
        if len(meta["slots"]) != len(self.slots):
            raise CheckpointError(f"{d}: checkpoint has {len(meta['slots'])} slots but "
                                  f"meta.meta_batch={len(self.slots)}")
        with torch.no_grad():
            for k, v in self.theta.items():
                v.copy_(theta[k])
        self.opt.load_state_dict(tree_from_json(meta["optimizer"], tensors))
        self.gen.set_state(tensors["rng.main"])
        self.outer_step, self.inner_steps = meta["outer_step"], meta["inner_steps"]
        self.nonfinite, self.elapsed = meta["nonfinite"], meta.get("elapsed", 0.0)
        slots = []
        for i, sm in enumerate(meta["slots"]):
            task = self.family.sample_seeded(sm["seed"])
            gen = torch.Generator()
            gen.set_state(tensors[f"slot{i}.rng"])
            pick = lambda g: {k.split(".", 2)[2]: v for k, v in tensors.items()
                              if k.startswith(f"slot{i}.{g}.")}
            params = pick("params")
            expected = task.param_shapes()
            for k, shp in expected.items():
                if k not in params or tuple(params[k].shape) != tuple(shp):
                    raise CheckpointError(f"{d}: slot {i} param {k!r} does not match task "
                                          f"{task!r} (was the task config changed?)")
            # the flat rule state is laid out in the task's parameter order: restore that order
            params = {k: params[k] for k in expected}
            slots.append(Slot(task=task, seed=sm["seed"], params=params, state=pick("state"),
                              gen=gen, step=sm["step"], horizon=sm["horizon"], extra=pick("extra")))
        self.slots = slots


def tree_to_json(tree, tensors: Dict[str, Tensor], prefix: str):
    """A JSON-able copy of nested dicts/lists/tuples/scalars (an optimizer's ``state_dict()``)
    with every tensor moved into ``tensors`` under a path key. Exact: :func:`tree_from_json`
    rebuilds the same tree, int dict keys and tuples included, without pickle."""
    if isinstance(tree, Tensor):
        tensors[prefix] = tree
        return {"tensor": prefix}
    if isinstance(tree, dict):
        return {"dict": [[k, tree_to_json(v, tensors, f"{prefix}.{k}")] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        items = [tree_to_json(v, tensors, f"{prefix}.{i}") for i, v in enumerate(tree)]
        return {"tuple" if isinstance(tree, tuple) else "list": items}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return {"value": tree}
    raise TypeError(f"cannot store {type(tree).__name__} at {prefix!r} in a checkpoint")


def tree_from_json(node, tensors: Dict[str, Tensor]):
    (kind, v), = node.items()
    if kind == "tensor":
        return tensors[v]
    if kind == "dict":
        return {k: tree_from_json(x, tensors) for k, x in v}
    if kind in ("list", "tuple"):
        items = [tree_from_json(x, tensors) for x in v]
        return tuple(items) if kind == "tuple" else items
    return v


def _finite(o: UnrollOut) -> bool:
    return math.isfinite(float(o.meta_loss)) and all(bool(torch.isfinite(v).all())
                                                     for v in o.params.values())


def _mean(xs: List[float]) -> float:
    return sum(xs) / len(xs)


def _progress(total, initial, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="meta-train", dynamic_ncols=True)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV only
        return None
    return SummaryWriter(str(out_dir / "tb"))
