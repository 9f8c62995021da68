"""The meta-training loop, top to bottom.

theta <- outer optimizer step on the scheme's meta-gradient, once per outer step; K persistent
slots each carry one inner run across truncations. What makes it robust:

* non-finite inner loss / meta-loss / meta-gradient: the update is skipped (theta untouched),
  the offending slots are reset with fresh tasks, and the event is counted (``nonfinite``);
* checkpoints every ``checkpoint_every`` outer steps hold theta, the outer optimizer (its own
  ``state_dict()``: tensors in safetensors, the rest in JSON, no pickle), every RNG state and
  every slot (params, rule state, counters, batch generator), so ``resume=True``
  continues exactly where the last checkpoint was taken and reaches the same theta as a run
  that was never interrupted;
* data-parallel over processes (metaopt.meta.distributed): each rank runs its share of the K
  slots, the meta-gradient is all-reduced, and N ranks reach the theta of one process.
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

from metaopt.meta.checkpoint import commit_dir, staging_dir, staging_path
from metaopt.rules.io import (CheckpointError, check_theta, load_tensors, read_json, save_rule,
                              save_tensors, write_json)
from metaopt.meta.distributed import Distributed
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
    """Meta-train ``rule`` on tasks drawn from ``family`` with ``scheme``, as configured by ``cfg``.

    ``run()`` performs ``cfg.outer_steps`` outer steps (theta <- Adam step on the scheme's
    meta-gradient over ``cfg.meta_batch`` persistent slots), writes ``metrics.csv`` and
    TensorBoard curves to ``out_dir`` and checkpoints to ``out_dir/checkpoints/last``, and
    returns the final meta-loss; ``load_checkpoint()`` resumes exactly. ``theta`` holds the
    meta-parameters (``theta_detached()`` for a copy). See the module docstring.
    """

    def __init__(self, rule: Rule, family: TaskFamily, scheme: Scheme, cfg: TrainConfig,
                 out_dir, resolved_config: Optional[dict] = None,
                 dist: Optional[Distributed] = None):
        cfg.validate()
        self.rule, self.family, self.scheme, self.cfg = rule, family, scheme, cfg
        self.dist = dist or Distributed()
        self.owned = self.dist.owned(cfg.meta_batch)  # global indices of this process's slots
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
        # every rank tracks (seed, step, horizon) of all K slots and draws their seeds in global
        # order (so the main generator's stream does not depend on the world size); it builds and
        # runs only its own slots, ``self.slots`` (all K in a single process)
        self.slot_info: List[Dict[str, int]] = [{} for _ in range(cfg.meta_batch)]
        self.slots: List[Slot] = [None] * len(self.owned)
        for i in range(cfg.meta_batch):
            self._reset_slot(i, first=True)

    # -- slots ---------------------------------------------------------------------------------
    def _draw_seed(self) -> int:
        return int(torch.randint(0, 2 ** 31 - 1, (1,), generator=self.gen))

    def _reset_slot(self, i: int, first: bool = False) -> None:
        """Global slot ``i`` gets a fresh task (seed and horizon drawn on every rank)."""
        seed = self._draw_seed()
        W = self.scheme.window
        horizon = self.cfg.horizon
        if first:
            # Random initial offsets: first runs end at random multiples of the window, so after the
            # first resets the meta-batch holds early and late phases of training at once.
            n = max(1, horizon // W)
            horizon = W * (1 + int(torch.randint(0, n, (1,), generator=self.gen)))
        self.slot_info[i] = {"seed": seed, "step": 0, "horizon": horizon}
        if i in self.owned:
            self.slots[i - self.owned.start] = self._build_slot(seed, horizon)

    def _build_slot(self, seed: int, horizon: int) -> Slot:
        slot = new_slot(self.family, self.rule, seed, horizon, self.dtype)
        if self.rule.spec_dependent and FlatSpec.of(slot.params) != self.spec:
            raise ValueError(f"rule {self.rule.name!r} learns one value per layer/parameter, so all "
                             f"tasks must share one parameter spec; task {slot.task!r} differs "
                             f"(fix the task family's architecture, e.g. task.widths=[64])")
        return slot

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> float:
        cfg = self.cfg
        main = self.dist.is_main  # rank 0 logs; every rank computes
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log = _Log(self.out_dir, self.outer_step, cfg.outer_steps, cfg.progress) if main else None
        last_meta = float("nan")
        try:
            while self.outer_step < cfg.outer_steps:
                t0 = time.perf_counter()
                row = self.train_step()
                self.elapsed += time.perf_counter() - t0
                if math.isfinite(row["meta_loss"]):
                    last_meta = row["meta_loss"]
                row["wall_time"] = round(self.elapsed, 4)
                if log is not None:
                    log.write(row, self.outer_step % cfg.log_every == 0
                              or self.outer_step == cfg.outer_steps, self.nonfinite)
                # one decision for all ranks (their clocks differ)
                out_of_time = cfg.max_seconds > 0 and self.dist.any(cfg.max_seconds <= self.elapsed)
                if (self.outer_step % cfg.checkpoint_every == 0 or self.outer_step == cfg.outer_steps
                        or out_of_time):
                    self.save_checkpoint()
                if out_of_time:
                    break
        finally:
            if log is not None:
                log.close()
        return last_meta

    def train_step(self) -> Dict[str, float]:
        """One outer step: scheme meta-gradient, finite check, clipped outer update, slot resets.

        With several processes, the per-rank meta-gradient (a mean over the rank's slots) is
        weighted by the rank's share of slots and summed over ranks, together with the logged
        losses and the per-slot divergence flags, in one all-reduce: every rank then takes the
        same decisions and the same outer step."""
        out = self.scheme.meta_gradient(self.rule, self.theta, self.slots, self.meta_loss)
        K = self.cfg.meta_batch
        self.outer_step += 1
        self.inner_steps += out.inner_steps * K
        flags = torch.zeros(K, dtype=torch.float64)
        for j, o in enumerate(out.outs):
            flags[self.owned.start + j] = float(not _finite(o))
        keys = list(out.grads)
        share = len(self.slots) / K
        sums = torch.tensor([sum(out.meta_losses), sum(out.train_losses)], dtype=torch.float64)
        reduced = self.dist.sum_([out.grads[k] * share for k in keys] + [sums, flags])
        grads = dict(zip(keys, reduced[:len(keys)]))
        sums, flags = reduced[len(keys)], reduced[len(keys) + 1]
        bad_slots = [i for i in range(K) if flags[i] > 0]
        grads_ok = all(torch.isfinite(g).all() for g in grads.values())
        grad_norm = float("nan")
        if bad_slots or not grads_ok:
            # Skip the update; theta and the healthy slots are untouched. Reset what diverged
            # (everything if only the meta-gradient overflowed: it cannot be attributed to a slot).
            self.nonfinite += 1
            for i in (bad_slots or range(K)):
                self._reset_slot(i)
        else:
            grad_norm = self._apply_grads(grads)
            self.slots = list(out.slots)
            for i, info in enumerate(self.slot_info):
                info["step"] += out.inner_steps
                if info["step"] >= info["horizon"]:
                    self._reset_slot(i)
        return {"outer_step": self.outer_step, "meta_loss": float(sums[0]) / K,
                "train_loss": float(sums[1]) / K, "grad_norm": grad_norm,
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
        """Write ``checkpoints/last`` atomically. Rank 0 writes the rule, the optimizer, the RNG
        and its own slots (``trainer.safetensors``); every other rank writes its slots to
        ``slots.rank<r>.safetensors`` in the same staging directory before rank 0 swaps it in
        (one process: rank 0 alone, the barriers are no-ops)."""
        dist, final = self.dist, self.ckpt_dir
        tmp = staging_dir(final) if dist.is_main else staging_path(final)
        dist.barrier()
        if not dist.is_main:
            save_tensors(self._slot_tensors(), tmp / f"slots.rank{dist.rank}.safetensors")
        dist.barrier()
        if dist.is_main:
            save_rule(tmp, self.rule, self.theta_detached(), self.spec)
            tensors, meta = self._trainer_state()
            tensors.update(self._slot_tensors())
            save_tensors(tensors, tmp / "trainer.safetensors")
            write_json(meta, tmp / "trainer.json")
            if self.resolved_config:
                import yaml
                (tmp / "config.yaml").write_text(yaml.safe_dump(self.resolved_config,
                                                                sort_keys=False))
            commit_dir(final, tmp)
        dist.barrier()
        return final

    def _slot_tensors(self) -> Dict[str, Tensor]:
        """This process's slots, keyed by global slot index."""
        tensors = {}
        for j, s in enumerate(self.slots):
            i = self.owned.start + j
            tensors[f"slot{i}.rng"] = s.gen.get_state()
            for group, d in (("params", s.params), ("state", s.state), ("extra", s.extra)):
                for k, v in d.items():
                    tensors[f"slot{i}.{group}.{k}"] = v
        return tensors

    def _trainer_state(self):
        tensors = {"rng.main": self.gen.get_state()}
        optimizer = tree_to_json(self.opt.state_dict(), tensors, "opt")
        meta = {"outer_step": self.outer_step, "inner_steps": self.inner_steps,
                "nonfinite": self.nonfinite, "elapsed": self.elapsed,
                "slots": [dict(info) for info in self.slot_info],
                "world_size": self.dist.world_size,
                "optimizer": optimizer, "theta_keys": list(self.theta),
                "scheme": {"name": self.scheme.name, **self.scheme.config()},
                "train": asdict(self.cfg)}
        return tensors, meta

    def load_checkpoint(self, path=None) -> None:
        """Resume from a checkpoint (written by any number of processes that divides K)."""
        d = Path(path) if path is not None else self.ckpt_dir
        if not (d / "trainer.json").exists():
            raise CheckpointError(f"resume: no checkpoint at {d}")
        meta = read_json(d / "trainer.json")
        if "optimizer" not in meta:
            raise CheckpointError(f"{d}: trainer checkpoint of an older format (no 'optimizer' "
                                  "entry) cannot be resumed; its rule still loads with load_rule")
        tensors = load_tensors(d / "trainer.safetensors")
        for r in range(1, int(meta.get("world_size", 1))):
            shard = d / f"slots.rank{r}.safetensors"
            if not shard.exists():
                raise CheckpointError(f"{d}: {shard.name} is missing (checkpoint written by "
                                      f"{meta['world_size']} processes)")
            tensors.update(load_tensors(shard))
        theta = load_tensors(d / "theta.safetensors")
        check_theta(theta, self.theta, where=str(d))
        if len(meta["slots"]) != self.cfg.meta_batch:
            raise CheckpointError(f"{d}: checkpoint has {len(meta['slots'])} slots but "
                                  f"meta.meta_batch={self.cfg.meta_batch}")
        with torch.no_grad():
            for k, v in self.theta.items():
                v.copy_(theta[k])
        self.opt.load_state_dict(tree_from_json(meta["optimizer"], tensors))
        self.gen.set_state(tensors["rng.main"])
        self.outer_step, self.inner_steps = meta["outer_step"], meta["inner_steps"]
        self.nonfinite, self.elapsed = meta["nonfinite"], meta.get("elapsed", 0.0)
        self.slot_info = [{"seed": sm["seed"], "step": sm["step"], "horizon": sm["horizon"]}
                          for sm in meta["slots"]]
        slots = []
        for i in self.owned:
            sm = self.slot_info[i]
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


class _Log:
    """metrics.csv (a resumed run drops rows logged after its checkpoint), TensorBoard when
    installed, and the progress bar: what rank 0 writes."""
    FIELDS = ["outer_step", "meta_loss", "train_loss", "grad_norm", "nonfinite", "inner_steps",
              "wall_time"]

    def __init__(self, out_dir: Path, outer_step: int, total: int, progress: bool):
        path = out_dir / "metrics.csv"
        new = not path.exists() or outer_step == 0
        if not new:
            with open(path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["outer_step"]) <= outer_step]
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.FIELDS)
                w.writeheader()
                w.writerows(kept)
        self.f = open(path, "w" if new else "a", newline="")
        self.writer = csv.DictWriter(self.f, fieldnames=self.FIELDS)
        if new:
            self.writer.writeheader()
        self.tb = _tensorboard(out_dir)
        self.bar = _progress(total, outer_step, progress)

    def write(self, row: Dict[str, float], to_file: bool, nonfinite: int) -> None:
        if to_file:
            self.writer.writerow(row)
            self.f.flush()
            if self.tb is not None:
                for k in ("meta_loss", "train_loss", "grad_norm"):
                    self.tb.add_scalar(k, row[k], row["outer_step"])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(meta_loss=f"{row['meta_loss']:.4f}", nonfinite=nonfinite)

    def close(self) -> None:
        self.f.close()
        for x in (self.bar, self.tb):
            if x is not None:
                x.close()


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
