"""LearnedOptimizer at scale: data-parallel training, distributed checkpoints, mixed precision,
no host syncs (see docs/at-scale.md and benchmarks/bench_scale.py).

Tests marked ``xfail(strict=True)`` state what the issue asks for and the code does not do yet;
their reasons name the cause. When the fix lands they XPASS, which fails the run: remove the mark.
"""
from __future__ import annotations

import copy
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from metaopt.optim import LearnedOptimizer

STEPS = 4


def _model(dtype=torch.float64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.LayerNorm(16),
                         nn.Linear(16, 3)).to(dtype)


def _batches(dtype=torch.float64, n=STEPS, batch=8):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(batch, 6, generator=g, dtype=dtype),
             torch.randn(batch, 3, generator=g, dtype=dtype)) for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- (a) DistributedDataParallel, gloo, 2 processes == 1 process on the global batch ------------
def _ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = LearnedOptimizer.from_pretrained(ddp.named_parameters(), "default")
        # each rank takes its contiguous share of the global batch; DDP averages the gradients,
        # which is the gradient of the mean loss over the global batch
        local = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in _batches()]
        _train(ddp, opt, local)
        if rank == 0:
            from safetensors.torch import save_file
            save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, out)
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    from safetensors.torch import load_file
    out = str(tmp_path / "ddp.safetensors")
    mp.start_processes(_ddp_rank, args=(2, _free_port(), out), nprocs=2, join=True,
                       start_method="spawn")
    ddp = load_file(out)
    model = _model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, LearnedOptimizer.from_pretrained(model.named_parameters(), "default"), _batches())
    for n, p in model.named_parameters():
        # float64; the two halves' gradients are summed in another order than one full batch's
        torch.testing.assert_close(ddp[n], p.detach(), rtol=1e-10, atol=1e-12, msg=n)
        assert not torch.equal(p.detach(), start[n]), n   # it trained


# -- (b) torch.distributed.checkpoint round trips ---------------------------------------------------
def _trained(theta_shift=0.0):
    """A model and optimizer after STEPS steps; ``theta_shift`` perturbs theta so that a kept
    theta is told apart from the shipped one a fresh optimizer is built with."""
    model = _model()
    opt = LearnedOptimizer.from_pretrained(model.named_parameters(), "default")
    if theta_shift:
        opt.theta = {k: v + theta_shift for k, v in opt.theta.items()}
    _train(model, opt, _batches())
    return model, opt


def _continue_equal(model, opt, model2, opt2):
    more = _batches(n=3)[::-1]
    _train(model, opt, more)
    _train(model2, opt2, more)
    for (n, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), n


def _dcp():
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    warnings.filterwarnings("ignore", message=".*assuming the intent is to")  # no process group
    return dcp


def _dcp_state_dict_api_round_trip(tmp_path, **trained):
    """A trained optimizer saved with get_optimizer_state_dict + dcp.save and loaded into a
    fresh one (shipped theta) with dcp.load + set_optimizer_state_dict: (model, opt, model2, opt2)."""
    dcp = _dcp()
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    model, opt = _trained(**trained)
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
    model2 = copy.deepcopy(model)
    opt2 = LearnedOptimizer.from_pretrained(model2.named_parameters(), "default")
    sd = {"optim": get_optimizer_state_dict(model2, opt2)}   # initializes opt2's state
    dcp.load(sd, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(model2, opt2, sd["optim"])
    return model, opt, model2, opt2


def test_dcp_distributed_state_dict_api_round_trips_the_state(tmp_path):
    """The documented DCP recipe (get/set_optimizer_state_dict + dcp.save/load), single process,
    with the shipped theta on both sides: state and step survive, training continues identically."""
    model, opt, model2, opt2 = _dcp_state_dict_api_round_trip(tmp_path)
    for k, v in opt.rule_state.items():
        assert torch.equal(opt2.rule_state[k], v), k
    _continue_equal(model, opt, model2, opt2)


def test_dcp_distributed_state_dict_api_keeps_theta(tmp_path):
    """get_optimizer_state_dict keeps only 'state' and 'param_groups': theta travels as
    ``theta.<key>`` under every parameter's entry, and load_state_dict takes it from there."""
    model, opt, model2, opt2 = _dcp_state_dict_api_round_trip(tmp_path, theta_shift=0.01)
    for k, v in opt.theta.items():
        assert torch.equal(opt2.theta[k], v), k
    _continue_equal(model, opt, model2, opt2)


def test_dcp_full_state_dict_keeps_theta_given_a_complete_template(tmp_path):
    """``dcp.save(opt.state_dict())`` stores theta (a top-level key); ``dcp.load`` fills the
    template it is given, so the template must already hold every state entry: here the fresh
    optimizer's state is created by one zero-lr step on zero gradients (what
    get_optimizer_state_dict does internally)."""
    dcp = _dcp()
    model, opt = _trained(theta_shift=0.01)
    dcp.save(opt.state_dict(), checkpoint_id=str(tmp_path))
    model2 = copy.deepcopy(model)
    opt2 = LearnedOptimizer.from_pretrained(model2.named_parameters(), "default")
    for g in opt2.param_groups:
        g["lr"] = 0.0
    for p in model2.parameters():
        p.grad = torch.zeros_like(p)
    opt2.step()
    for g in opt2.param_groups:
        g["lr"] = 1.0
    opt2.zero_grad()
    sd = opt2.state_dict()
    dcp.load(sd, checkpoint_id=str(tmp_path))
    opt2.load_state_dict(sd)
    for k, v in opt.theta.items():
        assert torch.equal(opt2.theta[k], v), k
    for k, v in opt.rule_state.items():
        assert torch.equal(opt2.rule_state[k], v), k
    _continue_equal(model, opt, model2, opt2)


def test_dcp_full_state_dict_loads_into_a_fresh_optimizer(tmp_path):
    """A fresh optimizer's state_dict() is a complete template (its rule state is created
    there), so dcp.load fills step/m/v/rms0 and theta."""
    dcp = _dcp()
    model, opt = _trained(theta_shift=0.01)
    dcp.save(opt.state_dict(), checkpoint_id=str(tmp_path))
    model2 = copy.deepcopy(model)
    opt2 = LearnedOptimizer.from_pretrained(model2.named_parameters(), "default")
    sd = opt2.state_dict()
    dcp.load(sd, checkpoint_id=str(tmp_path))
    opt2.load_state_dict(sd)
    assert opt2.rule_state is not None
    for k, v in opt.rule_state.items():
        assert torch.equal(opt2.rule_state[k], v), k
    _continue_equal(model, opt, model2, opt2)


def test_state_dict_keeps_theta_per_parameter_and_is_complete_when_fresh():
    """The plain format: theta at the top level and as ``theta.<key>`` under every entry (either
    suffices to load it); a fresh optimizer's state_dict already holds the full state."""
    from metaopt.rules.io import CheckpointError
    model, opt = _trained(theta_shift=0.01)
    sd = copy.deepcopy(opt.state_dict())
    for i, entry in sd["state"].items():
        for k, v in opt.theta.items():
            assert torch.equal(entry["theta." + k], v), (i, k)
    del sd["theta"]
    model2 = copy.deepcopy(model)
    opt2 = LearnedOptimizer.from_pretrained(model2.named_parameters(), "default")
    fresh = opt2.state_dict()
    n = sum(1 for _ in model2.parameters())
    assert sorted(fresh["state"]) == list(range(n))
    assert {"step", "m", "v", "rms0"} <= set(fresh["state"][0])
    assert int(fresh["state"][0]["step"]) == 0
    opt2.load_state_dict(sd)
    for k, v in opt.theta.items():
        assert torch.equal(opt2.theta[k], v), k
    _continue_equal(model, opt, model2, opt2)
    bad = copy.deepcopy(sd)
    bad["state"][0]["theta.w0"] = bad["state"][0]["theta.w0"][:1]
    for e in list(bad["state"].values())[1:]:
        del e["theta.w0"]
    with pytest.raises(CheckpointError, match="w0"):
        opt2.load_state_dict(bad)


# -- (c) mixed precision: bf16 parameters ------------------------------------------------------------
def _bf16_run(steps=30):
    model = _model(torch.bfloat16)
    opt = LearnedOptimizer.from_pretrained(model.named_parameters(), "default")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 6, generator=g).to(torch.bfloat16)
    y = torch.randn(64, 3, generator=g).to(torch.bfloat16)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


def test_bf16_params_train():
    model, opt, losses = _bf16_run()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.9 * losses[0], losses


def test_bf16_params_keep_float32_state():
    """In bf16, v <- 0.999 v would round back to v and the step counter stop at 256: the state
    of low-precision parameters is float32 (built from float32 copies of them)."""
    _, opt, _ = _bf16_run(steps=3)
    st = opt.rule_state
    for k in ("step", "m", "v", "rms0"):
        assert st[k].dtype == torch.float32, (k, st[k].dtype)


def test_fp16_params_stay_finite():
    """In float16, (1 - beta2) g^2 underflows for |g| < ~8e-3 and eps = 1e-8 rounds to 0, so a
    float16 m / (sqrt(v) + eps) would divide by zero at step 1; the update is computed in float32."""
    model = _model(torch.float16)
    opt = LearnedOptimizer.from_pretrained(model.named_parameters(), "default")
    x, y = _batches(torch.float16, n=1)[0]
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x).float(), y.float()).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_low_precision_step_is_the_float32_step_rounded(dtype, wd):
    """Each step of a bf16/fp16 model equals the float32 optimizer's step on the same values
    (parameters and gradients upcast), rounded to the parameters' dtype; the state is the same."""
    model = _model(dtype)
    ref = copy.deepcopy(model).float()
    opt = LearnedOptimizer.from_pretrained(model.named_parameters(), "default", weight_decay=wd)
    opt32 = LearnedOptimizer.from_pretrained(ref.named_parameters(), "default", weight_decay=wd)
    for x, y in _batches(dtype):
        opt.zero_grad()
        nn.functional.mse_loss(model(x).float(), y.float()).backward()
        with torch.no_grad():
            for p, q in zip(model.parameters(), ref.parameters()):
                q.copy_(p)
                q.grad = p.grad.float()
        opt.step()
        opt32.step()
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            assert p.dtype == dtype
            assert torch.equal(p, q.to(dtype)), n
    for k, v in opt32.rule_state.items():
        assert opt.rule_state[k].dtype == v.dtype and torch.equal(opt.rule_state[k], v), k


def test_low_precision_state_stays_float32_through_state_dict():
    """torch's load_state_dict casts state to the parameters' dtype (bf16 here); this one keeps
    the float32 state and theta as saved."""
    model, opt, _ = _bf16_run(steps=3)
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = LearnedOptimizer.from_pretrained(model2.named_parameters(), "default")
    opt2.load_state_dict(sd)
    for k, v in opt.rule_state.items():
        assert opt2.rule_state[k].dtype == torch.float32 and torch.equal(opt2.rule_state[k], v), k
    del sd["theta"]    # theta from the per-parameter entries, not rounded to bf16 either
    opt2.theta = {k: v + 1 for k, v in opt2.theta.items()}
    opt2.load_state_dict(sd)
    for k, v in opt.theta.items():
        assert opt2.theta[k].dtype == v.dtype and torch.equal(opt2.theta[k], v), k


# -- (d) no host syncs in step() ------------------------------------------------------------------
def _gpt_like(device):
    torch.manual_seed(0)
    with torch.device(device):
        model = nn.Sequential(nn.Embedding(64, 32), nn.LayerNorm(32), nn.Linear(32, 96),
                              nn.Linear(96, 32), nn.Linear(32, 64, bias=False))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3 if device != "meta" else torch.empty_like(p)
    return model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_makes_no_host_sync():
    model = _gpt_like("cuda")
    for wd in (0.0, 0.01):
        opt = LearnedOptimizer.from_pretrained(model.named_parameters(), "default", weight_decay=wd)
        opt.step()   # the first step creates the state (allowed to sync)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_step_reads_no_tensor_values_on_the_host_meta_device():
    """A CPU-only stand-in for the CUDA check: meta tensors have no values, so any .item(),
    .tolist(), float() or bool() of a tensor inside step() raises. (It does not see host-to-device
    copies such as torch.tensor(list, device=...), which set_sync_debug_mode also reports.)"""
    model = _gpt_like("meta")
    opt = LearnedOptimizer.from_pretrained(model.named_parameters(), "default")
    opt.step()


# -- (e) FSDP2 / DTensor parameters: refused with a one-line error -------------------------------
def test_dtensor_params_are_refused():
    """Sharded (DTensor) parameters, as FSDP2's fully_shard makes them, on a 1-rank gloo group."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        with pytest.raises(NotImplementedError, match=r"parameter 1 is a DTensor .*not supported"):
            LearnedOptimizer([nn.Parameter(torch.randn(3)), sharded])
        opt = LearnedOptimizer([nn.Parameter(torch.randn(3))])
        with pytest.raises(NotImplementedError, match="DTensor"):
            opt.add_param_group({"params": [sharded]})
        assert len(opt.param_groups) == 1 and opt.spec.num_tensors == 1   # left as it was
    finally:
        dist.destroy_process_group()
