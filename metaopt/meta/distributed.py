"""Data-parallel meta-training on torch.distributed: N processes share one meta-batch.

Launch any meta-training with torchrun (one node or several, through torchrun's rendezvous)::

    torchrun --nproc_per_node=2 -m metaopt.cli.train meta.meta_batch=8 hydra.run.dir=runs/ddp

Each rank owns ``K/N`` of the K slots (a contiguous block of global slot indices) and runs the
scheme on them alone; per-rank meta-gradients (means over the rank's slots) are weighted by the
rank's share of slots and summed by one all-reduce (gloo; nccl on request, through the rank's
GPU -- this version meta-trains on CPU tensors), together with the
logged losses and each slot's "diverged" flag. Every rank then takes the same outer step, so theta
stays identical everywhere without being broadcast.

Why N ranks reach the theta of one process with K slots: every random number of meta-training
comes from either the trainer's main generator (task seeds and initial horizons; every rank draws
the seeds of *all* K slots, in global slot order, and builds only its own) or a slot's own
generator (batches, ES/PES noise), which is seeded by the slot's task seed and so does not depend
on which rank runs the slot. The only difference is float summation order in the all-reduce.

Rank 0 writes logs and checkpoints; every rank writes its own slots into the checkpoint directory
(``slots.rank<r>.safetensors``, keyed by global slot index), so a checkpoint holds the whole
meta-batch and resumes with any world size that divides K. Multi-node runs need the run directory
on a file system every node sees.
"""
from __future__ import annotations

import datetime
import os
from typing import List, Sequence

import torch
from torch import Tensor


class Distributed:
    """The process group as the trainer sees it. ``Distributed()`` is the single-process case:
    every collective is the identity, so the trainer has one code path."""

    def __init__(self, rank: int = 0, world_size: int = 1, backend: str = "none"):
        self.rank, self.world_size, self.backend = int(rank), int(world_size), backend

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_env(cls, backend: str = "auto", timeout_s: float = 1800.0) -> "Distributed":
        """The group torchrun describes in the environment (``RANK``/``WORLD_SIZE``/
        ``MASTER_ADDR``/``MASTER_PORT``), initialized if it is not yet; single process when
        ``WORLD_SIZE`` is unset or 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist
        if backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"Invalid distributed.backend: {backend!r} (use auto, gloo or nccl)")
        if not dist.is_initialized():
            if backend == "auto":  # meta-training tensors live on the CPU: gloo reduces them there
                backend = "gloo"
            if backend == "nccl":  # reduce on this rank's GPU (LOCAL_RANK), copy back
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch "
                                 "with torchrun (it sets them)")
            dist.init_process_group(backend=backend,
                                    timeout=datetime.timedelta(seconds=float(timeout_s)))
        return cls(dist.get_rank(), dist.get_world_size(), dist.get_backend())

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- slot ownership ---------------------------------------------------------------------------
    def owned(self, meta_batch: int) -> range:
        """Global indices of this rank's slots (a contiguous block)."""
        if meta_batch % self.world_size:
            raise ValueError(f"Invalid meta.meta_batch: {meta_batch} slots cannot be split evenly "
                             f"over {self.world_size} processes (use a multiple of "
                             f"{self.world_size})")
        n = meta_batch // self.world_size
        return range(self.rank * n, (self.rank + 1) * n)

    # -- collectives -------------------------------------------------------------------------------
    def sum_(self, tensors: Sequence[Tensor]) -> List[Tensor]:
        """Element-wise sums over ranks of same-shaped tensors (one flat all-reduce)."""
        if not self.enabled or not tensors:
            return list(tensors)
        import torch.distributed as dist
        dtype = torch.float32
        for t in tensors:
            dtype = torch.promote_types(dtype, t.dtype)
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
        if self.backend == "nccl":
            flat = flat.cuda()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.cpu()
        out, off = [], 0
        for t in tensors:
            out.append(flat[off:off + t.numel()].reshape(t.shape).to(t.dtype))
            off += t.numel()
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any (keeps decisions in lockstep)."""
        if not self.enabled:
            return bool(flag)
        return bool(self.sum_([torch.tensor([float(flag)])])[0] > 0)

    def broadcast_str(self, s: str) -> str:
        """Rank 0's string on every rank."""
        if not self.enabled:
            return s
        import torch.distributed as dist
        data = torch.tensor(list(s.encode("utf-8")) if self.is_main else [], dtype=torch.uint8)
        n = torch.tensor([data.numel()], dtype=torch.int64)
        dist.broadcast(n, src=0)
        if not self.is_main:
            data = torch.zeros(int(n), dtype=torch.uint8)
        dist.broadcast(data, src=0)
        return bytes(data.tolist()).decode("utf-8")

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()

    def shutdown(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
