"""Plastic transformers (metaopt.fastweights.plastic): the Hebbian rule equals a plain Python
loop over time, the gradient rule equals autograd on its local loss, every plastic module's
gradients pass float64 gradcheck, plasticity off is exactly the static block, the tasks' data,
and a tiny CLI run with a saved model."""
import json

import pytest
import torch
from torch.func import functional_call

from metaopt.fastweights import rules as R
from metaopt.fastweights.experiments import load_plastic, main, summarize_plastic
from metaopt.fastweights.plastic import (PlasticBlock, PlasticBranch, PlasticTransformer,
                                         gradient_recurrent, modulation_by_kind,
                                         reconstruction_loss)
from metaopt.fastweights.plastic_tasks import (CopyTask, FewShotDigitsTask, RegressionTask,
                                               make_plastic_task)
from metaopt.tasks.data import load_sklearn

D = torch.float64


def _qkv(B=3, T=9, dk=4, dv=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, dk, generator=g, dtype=D)
    k = torch.randn(B, T, dk, generator=g, dtype=D)
    k = k / k.norm(dim=-1, keepdim=True)
    v = torch.randn(B, T, dv, generator=g, dtype=D)
    eta = torch.rand(B, T, generator=g, dtype=D)
    W0 = torch.randn(B, dv, dk, generator=g, dtype=D)
    return q, k, v, eta, W0


# -- the rules against plain loops ----------------------------------------------------------------
def _hebbian_loop(q, k, v, gate, decay, W0):
    """The textbook recurrence, one sequence and one step at a time, scalars from Python."""
    ys, Ws = [], []
    for b in range(k.shape[0]):
        lam = float(decay[b]) if isinstance(decay, torch.Tensor) else decay
        W = W0[b].clone() if W0 is not None else torch.zeros(v.shape[-1], k.shape[-1], dtype=D)
        yb = []
        for t in range(k.shape[1]):
            W = lam * W + float(gate[b, t]) * torch.outer(v[b, t], k[b, t])  # post x pre^T
            yb.append(W @ q[b, t])
        ys.append(torch.stack(yb))
        Ws.append(W)
    return torch.stack(ys), torch.stack(Ws)


@pytest.mark.parametrize("decay", [1.0, 0.8, "per-sequence"])
@pytest.mark.parametrize("with_W0", [False, True])
def test_hebbian_rule_equals_its_recurrent_reference(decay, with_W0):
    q, k, v, eta, W0 = _qkv()
    gate = 2 * eta - 1                                   # signed
    if decay == "per-sequence":
        decay = torch.tensor([0.5, 0.9, 0.99], dtype=D)
    W0 = W0 if with_W0 else None
    y_ref, W_ref = _hebbian_loop(q, k, v, gate, decay, W0)
    for fn in (R.hebbian_recurrent, R.hebbian_parallel):
        y, W = fn(q, k, v, gate, decay, W0)
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(W, W_ref, atol=1e-12, rtol=0)
        assert fn(None, k, v, gate, decay, W0)[0] is None
        torch.testing.assert_close(fn(None, k, v, gate, decay, W0)[1], W_ref, atol=1e-12, rtol=0)


def test_hebbian_parallel_gradients_equal_the_loop():
    q, k, v, eta, _ = _qkv(T=7)
    decay = torch.tensor([0.6, 0.8, 0.95], dtype=D)
    ins = [t.clone().requires_grad_(True) for t in (q, k, v, eta, decay)]
    ins2 = [t.clone().requires_grad_(True) for t in (q, k, v, eta, decay)]
    w = torch.randn(3, 7, 3, dtype=D)
    (R.hebbian_parallel(*ins)[0] * w).sum().backward()
    (R.hebbian_recurrent(*ins2)[0] * w).sum().backward()
    for a, b in zip(ins, ins2):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=0)


def test_gradient_rule_is_a_step_down_the_local_loss():
    """F_t = F_{t-1} - eta_t dl/dF, the gradient from torch.autograd.grad one step at a time;
    gradient_recurrent (torch.func.grad) and the fast delta_chunkwise agree with it."""
    q, k, v, eta, W0 = _qkv()
    W, ys = W0.clone(), []
    for t in range(k.shape[1]):
        Wt = W.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(reconstruction_loss(Wt, k[:, t], v[:, t]).sum(), Wt)
        W = W - eta[:, t, None, None] * g
        ys.append(torch.bmm(W, q[:, t, :, None]).squeeze(-1))
    y_ref = torch.stack(ys, 1)
    y, W_rec = gradient_recurrent(q, k, v, eta, W0)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(W_rec, W, atol=1e-12, rtol=0)
    y_fast, W_fast = R.delta_chunkwise(q, k, v, eta, W0, chunk_size=k.shape[1])
    torch.testing.assert_close(y_fast, y_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(W_fast, W, atol=1e-10, rtol=0)


def test_gradient_rule_takes_any_local_loss():
    q, k, v, eta, _ = _qkv(T=5)

    def l1(W, k_, v_):   # a different local loss: its gradient is sign(Wk - v) k^T
        return (torch.bmm(W, k_.unsqueeze(-1)).squeeze(-1) - v_).abs().sum(-1)
    _, W = gradient_recurrent(None, k, v, eta, None, l1)
    W_ref = torch.zeros_like(W)
    for t in range(k.shape[1]):
        r = torch.sign(torch.bmm(W_ref, k[:, t, :, None]).squeeze(-1) - v[:, t])
        W_ref = W_ref - eta[:, t, None, None] * r.unsqueeze(-1) * k[:, t].unsqueeze(-2)
    torch.testing.assert_close(W, W_ref, atol=1e-12, rtol=0)


# -- modules ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
def test_branch_parallel_form_equals_recurrent_form(rule):
    torch.manual_seed(0)
    fast = PlasticBranch(8, n_heads=2, rule=rule, form="parallel").double()
    ref = PlasticBranch(8, n_heads=2, rule=rule, form="recurrent").double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, 11, 8, dtype=D)
    (a, aux_a), (b, aux_b) = fast(x, return_aux=True), ref(x, return_aux=True)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    torch.testing.assert_close(aux_a["W"], aux_b["W"], atol=1e-10, rtol=0)
    a.square().sum().backward()
    b.square().sum().backward()
    for (n, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-9, rtol=0, msg=n)


def _gradcheck(module, x):
    names, params = zip(*[(n, p.detach().clone().requires_grad_(True))
                          for n, p in module.named_parameters()])

    def f(x, *ps):
        return functional_call(module, dict(zip(names, ps)), (x,))
    assert torch.autograd.gradcheck(f, (x.requires_grad_(x.is_floating_point()), *params),
                                    eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rule,form", [("hebbian", "parallel"), ("hebbian", "recurrent"),
                                       ("gradient", "parallel"), ("gradient", "recurrent")])
def test_branch_gradients_pass_gradcheck(rule, form):
    torch.manual_seed(0)
    _gradcheck(PlasticBranch(4, n_heads=2, rule=rule, form=form).double(),
               torch.randn(2, 5, 4, dtype=D))


@pytest.mark.parametrize("rule", ["static", "hebbian", "gradient"])
def test_block_and_transformer_gradients_pass_gradcheck(rule):
    torch.manual_seed(0)
    _gradcheck(PlasticBlock(4, n_heads=2, rule=rule).double(), torch.randn(2, 4, 4, dtype=D))
    net = PlasticTransformer(2, input_dim=3, d_model=4, n_layers=1, n_heads=2, max_len=4,
                             rule=rule).double()
    _gradcheck(net, torch.randn(2, 4, 3, dtype=D))


@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
def test_plasticity_off_equals_the_static_block_exactly(rule):
    torch.manual_seed(0)
    plastic = PlasticBlock(8, n_heads=2, rule=rule)
    static = PlasticBlock(8, n_heads=2, rule="static")
    missing, unexpected = static.load_state_dict(plastic.state_dict(), strict=False)
    assert not missing and all(n.startswith("fast.") for n in unexpected)
    x = torch.randn(3, 10, 8)
    assert not torch.equal(plastic(x), static(x))       # on: the branch does something
    plastic.plastic = False
    assert torch.equal(plastic(x), static(x))
    # the whole model: set_plasticity(False) is the static transformer with the same weights
    torch.manual_seed(1)
    net = PlasticTransformer(5, vocab_size=7, d_model=8, n_layers=2, rule=rule)
    ref = PlasticTransformer(5, vocab_size=7, d_model=8, n_layers=2, rule="static")
    ref.load_state_dict(net.state_dict(), strict=False)
    tokens = torch.randint(0, 7, (2, 12))
    net.set_plasticity(False)
    out, aux = net(tokens, return_aux=True)
    assert torch.equal(out, ref(tokens)) and aux["modulation"] == []
    net.set_plasticity(True)
    assert not torch.equal(net(tokens), ref(tokens))


def test_zero_hebbian_modulation_writes_nothing_and_equals_static():
    torch.manual_seed(0)
    plastic = PlasticBlock(8, n_heads=2, rule="hebbian")
    static = PlasticBlock(8, n_heads=2, rule="static")
    static.load_state_dict(plastic.state_dict(), strict=False)
    with torch.no_grad():
        plastic.fast.mod.weight.zero_()
        plastic.fast.mod.bias.zero_()
    x = torch.randn(3, 10, 8)
    h, aux = plastic(x, return_aux=True)
    assert torch.equal(aux["W"], torch.zeros_like(aux["W"]))
    assert torch.equal(h, static(x))


@pytest.mark.parametrize("rule", ["hebbian", "gradient"])
def test_modulation_is_exposed_per_layer_and_head(rule):
    torch.manual_seed(0)
    net = PlasticTransformer(3, input_dim=5, d_model=8, n_layers=2, n_heads=2, rule=rule,
                             eta_max=0.5)
    x = torch.randn(4, 9, 5)
    mods = net.modulation(x)
    assert list(mods) == ["layer0", "layer1"]
    for m in mods.values():
        assert m.shape == (4, 2, 9) and not m.requires_grad
        assert (m.abs() <= 0.5).all()
        if rule == "gradient":
            assert (m > 0).all()
    _, aux = net(x, return_aux=True)
    torch.testing.assert_close(aux["modulation"][1], mods["layer1"])
    d = net.blocks[0].fast.decay()
    assert (d is None) == (rule == "gradient")
    if d is not None:
        torch.testing.assert_close(d, torch.full((2,), 0.9))


def test_modulation_by_kind_averages_each_kind():
    torch.manual_seed(0)
    task = CopyTask(length=4, delay=3, n_symbols=4)
    net = PlasticTransformer(rule="hebbian", d_model=8, n_layers=2, max_len=task.seq_len, **task.io)
    b = task.batch(5, torch.Generator().manual_seed(0))
    mk = modulation_by_kind(net, b, len(task.kinds))
    assert mk.shape == (2, 2, 5)
    m = net.modulation(b["x"])["layer1"]                      # (B, H, T)
    for c in range(5):
        sel = b["kind"] == c
        if sel.any():
            torch.testing.assert_close(mk[1, :, c], m.permute(1, 0, 2)[:, sel].mean(1))
        else:
            assert mk[:, :, c].isnan().all()


@pytest.mark.parametrize("kwargs,word", [
    (dict(rule="oja"), "rule"), (dict(form="chunk"), "form"), (dict(n_heads=0), "n_heads"),
    (dict(eta_max=0.0), "eta_max"), (dict(decay=1.5), "decay")])
def test_bad_branch_arguments_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        PlasticBranch(8, **kwargs)


def test_bad_model_and_task_arguments():
    with pytest.raises(ValueError, match="rule"):
        PlasticBlock(8, rule="oja")
    with pytest.raises(ValueError, match="exactly one"):
        PlasticTransformer(3, vocab_size=4, input_dim=4)
    with pytest.raises(ValueError, match="sequence length"):
        PlasticTransformer(3, vocab_size=4, max_len=4)(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="Unknown task"):
        make_plastic_task("sort")
    with pytest.raises(ValueError, match="split"):
        FewShotDigitsTask(split="valid")


# -- tasks ------------------------------------------------------------------------------------
def test_copy_targets_are_the_symbols_after_the_delimiter():
    task = CopyTask(length=5, delay=3, n_symbols=4, random_delay=False)
    b = task.batch(6, torch.Generator().manual_seed(0))
    assert b["x"].shape == (6, 13) and task.seq_len == 13
    assert (b["x"][:, 8] == task.delim).all() and (b["x"][:, 5:8] == task.blank).all()
    assert (b["x"][:, 9:] == task.blank).all()
    assert torch.equal(b["y"][b["mask"]].reshape(6, 5), b["x"][:, :5])
    assert [task.kinds[i] for i in b["kind"][0, [0, 5, 8, 9]]] == ["symbol", "delay",
                                                                  "delimiter", "recall"]
    # random delays: the recall starts at each sequence's own delimiter
    task = CopyTask(length=5, delay=6, n_symbols=4)
    b = task.batch(64, torch.Generator().manual_seed(0))
    delim = (b["x"] == task.delim).int().argmax(1)
    assert len(set(delim.tolist())) > 3 and (delim >= 5).all() and (delim <= 11).all()
    assert torch.equal(b["y"][b["mask"]].reshape(64, 5), b["x"][:, :5])
    assert (b["mask"].int().argmax(1) == delim).all()
    assert (b["kind"][torch.arange(64), delim] == 2).all()
    assert ((b["kind"] == 1).sum(1) == delim - 5).all()     # the delay blanks


def test_regression_tokens_hold_linear_pairs_and_ridge_solves_them():
    task = RegressionTask(n_points=12, dim=3, noise=0.0)
    b = task.batch(5, torch.Generator().manual_seed(0))
    xs, ys = b["x"][:, 0::2, :3], b["x"][:, 1::2, 3]
    torch.testing.assert_close(ys, (xs * b["w"][:, None]).sum(-1))
    assert (b["x"][:, 0::2, 3] == 0).all() and (b["x"][:, 1::2, :3] == 0).all()
    torch.testing.assert_close(b["y"][b["mask"]].reshape(5, 12), ys)
    ref = task.least_squares_mse(b, ridge=1e-8)
    assert ref["mse_late"] < 1e-8 < ref["loss"]         # exact once dim pairs are seen
    perfect = b["y"].unsqueeze(-1)
    assert task.metrics(perfect, b)["loss"] == 0


def test_fewshot_episodes_bind_labels_within_the_episode_and_split_images():
    x, y = load_sklearn("digits", flat=True)
    lookup = {tuple(row.tolist()): int(c) for row, c in zip(x, y)}
    task = FewShotDigitsTask(n_way=3, k_shot=2, n_query=4)
    b = task.batch(8, torch.Generator().manual_seed(0))
    assert b["x"].shape == (8, 10, 64 + 3 + 1)
    for e in range(8):
        label_to_class = {}
        for t in range(10):
            c = lookup[tuple(b["x"][e, t, :64].tolist())]
            lab = int(b["y"][e, t])
            assert label_to_class.setdefault(lab, c) == c      # one class per label
            if t < 6:
                assert b["x"][e, t, 64 + lab] == 1 and b["x"][e, t, -1] == 0
            else:
                assert (b["x"][e, t, 64:67] == 0).all() and b["x"][e, t, -1] == 1
        assert len(label_to_class) == 3 and len(set(label_to_class.values())) == 3
    test = FewShotDigitsTask(n_way=3, k_shot=2, n_query=4, split="test")
    train_imgs = {tuple(r.tolist()) for p in task.pools for r in p}
    assert not any(tuple(r.tolist()) in train_imgs for p in test.pools for r in p)


# -- the experiment -----------------------------------------------------------------------------
def test_cli_runs_saves_and_reloads(tmp_path, capsys):
    out, table = tmp_path / "rows.json", tmp_path / "table.md"
    rows = main(["plastic", "--task", "regression", "--model", "static", "hebbian", "--seed", "0",
                 "1", "--steps", "3", "--eval-size", "16", "--out", str(out), "--table",
                 str(table), "--save-dir", str(tmp_path / "ckpt")])
    assert len(rows) == 4 and json.loads(out.read_text())[-1]["model"] == "hebbian"
    text = table.read_text()
    assert "### regression" in text and "+-" in text and "ridge_test_loss" in text
    s = summarize_plastic(rows)
    assert [r["model"] for r in s] == ["static", "hebbian"] and s[0]["seeds"] == 2
    assert abs(s[0]["params"] - s[1]["params"]) < 0.01 * s[0]["params"]    # matched sizes
    net, kw = load_plastic(str(tmp_path / "ckpt" / "regression_hebbian_seed1.safetensors"))
    b = RegressionTask(**kw).batch(16, torch.Generator().manual_seed(10**6))
    with torch.no_grad():
        loss = RegressionTask(**kw).metrics(net(b["x"]), b)["loss"]
    assert loss == pytest.approx(rows[-1]["test_loss"], rel=1e-5)
    assert "plastic regression hebbian seed 1" in capsys.readouterr().out


def test_benchmark_script_writes_tables_and_figure(tmp_path):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "plastic_transformers.py"
    spec = importlib.util.spec_from_file_location("plastic_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "res"
    assert bench.main(["--tasks", "fewshot", "--seeds", "0", "--steps-scale", "0.001",
                       "--eval-size", "16", "--out", str(out), "--models-dir",
                       str(tmp_path / "models")]) == 0
    md = (tmp_path / "res.md").read_text()
    assert "### fewshot" in md and "- **fewshot**: test loss" in md and "| fewshot | hebbian | 0 |" in md
    assert len(json.loads((tmp_path / "res.json").read_text())) == 3
    assert (tmp_path / "res_modulation.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "models").glob("*.safetensors")) == [
        "fewshot_gradient_seed0.safetensors", "fewshot_hebbian_seed0.safetensors"]
