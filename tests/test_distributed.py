"""Data-parallel meta-training (metaopt.meta.distributed) on real gloo process groups.

Each multi-process test spawns its ranks as separate Python processes (tests/dist_worker.py) with
the environment torchrun would set, so rank death is real: a SIGKILL, no clean-up.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaopt.meta.distributed import Distributed
from metaopt.rules.io import load_tensors
from tests.dist_worker import build

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world, out, steps, *extra, die=None):
    """Start ``world`` ranks; ``die`` = (rank, step) kills that rank at that outer step."""
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        args = [sys.executable, "-m", "tests.dist_worker", str(out), str(steps), *extra]
        if die and die[0] == r:
            args += ["--die-at", str(die[1])]
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def _wait(procs, timeout=120):
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return [p.returncode for p in procs], outs


def _theta(out):
    return load_tensors(Path(out) / "checkpoints" / "last" / "theta.safetensors")


def _single(tmp_path, steps, scheme="nested", name="single", family="tiny"):
    t = build(tmp_path / name, steps, scheme, family=family)
    t.run()
    return {k: v.detach() for k, v in t.theta.items()}


def _close(a, b, rtol=1e-12, atol=1e-14):
    """N ranks vs one process (or vs another N): the all-reduce sums the slots' gradients in
    another order, so theta agrees to float64 rounding (measured 7e-16 relative), not to the bit."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def _equal(a, b):
    """The same run, the same ranks, continued from a checkpoint: bit-identical."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())


def _killed(codes, outs, out):
    """Rank 1 died by SIGKILL during outer step 5; rank 0, blocked in the all-reduce, failed too;
    the last checkpoint on disk is that of outer step 4."""
    assert codes[1] == -signal.SIGKILL and codes[0] != 0, (codes, outs)
    meta = json.loads((Path(out) / "checkpoints" / "last" / "trainer.json").read_text())
    assert meta["outer_step"] == 4 and meta["world_size"] == 2, meta


@pytest.mark.parametrize("scheme", ["nested", "pes"])
def test_two_gloo_processes_reach_the_single_process_theta(tmp_path, scheme):
    ref = _single(tmp_path, 3, scheme)
    codes, outs = _wait(_launch(2, tmp_path / "ddp", 3, "--scheme", scheme))
    assert codes == [0, 0], outs
    theta = _theta(tmp_path / "ddp")
    _close(theta, ref)
    # and theta really moved: the comparison is not between two initial thetas
    init = build(tmp_path / "init", 3, scheme).theta
    assert any(not torch.allclose(theta[k], init[k].detach()) for k in theta)
    # rank 0 logged every step; rank 1 wrote only its slots, into the same checkpoint
    rows = (tmp_path / "ddp" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 4
    assert (tmp_path / "ddp" / "checkpoints" / "last" / "slots.rank1.safetensors").exists()


def test_killed_rank_then_resume_reaches_the_uninterrupted_theta(tmp_path):
    steps = 6
    codes, outs = _wait(_launch(2, tmp_path / "full", steps))
    assert codes == [0, 0], outs
    full = _theta(tmp_path / "full")
    _close(full, _single(tmp_path, steps))

    # rank 1 dies (SIGKILL) during outer step 5; rank 0, blocked in the all-reduce, fails too
    codes, outs = _wait(_launch(2, tmp_path / "run", steps, die=(1, 5)))
    _killed(codes, outs, tmp_path / "run")
    # restart both ranks from the last checkpoint: the uninterrupted 2-rank run, to the bit
    codes, outs = _wait(_launch(2, tmp_path / "run", steps, "--resume"))
    assert codes == [0, 0], outs
    _equal(_theta(tmp_path / "run"), full)
    # the checkpoint holds the whole meta-batch: one process resumes it too
    shutil.rmtree(tmp_path / "run")
    codes, outs = _wait(_launch(2, tmp_path / "run", steps, die=(1, 5)))
    _killed(codes, outs, tmp_path / "run")
    one = build(tmp_path / "run", steps, "nested")
    one.load_checkpoint()
    assert one.outer_step == 4
    one.run()
    assert one.outer_step == steps
    _close({k: v.detach() for k, v in one.theta.items()}, full)


def test_divergence_on_one_rank_resets_the_same_slots_everywhere(tmp_path):
    """Slots that hit a NaN are reset on the rank that owns them and their new seeds are drawn on
    every rank, so the run stays in lockstep with the single-process one."""
    steps = 8
    ref = build(tmp_path / "single", steps, "nested", family="poison")
    ref.run()
    codes, outs = _wait(_launch(2, tmp_path / "ddp", steps, "--family", "poison"))
    assert codes == [0, 0], outs
    assert ref.nonfinite > 0  # the test exercises the reset path
    rows = (tmp_path / "ddp" / "metrics.csv").read_text().strip().splitlines()
    assert int(rows[-1].split(",")[4]) == ref.nonfinite
    _close(_theta(tmp_path / "ddp"), {k: v.detach() for k, v in ref.theta.items()})


def test_slots_must_split_evenly_over_ranks():
    with pytest.raises(ValueError, match=r"meta\.meta_batch: 6 .* 4 processes"):
        Distributed(rank=1, world_size=4).owned(6)
    assert list(Distributed(rank=1, world_size=4).owned(8)) == [2, 3]
    assert list(Distributed().owned(3)) == [0, 1, 2]


def test_single_process_collectives_are_the_identity():
    d = Distributed()
    x = [torch.arange(3.0), torch.ones(2, 2)]
    assert all(a is b for a, b in zip(d.sum_(x), x))
    assert d.any(True) and not d.any(False)
    assert d.broadcast_str("runs/x") == "runs/x"


def test_world_size_without_torchrun_env_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="RANK, MASTER_ADDR, MASTER_PORT not set"):
        Distributed.from_env("gloo")
    with pytest.raises(ValueError, match="distributed.backend"):
        Distributed.from_env("mpi")


def test_max_seconds_stops_and_checkpoints(tmp_path):
    t = build(tmp_path / "budget", 1000, "nested")
    t.cfg.max_seconds = 1e-9  # out of time after the first outer step
    t.run()
    assert t.outer_step == 1
    again = build(tmp_path / "budget", 1000, "nested")
    again.load_checkpoint()
    assert again.outer_step == 1


@pytest.mark.slow
def test_torchrun_cli_two_processes_match_one(tmp_path):
    """``torchrun --nproc_per_node=2 -m metaopt.cli.train`` == ``metaopt-train`` (same logs)."""
    args = ["task=quadratic", "rule=adam", "scheme.truncation=5", "meta.outer_steps=3",
            "meta.meta_batch=4", "meta.horizon=20", "meta.progress=false", "meta.dtype=float64"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "metaopt.cli.train", *args,
                          f"hydra.run.dir={tmp_path / 'one'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "metaopt.cli.train", *args,
                          f"hydra.run.dir={tmp_path / 'two'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert [ln.startswith("rule checkpoint:") for ln in two.stdout.splitlines()].count(True) == 1
    col = lambda d: [r.split(",")[1] for r in (tmp_path / d / "metrics.csv").read_text().split()[1:]]
    assert [float(x) for x in col("two")] == pytest.approx([float(x) for x in col("one")], rel=1e-9)
    _close(_theta(tmp_path / "two"), _theta(tmp_path / "one"))


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_sweep(tmp_path):
    """The cluster path of ``metaopt-train -m``: hydra's submitit launcher, local executor."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    res = subprocess.run(
        [sys.executable, "-m", "metaopt.cli.train", "-m", "hydra/launcher=submitit_local",
         "task=quadratic", "rule=adam", "scheme.truncation=5", "meta.outer_steps=2",
         "meta.meta_batch=2", "meta.horizon=20", "meta.progress=false", "meta.outer_lr=1e-2,3e-2",
         f"hydra.sweep.dir={tmp_path}", "hydra.launcher.timeout_min=5"],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300)
    assert res.returncode == 0, res.stderr
    runs = sorted(tmp_path.glob("*/metrics.csv"))
    assert len(runs) == 2 and all(len(p.read_text().split()) == 3 for p in runs)
    assert len(list(tmp_path.glob("*/checkpoints/last/theta.safetensors"))) == 2


def test_multirun_under_torchrun_is_a_one_line_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "metaopt.cli.train", "-m", "meta.outer_steps=1",
                          f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, WORLD_SIZE="2"), timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: metaopt-train -m (multirun) under "
                                                          "torchrun is not supported")
