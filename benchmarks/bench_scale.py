"""The learned optimizer at real model sizes: optimizer.step() time and optimizer-state memory.

    python benchmarks/bench_scale.py                       # CPU: gpt-10m, vit-22m, gpt-100m, 1 thread
    python benchmarks/bench_scale.py --sizes gpt-10m,vit-22m,gpt-100m --steps 7 --threads 2
    python benchmarks/bench_scale.py --device cuda         # + the host-sync check (needs a GPU)
    python benchmarks/bench_scale.py --device all          # cpu, then cuda when a GPU is present

Models are GPT-style decoder-only transformers (nanoGPT layout: token + position embeddings,
pre-LayerNorm blocks with fused qkv, 4x MLP, biases, a tied LM head) and a ViT-style encoder
(patch embedding, class token, the same blocks, a classification head). Only the optimizer is
timed, so no forward/backward runs: every parameter gets a random gradient once (the cost of a
step does not depend on the gradient's values) and ``step()`` is called ``--warmup`` times, then
timed ``--steps`` times, the contenders round-robin (one step of each per repeat) so that load
from other processes hits them alike. Reported: the median step, its ratio to
``AdamW(foreach=True)``, the ratio of the fastest steps (less sensitive to a loaded machine), and the optimizer-state bytes -- every tensor reachable from
``optimizer.state`` (deduplicated by storage: ``LearnedOptimizer``'s per-parameter views of its
flat state count once) plus, for the learned optimizer, its meta-parameters theta.

Contenders, all at their defaults:

* ``adamw-foreach``: ``torch.optim.AdamW(foreach=True)`` (lr 1e-3, weight_decay 0.01), the reference;
* ``adamw-fused``: ``torch.optim.AdamW(fused=True)``;
* ``muon+adamw``: ``torch.optim.Muon`` on the 2-D hidden matrices (not the embeddings or the
  head) + ``AdamW(foreach=True)`` on the rest, one step = both ``step()`` calls;
* ``learned``: ``LearnedOptimizer.from_pretrained(params, "default")`` (weight_decay 0, its default);
* ``learned-wd``: the same with ``weight_decay=0.01`` (AdamW's default decay, one more pass).

On CUDA the script also runs one learned step (and one of each baseline) under
``torch.cuda.set_sync_debug_mode("error")`` and prints whether it synchronized with the host (the
first line of the error when it did); it reports, never crashes. ``--device cuda`` without a GPU
prints a skip line. CUDA timings use ``torch.cuda.synchronize()`` around each step and also report
the step's peak extra memory (``max_memory_allocated`` during the step minus before it).
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, set_threads  # noqa: E402

from metaopt.optim import LearnedOptimizer  # noqa: E402


# -- models ---------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


class GPT(nn.Module):
    """Decoder-only transformer, nanoGPT's parameter layout (weights only: the step is timed)."""

    def __init__(self, vocab: int, d: int, layers: int, ctx: int = 1024):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight   # tied, as in GPT-2


class ViT(nn.Module):
    """ViT-style encoder: patch embedding (a conv), class token, position embedding, blocks, head."""

    def __init__(self, d: int, layers: int, patch: int = 16, image: int = 224, classes: int = 1000):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, d))
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)


SIZES: Dict[str, Callable[[], nn.Module]] = {
    "gpt-10m": lambda: GPT(vocab=256, d=384, layers=6, ctx=256),     # byte-level
    "gpt-100m": lambda: GPT(vocab=16384, d=768, layers=12, ctx=1024),
    "vit-22m": lambda: ViT(d=384, layers=12),     # ViT-S/16
    "vit-86m": lambda: ViT(d=768, layers=12),     # ViT-B/16
}


def muon_split(model: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(2-D hidden matrices for Muon, everything else for AdamW): embeddings, the head, the patch
    conv, biases and norm gains go to AdamW, as Muon's authors recommend."""
    hidden_ids = {id(p) for b in model.blocks for n, p in b.named_parameters() if p.dim() == 2}
    params = list(model.parameters())
    return ([p for p in params if id(p) in hidden_ids], [p for p in params if id(p) not in hidden_ids])


# -- optimizers -----------------------------------------------------------------------------------
class Pair:
    """Two optimizers stepped together (Muon + AdamW), seen as one."""

    def __init__(self, *opts):
        self.opts = opts

    def step(self):
        for o in self.opts:
            o.step()

    @property
    def state(self):
        out = {}
        for o in self.opts:
            out.update(o.state)
        return out


def contenders(model: nn.Module, device: torch.device, only: List[str]) -> Dict[str, object]:
    params = list(model.parameters())
    make = {
        "adamw-foreach": lambda: torch.optim.AdamW(params, foreach=True),
        "adamw-fused": lambda: torch.optim.AdamW(params, fused=True),
        "muon+adamw": lambda: Pair(torch.optim.Muon(muon_split(model)[0]),
                                   torch.optim.AdamW(muon_split(model)[1], foreach=True)),
        "learned": lambda: LearnedOptimizer.from_pretrained(model.named_parameters(), "default"),
        "learned-wd": lambda: LearnedOptimizer.from_pretrained(model.named_parameters(), "default",
                                                               weight_decay=0.01),
    }
    return {k: make[k]() for k in only}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def state_bytes(opt) -> int:
    """Bytes of every tensor storage reachable from ``opt.state`` (+ theta), each storage once."""
    seen, total = set(), 0
    roots = [opt.state]
    if isinstance(opt, LearnedOptimizer):
        roots += [opt.rule_state, opt.theta]
    for root in roots:
        for t in _tensors(dict(root) if not isinstance(root, dict) else root):
            s = t.untyped_storage()
            key = (s.data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += s.nbytes()
    return total


# -- the CUDA host-sync check ---------------------------------------------------------------------
def sync_check(opt) -> str:
    """One step under set_sync_debug_mode("error"): 'none', or the first line of the error."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        verdict = "none"
    except RuntimeError as e:
        verdict = "SYNC: " + str(e).strip().splitlines()[0][:90]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return verdict


# -- one size on one device ---------------------------------------------------------------------------
def run(size: str, device: torch.device, names: List[str], warmup: int, steps: int,
        dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    with torch.device(device):
        model = SIZES[size]().to(dtype)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    g = torch.Generator(device=device).manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=device, dtype=dtype) * 1e-3
    cuda = device.type == "cuda"
    opts = contenders(model, device, names)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        for o in opts.values():
            o.step()
    sync()
    times: Dict[str, List[float]] = {k: [] for k in opts}
    peaks: Dict[str, float] = {}
    for _ in range(steps):
        for k, o in opts.items():
            sync()
            t0 = time.perf_counter()
            o.step()
            sync()
            times[k].append(time.perf_counter() - t0)
    if cuda:
        for k, o in opts.items():
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            o.step()
            torch.cuda.synchronize()
            peaks[k] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    syncs = {k: sync_check(o) for k, o in opts.items()} if cuda else {}

    ref = "adamw-foreach" if "adamw-foreach" in opts else next(iter(opts))
    t_ref, b_ref = median(times[ref]), state_bytes(opts[ref])
    m_ref = min(times[ref])
    print(f"\n-- {size}: {n / 1e6:.1f}M parameters in {len(params)} tensors, {device.type}, "
          f"{str(dtype).replace('torch.', '')} --")
    cols = f"{'optimizer':<15}{'step (median)':>15}{'min..max ms':>18}{'x ' + ref:>18}" \
           f"{'x ref (min)':>12}{'state MiB':>11}{'state x ref':>12}"
    if cuda:
        cols += f"{'step peak MiB':>15}  host sync in step()"
    print(cols)
    for k in opts:
        t, b = median(times[k]), state_bytes(opts[k])
        row = (f"{k:<15}{t * 1e3:12.2f} ms{min(times[k]) * 1e3:9.1f}..{max(times[k]) * 1e3:<8.1f}"
               f"{t / t_ref:18.3f}{min(times[k]) / m_ref:12.3f}{b / 2 ** 20:11.1f}{b / b_ref:12.4f}")
        if cuda:
            row += f"{peaks[k]:15.1f}  {syncs[k]}"
        print(row)
    del opts, model, params
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="gpt-10m,vit-22m,gpt-100m",
                    help=f"comma-separated, from {', '.join(SIZES)}")
    ap.add_argument("--optimizers", default="adamw-foreach,adamw-fused,muon+adamw,learned,learned-wd")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7, help="timed steps per optimizer (median)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "all"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="parameter dtype (bfloat16: the learned step falls back to its reference path)")
    a = ap.parse_args(argv)
    sizes = [s for s in a.sizes.split(",") if s]
    for s in sizes:
        if s not in SIZES:
            raise SystemExit(f"Invalid size: {s!r} (choose from {', '.join(SIZES)})")
    names = [s for s in a.optimizers.split(",") if s]
    threads = set_threads(a.threads)
    import os
    load = os.getloadavg()
    print(f"== bench_scale: optimizer.step() at real model sizes ==\n"
          f"torch {torch.__version__} | torch threads: {threads} | cpu cores: {os.cpu_count()} | "
          f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n"
          f"warm-up {a.warmup} steps, then the median of {a.steps} timed steps per optimizer "
          f"(round-robin); random gradients set once")
    devices = ["cpu", "cuda"] if a.device == "all" else [a.device]
    for dev in devices:
        if dev == "cuda" and not torch.cuda.is_available():
            print("\n-- cuda: skipped (torch.cuda.is_available() is False) --")
            continue
        if dev == "cuda":
            print(f"\ncuda device: {torch.cuda.get_device_name()}")
        for s in sizes:
            run(s, torch.device(dev), names, a.warmup, a.steps, getattr(torch, a.dtype))


if __name__ == "__main__":
    main()
