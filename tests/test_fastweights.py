"""Fast-weight layers: rule identities (TTT = linear attention, online GD = delta rule),
chunkwise == recurrent, finite-difference gradients of every layer, task data, tiny runs."""
import pytest
import torch
from torch.func import functional_call

from metaopt.fastweights import rules as R
from metaopt.fastweights.experiments import main, train_capacity, train_retrieval
from metaopt.fastweights.layers import FastWeightProgrammer, FastWeightRNN
from metaopt.fastweights.models import CapacityModel, RetrievalModel
from metaopt.tasks.retrieval import (QUERY_TOKEN, capacity_batch, decode_retrieval,
                                     make_retrieval, retrieval_splits)

D = torch.float64


def _qkv(B=2, T=13, dk=4, dv=3, seed=0, unit_keys=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, dk, generator=g, dtype=D)
    k = torch.randn(B, T, dk, generator=g, dtype=D)
    if unit_keys:
        k = k / k.norm(dim=-1, keepdim=True)
    v = torch.randn(B, T, dv, generator=g, dtype=D)
    beta = torch.rand(B, T, generator=g, dtype=D)
    W0 = torch.randn(B, dv, dk, generator=g, dtype=D)
    return q, k, v, beta, W0


def _causal_linear_attention(q, k, v):
    """The textbook formula: y_t = sum_{s <= t} v_s (k_s . q_t)."""
    scores = torch.tril(q @ k.transpose(1, 2))
    return scores @ v


# -- rule identities -------------------------------------------------------------------------
def test_sum_rule_is_causal_linear_attention():
    q, k, v, _, _ = _qkv()
    y, W = R.sum_recurrent(q, k, v)
    torch.testing.assert_close(y, _causal_linear_attention(q, k, v), atol=1e-12, rtol=0)
    torch.testing.assert_close(W, v.transpose(1, 2) @ k, atol=1e-12, rtol=0)


def test_ttt_batch_gd_half_lr_no_norm_equals_linear_attention():
    q, k, v, _, _ = _qkv(T=11)
    eta = torch.full(k.shape[:2], 0.5, dtype=D)
    y, W = R.ttt_recurrent(q, k, v, eta, mini_batch=k.shape[1], W0=None, ln=None)
    assert (y - _causal_linear_attention(q, k, v)).abs().max() < 1e-10
    # and through the layer: zero rate weights give sigmoid(0) = 1/2
    torch.manual_seed(0)
    ttt = FastWeightProgrammer(5, d_key=4, d_value=3, rule="ttt", ttt_mini_batch=64,
                               ttt_norm=False, ttt_lr=1.0).double()
    lin = FastWeightProgrammer(5, d_key=4, d_value=3, rule="sum").double()
    with torch.no_grad():
        ttt.rate.weight.zero_()
        ttt.rate.bias.zero_()
    lin.load_state_dict({n: p for n, p in ttt.state_dict().items() if not n.startswith("rate")})
    x = torch.randn(2, 9, 5, dtype=D)
    assert (ttt(x) - lin(x)).abs().max() < 1e-10


def test_online_gd_on_half_squared_error_is_delta_rule():
    q, k, v, beta, W0 = _qkv(unit_keys=False)
    # reference: autograd on 1/2 ||W k - v||^2, one step of size beta per token
    W = W0.clone()
    ys = []
    for t in range(k.shape[1]):
        Wt = W.detach().requires_grad_(True)
        loss = 0.5 * ((torch.bmm(Wt, k[:, t, :, None]).squeeze(-1) - v[:, t]) ** 2).sum()
        (g,) = torch.autograd.grad(loss, Wt)  # per-sequence gradients (the loss sums over B)
        W = W - beta[:, t, None, None] * g
        ys.append(torch.bmm(W, q[:, t, :, None]).squeeze(-1))
    y_ref = torch.stack(ys, 1)
    y, W_delta = R.delta_recurrent(q, k, v, beta, W0)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(W_delta, W, atol=1e-10, rtol=0)
    # TTT with mini-batch 1 is online GD on ||Wk - v||^2: step eta = beta / 2
    y_ttt, _ = R.ttt_recurrent(q, k, v, beta / 2, mini_batch=1, W0=W0)
    torch.testing.assert_close(y_ttt, y_ref, atol=1e-10, rtol=0)


def test_delta_overwrites_where_sum_accumulates():
    """Orthonormal keys, beta = 1: delta returns the latest value bound to a key, sum the sum."""
    dk, dv = 6, 3
    keys = torch.linalg.qr(torch.randn(dk, dk, dtype=D))[0].T  # rows orthonormal
    g = torch.Generator().manual_seed(1)
    order = [0, 1, 2, 0, 1]
    k = keys[order][None]
    v = torch.randn(1, len(order), dv, generator=g, dtype=D)
    beta = torch.ones(1, len(order), dtype=D)
    _, Wd = R.delta_recurrent(None, k, v, beta)
    _, Ws = R.sum_recurrent(None, k, v)
    torch.testing.assert_close(Wd[0] @ keys[0], v[0, 3], atol=1e-12, rtol=0)
    torch.testing.assert_close(Wd[0] @ keys[2], v[0, 2], atol=1e-12, rtol=0)
    torch.testing.assert_close(Ws[0] @ keys[0], v[0, 0] + v[0, 3], atol=1e-12, rtol=0)


def test_learned_rule_starts_as_beta_times_sum_and_can_express_delta():
    q, k, v, beta, W0 = _qkv()
    net = R.WriteNet(8).double()
    y, _ = R.learned_recurrent(q, k, v, beta, net, W0)
    y_ref, _ = R.hebbian_recurrent(q, k, v, beta, 1.0, W0)  # W += beta v k^T
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    with torch.no_grad():
        net.b.fill_(-1.0)
    y, _ = R.learned_recurrent(q, k, v, beta, net, W0)
    torch.testing.assert_close(y, R.delta_recurrent(q, k, v, beta, W0)[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("rule", ["delta", "ttt", "learned"])
def test_read_of_final_state_matches_last_output(rule):
    torch.manual_seed(0)
    layer = FastWeightProgrammer(5, d_key=4, d_value=3, rule=rule, ttt_mini_batch=3).double()
    x = torch.randn(2, 7, 5, dtype=D)
    q, k, v, r = layer.qkv(x)
    y, W = layer.program(q, k, v, r)
    torch.testing.assert_close(layer.read(W, q[:, -1:]), y[:, -1:], atol=1e-12, rtol=0)


# -- chunkwise == recurrent ----------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
def test_chunkwise_equals_recurrent(chunk):
    q, k, v, beta, W0 = _qkv(T=13)
    for w0 in (None, W0):
        ys, Ws = R.sum_recurrent(q, k, v, w0)
        yc, Wc = R.sum_chunkwise(q, k, v, w0, chunk)
        torch.testing.assert_close(yc, ys, atol=1e-10, rtol=0)
        torch.testing.assert_close(Wc, Ws, atol=1e-10, rtol=0)
        yd, Wd = R.delta_recurrent(q, k, v, beta, w0)
        ydc, Wdc = R.delta_chunkwise(q, k, v, beta, w0, chunk)
        torch.testing.assert_close(ydc, yd, atol=1e-10, rtol=0)
        torch.testing.assert_close(Wdc, Wd, atol=1e-10, rtol=0)
    # write-only calls give the same final state
    torch.testing.assert_close(R.delta_chunkwise(None, k, v, beta, W0, chunk)[1],
                               R.delta_recurrent(None, k, v, beta, W0)[1], atol=1e-10, rtol=0)


@pytest.mark.parametrize("rule", ["sum", "delta"])
def test_chunkwise_layer_matches_recurrent_layer_and_gradients(rule):
    torch.manual_seed(0)
    kw = dict(d_key=4, d_value=3, n_heads=2, rule=rule, feature_map="elu1", normalize="sum")
    rec = FastWeightProgrammer(6, mode="recurrent", **kw).double()
    chk = FastWeightProgrammer(6, mode="chunkwise", chunk_size=4, **kw).double()
    chk.load_state_dict(rec.state_dict())
    x = torch.randn(3, 10, 6, dtype=D)
    y1, y2 = rec(x), chk(x)
    torch.testing.assert_close(y2, y1, atol=1e-10, rtol=0)
    g1 = torch.autograd.grad(y1.pow(2).sum(), list(rec.parameters()))
    g2 = torch.autograd.grad(y2.pow(2).sum(), list(chk.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


# -- finite-difference gradients of every layer ----------------------------------------------------
def _gradcheck_module(module, x):
    module = module.double()
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    x = x.detach().double().requires_grad_(True)

    def f(x, *ps):
        out = functional_call(module, dict(zip(names, ps)), (x,))
        return out if not isinstance(out, tuple) else out[0]
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_fast_weight_rnn_gradients_match_finite_differences():
    torch.manual_seed(0)
    layer = FastWeightRNN(3, 4, decay=0.9, fast_lr=0.5, inner_steps=2)
    with torch.no_grad():  # move away from ReLU kinks
        layer.C.bias.fill_(0.3)
    _gradcheck_module(layer, torch.randn(2, 4, 3))


def test_fast_weight_rnn_attention_form_equals_matrix_form():
    torch.manual_seed(0)
    layer = FastWeightRNN(5, 6, decay=0.9, fast_lr=0.7, inner_steps=3).double()
    x = torch.randn(3, 7, 5, dtype=D)
    h0 = torch.randn(3, 6, dtype=D)
    ref = layer(x, h0)
    layer.form = "attention"
    torch.testing.assert_close(layer(x, h0), ref, atol=1e-12, rtol=0)
    _gradcheck_module(layer, torch.randn(2, 4, 5))


LAYER_CASES = [
    dict(rule="sum"), dict(rule="sum", mode="chunkwise", chunk_size=2),
    dict(rule="delta"), dict(rule="delta", mode="chunkwise", chunk_size=2),
    dict(rule="delta", feature_map="dpfp", dpfp_nu=1, normalize="sum"),
    dict(rule="hebbian", decay=0.9), dict(rule="ttt", ttt_mini_batch=2, ttt_norm=True),
    dict(rule="ttt", ttt_mini_batch=3, ttt_norm=False), dict(rule="learned", learned_hidden=3),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_programmer_gradients_match_finite_differences(case):
    torch.manual_seed(0)
    case = {"feature_map": "elu1", "normalize": "l2", **case}
    layer = FastWeightProgrammer(3, d_key=2, d_value=2, output_size=2, n_heads=2, **case)
    if layer.write_net is not None:  # its output layer starts at zero: make it matter
        torch.nn.init.normal_(layer.write_net.fc2.weight)
    _gradcheck_module(layer, torch.randn(2, 5, 3))


def test_capacity_model_gradients_match_finite_differences():
    torch.manual_seed(0)
    model = CapacityModel(4, "learned", d_key=2, d_value=3, feature_map="elu1").double()
    torch.nn.init.normal_(model.fwp.write_net.fc2.weight)
    batch = capacity_batch(2, 4, 3, 2, torch.Generator().manual_seed(0))
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]

    def f(*ps):
        return functional_call(model, dict(zip(names, ps)), (batch,))
    assert torch.autograd.gradcheck(f, tuple(params), eps=1e-6, atol=1e-5, rtol=1e-4)


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, word", [
    (dict(rule="oja"), "rule"), (dict(rule="hebbian", mode="chunkwise"), "mode"),
    (dict(mode="parallel"), "mode"), (dict(feature_map="relu2"), "feature_map"),
    (dict(normalize="max"), "normalize"), (dict(d_key=0), "d_key"),
])
def test_bad_layer_arguments_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        FastWeightProgrammer(3, **kwargs)


def test_bad_arguments_elsewhere():
    with pytest.raises(ValueError, match="decay"):
        FastWeightRNN(3, 4, decay=1.5)
    with pytest.raises(ValueError, match="form"):
        FastWeightRNN(3, 4, form="sparse")
    with pytest.raises(ValueError, match="inner_steps"):
        FastWeightRNN(3, 4, inner_steps=-1)
    with pytest.raises(ValueError, match="core"):
        RetrievalModel("gru")
    with pytest.raises(ValueError, match="num_pairs"):
        make_retrieval(5, num_pairs=27)
    with pytest.raises(ValueError, match="setting"):
        capacity_batch(2, 4, setting=3)
    q, k, v, beta, _ = _qkv()
    with pytest.raises(ValueError, match="W0"):
        R.sum_recurrent(q, k, v, torch.zeros(1, 1, 1, dtype=D))


# -- task data --------------------------------------------------------------------------------
def test_retrieval_sequences_follow_ba_format():
    x, y = make_retrieval(200, 4, torch.Generator().manual_seed(0))
    assert x.shape == (200, 11) and y.shape == (200,)
    for xi, yi in zip(x, y):
        s = decode_retrieval(xi)
        assert s[8:10] == "??" and s[:8:2].isalpha() and s[1:8:2].isdigit()
        assert len(set(s[:8:2])) == 4  # distinct keys
        assert int(s[s[:8:2].index(s[-1]) * 2 + 1]) == int(yi)
    assert (x[:, 8] == QUERY_TOKEN).all()
    sp = retrieval_splits(3, seed=0, sizes={"train": 50, "valid": 10, "test": 20})
    assert [len(sp[s][0]) for s in ("train", "valid", "test")] == [50, 10, 20]
    assert sp["train"][0].shape[1] == 9


@pytest.mark.parametrize("setting", [1, 2])
def test_capacity_targets_are_the_latest_binding(setting):
    b = capacity_batch(3, 7, 5, setting, torch.Generator().manual_seed(2))
    assert b["write_keys"].shape == (3, 7 * setting)
    for i in range(3):
        last = {}
        for key, val in zip(b["write_keys"][i].tolist(), b["write_values"][i].argmax(-1).tolist()):
            last[key] = val
        assert sorted(last) == list(range(7))
        for key, tgt in zip(b["query_keys"][i].tolist(), b["targets"][i].argmax(-1).tolist()):
            assert last[key] == tgt


# -- tiny end-to-end runs ---------------------------------------------------------------------------
def test_tiny_retrieval_and_capacity_runs():
    sizes = {"train": 256, "valid": 64, "test": 64}
    for core in ("fastweights", "lstm", "rnn", "fwp"):
        row = train_retrieval(core, hidden=8, max_steps=3, eval_every=3, batch_size=16,
                              sizes=sizes, log=lambda *a: None)
        assert 0.0 <= row["test_error"] <= 1.0 and row["steps"] == 3
    row = train_capacity("delta", num_keys=5, d_key=8, max_steps=2, eval_every=2, batch_size=4,
                         log=lambda *a: None, mode="chunkwise", chunk_size=4)
    assert row["test_loss"] > 0


def test_capacity_training_reduces_loss_for_delta():
    row = train_capacity("delta", num_keys=4, d_key=8, d_value=4, max_steps=60, eval_every=60,
                         batch_size=8, lr=1e-2, log=lambda *a: None, feature_map="elu1")
    assert row["test_loss"] < 0.05  # chance (predicting zero) is 1/d_value = 0.25


def test_cli_prints_table(tmp_path, capsys):
    out = tmp_path / "cap.json"
    rows = main(["capacity", "--rules", "sum", "delta", "--keys", "3", "--d-key", "4",
                 "--max-steps", "2", "--eval-every", "2", "--batch-size", "2",
                 "--out", str(out)])
    assert len(rows) == 2 and out.exists()
    text = capsys.readouterr().out
    assert "| rule" in text and "delta" in text


def test_learned_rule_saved_and_reused_at_another_size(tmp_path):
    path = str(tmp_path / "rule.safetensors")
    row = train_capacity("learned", num_keys=3, d_key=4, d_value=3, max_steps=3, eval_every=3,
                         batch_size=2, lr=0.1, log=lambda *a: None, feature_map="elu1",
                         save_rule=path)
    from safetensors.torch import load_file
    saved = load_file(path)
    assert float(saved["b"]) != 0.0  # trained away from the sum-rule start
    torch.manual_seed(0)
    model = CapacityModel(7, "learned", d_key=4, d_value=3, feature_map="elu1")
    from metaopt.fastweights.experiments import _load_write_net
    _load_write_net(model, path)
    for k, v in model.fwp.write_net.state_dict().items():
        assert torch.equal(v, saved[k])
    with pytest.raises(ValueError, match="init_rule"):
        train_capacity("delta", num_keys=3, d_key=4, max_steps=1, init_rule=path,
                       log=lambda *a: None)
    assert row["steps"] == 3


def test_benchmark_script_runs_and_forms_agree():
    import importlib.util
    import sys
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_fastweights.py"
    spec = importlib.util.spec_from_file_location("bench_fastweights", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    rows = mod.run(lengths=(12,), dim=4, batch=2, chunk=5, repeats=1)
    assert {r["rule"] for r in rows} == {"sum", "delta"}
    assert all(r["max_abs_diff"] < 1e-4 and r["ratio"] > 0 for r in rows)
