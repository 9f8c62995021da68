"""The untuned peers of the suite (metaopt/meta/peers.py) and the suite command that runs them."""
import subprocess
import sys

import pytest
import torch

from metaopt.meta import peers as P


def _named(seed=0):
    """A tiny MLP-shaped parameter list (input layer, a hidden matrix, head), an embedding, a
    conv kernel, and one frozen matrix that gets no gradient."""
    g = torch.Generator().manual_seed(seed)
    shapes = [("layers.0.weight", (8, 4)), ("layers.0.bias", (8,)), ("tok.weight", (5, 4)),
              ("layers.1.weight", (8, 8)), ("norm.weight", (8,)), ("conv.weight", (8, 2, 1, 1)),
              ("frozen.weight", (8, 8)), ("layers.2.weight", (3, 8)), ("layers.2.bias", (3,))]
    return [(n, (0.5 * torch.randn(s, generator=g)).requires_grad_(True)) for n, s in shapes]


def _loss(params, x):
    p = dict(params)
    h = torch.tanh(x @ p["layers.0.weight"].T + p["layers.0.bias"] + p["tok.weight"].sum(0).sum())
    h = torch.tanh(h @ p["layers.1.weight"].T) * p["norm.weight"] + p["conv.weight"].sum()
    return (h @ p["layers.2.weight"].T + p["layers.2.bias"]).pow(2).mean()


def _train(factory, steps=5):
    named = _named()
    before = {n: p.detach().clone() for n, p in named}
    opt = factory(named)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = _loss(named, x)
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
    return named, before, losses, opt


@pytest.mark.parametrize("name", sorted(P.PEERS))
def test_peer_steps_and_leaves_frozen_params_alone(name):
    if P.missing_package(name):
        pytest.skip(f"{P.missing_package(name)} not installed")
    named, before, losses, _ = _train(P.PEERS[name][0])
    after = dict(named)
    assert torch.equal(after["frozen.weight"], before["frozen.weight"])   # its grad stays None
    assert after["frozen.weight"].grad is None
    for n in ("layers.0.weight", "layers.1.weight", "layers.2.bias"):
        assert not torch.equal(after[n], before[n]), n
    assert all(torch.isfinite(p).all() for _, p in named)
    assert losses[-1] < losses[0]


def test_muon_gets_only_hidden_matrices():
    named = _named()
    hidden, other = P.muon_split(named)
    assert [n for n, _ in hidden] == ["layers.1.weight", "frozen.weight"]
    assert {n for n, _ in other} == {n for n, _ in named} - {"layers.1.weight", "frozen.weight"}
    opt = P.muon(named)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {id(p) for _, p in hidden}
    assert muon.defaults["lr"] == 1e-3 and adamw.defaults["lr"] == 3e-3
    assert adamw.defaults["weight_decay"] == 0.0
    assert P.muon_kj(named).optimizers[0].defaults["lr"] == 0.02
    # a linear model has no hidden matrix (its only matrix is both first and last): AdamW only
    lin = P.muon([("w", torch.zeros(3, 4, requires_grad=True)), ("b", torch.zeros(3, requires_grad=True))])
    assert [type(o) for o in lin.optimizers] == [torch.optim.AdamW]
    # transformer-style names: token/position embeddings are not hidden
    names = ["tok.weight", "pos.weight", "blocks.0.qkv.weight", "blocks.0.ln1.weight",
             "blocks.0.proj.weight", "head.weight"]
    shapes = [(10, 4), (6, 4), (12, 4), (4,), (4, 4), (10, 4)]
    hid, _ = P.muon_split([(n, torch.zeros(s)) for n, s in zip(names, shapes)])
    assert [n for n, _ in hid] == ["blocks.0.qkv.weight", "blocks.0.proj.weight"]


def test_documented_defaults():
    named = _named()
    assert P.adam(named).defaults["lr"] == 3e-3
    d = P.adamw(named).defaults
    assert d["lr"] == 1e-3 and d["weight_decay"] == 1e-2
    if not P.missing_package("prodigy"):
        assert P.prodigy(named).defaults["lr"] == 1.0


@pytest.mark.skipif(P.missing_package("schedulefree") is not None, reason="schedulefree missing")
def test_schedulefree_is_evaluated_at_x_between_steps():
    from schedulefree import AdamWScheduleFree
    named, _, _, opt = _train(P.schedulefree, steps=4)
    assert not opt.optimizer.param_groups[0]["train_mode"]        # parameters are x now
    # the same run by hand, as schedulefree's docs prescribe: train() to step, eval() to evaluate
    ref = _named()
    raw = AdamWScheduleFree([p for _, p in ref])
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    raw.train()
    for _ in range(4):
        raw.zero_grad()
        _loss(ref, x).backward()
        raw.step()
    raw.eval()
    for (n, p), (_, q) in zip(named, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_make_peers_skips_missing_packages_and_rejects_unknown(monkeypatch):
    msgs = []
    monkeypatch.setattr(P, "missing_package", lambda n: "prodigyopt" if n == "prodigy" else None)
    out = P.make_peers(["adam", "prodigy", "muon"], log=msgs.append)
    assert list(out) == ["adam", "muon"]
    assert len(msgs) == 1 and "prodigy" in msgs[0] and "\n" not in msgs[0]
    with pytest.raises(ValueError, match="Invalid peer: 'sgdd'"):
        P.make_peers(["adam", "sgdd"])
    assert P.make_peers([]) == {}
    assert tuple(P.DEFAULT_PEERS) == ("adam", "adamw", "muon", "prodigy", "schedulefree")


def test_multi_optimizer_evaluates_the_closure_once():
    named = _named()
    opt = P.muon(named)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(named, torch.ones(2, 4))
        loss.backward()
        return loss
    opt.step(closure)
    assert len(calls) == 1 and len(opt.param_groups) == 2
    opt.load_state_dict(opt.state_dict())


def _suite(tmp_path, out, *overrides):
    cmd = [sys.executable, "-m", "metaopt.cli.evaluate", "--config-name=suite",
           "speedup.steps=20", "speedup.k=2", "speedup.eval_every=5",
           "speedup.adam_lrs=[0.001,0.01]", "speedup.eval_examples=64",
           f"speedup.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / out}",
           *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_suite_command_runs_peers_and_the_final_half(tmp_path):
    # design half: the learned rule and one peer, head to head
    r = _suite(tmp_path, "design", "checkpoint=default", "speedup.problems=[wine_mlp]",
               "speedup.peers=[adam]")
    assert r.returncode == 0, r.stderr[-2000:]
    for s in ("| learned |", "| adam |", "| adam(tuned) |", ">= 1x", "| learned vs |"):
        assert s in r.stdout, s
    for f in ("speedup.csv", "curves.csv", "summary.md", "speedup.png", "curves.png"):
        assert (tmp_path / "design" / f).stat().st_size > 0, f
    # final half, by set: peers only (the shipped rule is not run on it here)
    r = _suite(tmp_path, "final", "checkpoint=", "speedup.set=final",
               "speedup.problems=[iris_mlp_smooth]", "speedup.peers=[adam]")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| iris_mlp_smooth (seed 0) | adam |" in r.stdout
    assert len(list((tmp_path / "cache").glob("adam_iris_mlp_smooth_*.json"))) == 2
    # a final problem runs only with speedup.set=final
    bad = _suite(tmp_path, "bad", "checkpoint=", "speedup.problems=[iris_mlp_smooth]",
                 "speedup.peers=[adam]")
    assert bad.returncode != 0 and "speedup.set=final" in bad.stderr.strip().splitlines()[-1]
