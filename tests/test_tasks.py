"""Tasks: reproducible sampling, learnable losses, fixed disjoint splits, vmap == loop."""
import warnings

import pytest
import torch
from torch.func import grad, jvp, vmap

from metaopt.tasks import (FAMILIES, ArrayDataset, CharVocab, LogisticTask, MLPTask,
                           QuadraticTask, SequenceDataset, family_options, load_sklearn,
                           load_text, make_dataset, make_family)
from metaopt.tasks.conv import ConvTask

# Small, fixed-architecture versions of each family (singleton lists fix a choice).
SMALL = {
    "quadratic": dict(dim=6),
    "logreg_cancer": dict(),
    "digits_mlp": dict(widths=16, depths=2, activations="gelu", batch_sizes=32),
    "digits_conv": dict(channels=8, depths=2, activations="tanh", batch_sizes=32),
    "char_lm": dict(seq_len=16, d_model=16, n_heads=2, batch_size=8),
    "digits_ae": dict(widths=16, bottlenecks=4, activations="tanh", batch_sizes=32),
    "mixture": dict(members={"digits_mlp": dict(widths=16, depths=1, activations="tanh",
                                                 batch_sizes=32)},
                    reparam_prob=1.0, reparam_range=[0.5, 2.0]),
    "suite": dict(problem="digits_linear"),
    "assoc_retrieval": dict(num_pairs=1, num_examples=1300, hidden=8, embed=8, batch_sizes=32),
    "regression": dict(in_dims=2, widths=16, depths=1, activations="tanh", noise=0.0,
                       batch_sizes=32),
    "raw_features": dict(in_dims=8, hidden=0, losses="ce", feature_scales=[0.5, 2.0],
                         batch_sizes=32),
    "vae": dict(dims=8, hidden=16, latents=2, activations="tanh"),
    "matfac": dict(users=32, items=24, ranks=2, dims=4, l2=0.0, batch_sizes=64),
    "resmlp": dict(widths=16, depths=2, activations="gelu", batch_sizes=32),
}
# (steps, learning rate) of plain gradient descent that must lower the valid loss clearly.
GD = {
    "quadratic": (150, 1.0),
    "logreg_cancer": (150, 0.5),
    "digits_mlp": (200, 0.3),
    "digits_conv": (150, 0.3),
    "char_lm": (60, 1.0),
    "digits_ae": (150, 0.5),
    "mixture": (150, 0.1),
    "suite": (150, 0.5),
    "assoc_retrieval": (150, 0.5),
    "regression": (200, 0.3),
    "raw_features": (150, 0.5),
    "vae": (200, 0.02),
    "matfac": (300, 1.0),
    "resmlp": (150, 0.3),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only add sync cost, and on a shared 2-core box
    a descheduled OpenMP thread makes every op wait (5 s -> 30 s for this file)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def stack(dicts):
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}


def stack_batches(batches):
    return tuple(torch.stack(parts) for parts in zip(*batches))


def sgd(task, params, steps, lr, generator):
    g = grad(task.loss)
    for _ in range(steps):
        grads = g(params, task.sample_batch("train", generator))
        params = {k: params[k] - lr * grads[k] for k in params}
    return params


def test_registry_names():
    assert set(FAMILIES) == {"quadratic", "logreg_cancer", "digits_mlp", "digits_conv", "char_lm",
                             "digits_ae", "mixture", "suite", "assoc_retrieval", "regression",
                             "raw_features", "vae", "matfac", "resmlp"}
    assert set(SMALL) == set(FAMILIES)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sampling_is_reproducible(name):
    fam = make_family(name, **SMALL[name])
    a, b = fam.sample_seeded(5), fam.sample_seeded(5)
    assert a.signature == b.signature and a.init_scale == b.init_scale
    for k in a.buffers:
        assert torch.equal(a.buffers[k], b.buffers[k])
    pa, pb = a.init_params(torch.Generator().manual_seed(1)), b.init_params(torch.Generator().manual_seed(1))
    assert list(pa) == [n for n, _ in a.module.named_parameters()]
    for k in pa:
        assert torch.equal(pa[k], pb[k])
    ga, gb = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for split in ("train", "train", "valid"):
        for xa, xb in zip(a.sample_batch(split, ga), b.sample_batch(split, gb)):
            assert torch.equal(xa, xb)
    if name == "suite":
        return  # one fixed problem: the seed only draws the init (via the caller's generator)
    # a different seed gives a different task or init
    c = fam.sample_seeded(6)
    pc = c.init_params(torch.Generator().manual_seed(1))
    differs = c.init_scale != a.init_scale or any(
        not torch.equal(c.buffers[k], a.buffers[k]) for k in a.buffers)
    assert differs or any(not torch.equal(pa[k], pc[k]) for k in pa)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gradient_descent_lowers_loss(name):
    torch.manual_seed(0)  # nothing should depend on the global RNG; this just guards the test
    fam = make_family(name, **SMALL[name])
    task = fam.sample_seeded(0)
    g = torch.Generator().manual_seed(0)
    params = task.init_params(g)
    before = task.evaluate(params, "valid")
    assert torch.isfinite(torch.tensor(before))
    steps, lr = GD[name]
    params = sgd(task, params, steps, lr, g)
    after = task.evaluate(params, "valid")
    assert torch.isfinite(torch.tensor(after))
    assert after < 0.7 * before, (before, after)
    if getattr(task, "is_classifier", False):
        acc = task.evaluate_accuracy(params, "test")
        assert 0.75 < acc <= 1.0


def test_quadratic_valid_loss_zero_at_optimum():
    fam = make_family("quadratic", dim=8, noise=0.5, dtype="float64")
    task = fam.sample_seeded(3)
    g = torch.Generator().manual_seed(0)
    at_opt = {"w": task.w_star.clone()}
    assert task.evaluate(at_opt, "valid") == 0.0
    assert float(task.loss(at_opt, task.sample_batch("valid", g))) == 0.0
    # train batches are noisy (positive loss at w_star), valid ones are exactly w_star
    assert float(task.loss(at_opt, task.sample_batch("train", g))) > 0.0
    assert torch.equal(task.sample_batch("test", g)[0][0], task.w_star)
    # the sampled matrix is symmetric with condition number in range
    eig = torch.linalg.eigvalsh(task.A)
    assert torch.allclose(task.A, task.A.T)
    assert eig.min() > 0 and 1 <= float(eig.max() / eig.min()) <= 100 * (1 + 1e-6)
    assert task.A.dtype == torch.float64


def test_quadratic_user_matrix():
    A = torch.diag(torch.tensor([1.0, 4.0]))
    task = QuadraticTask(A, torch.tensor([1.0, -1.0]), noise=0.0)
    assert float(task.loss({"w": torch.zeros(2)}, task.full_batch("train"))) == pytest.approx(2.5)


def _row_set(x):
    return {tuple(r.tolist()) for r in x.reshape(len(x), -1)}


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "wine", "diabetes"])
def test_splits_disjoint_and_fixed(name):
    ds = make_dataset(name, split_seed=0)
    rows = [_row_set(ds.x[s]) for s in ("train", "valid", "test")]
    assert sum(map(len, rows)) == len(load_sklearn(name)[0])  # rows are unique in these sets
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    again = make_dataset(name, split_seed=0, standardize=False)
    fresh = ArrayDataset(*load_sklearn(name), seed=0)
    assert torch.equal(again.y["valid"], fresh.y["valid"])
    assert torch.equal(again.x["test"], fresh.x["test"])
    other = make_dataset(name, split_seed=1, standardize=False)
    assert not torch.equal(other.x["train"], again.x["train"])
    if name != "digits":  # standardized with train statistics
        tr = ds.x["train"]
        assert torch.allclose(tr.mean(0), torch.zeros(tr.shape[1]), atol=1e-5)


def test_family_data_follow_split_seed():
    a = make_family("digits_mlp", split_seed=0).sample_seeded(0).data
    b = make_family("digits_mlp", split_seed=0).sample_seeded(1).data
    c = make_family("digits_mlp", split_seed=1).sample_seeded(0).data
    assert torch.equal(a.x["train"], b.x["train"])
    assert not torch.equal(a.x["train"], c.x["train"])
    lm = make_family("char_lm").data
    n = sum(len(p) for p in lm.parts.values())
    assert n == len(load_text())  # contiguous, non-overlapping parts


def _two_same_signature(name):
    fam = make_family(name, **SMALL[name])
    tasks = [fam.sample_seeded(s) for s in (11, 12)]
    assert tasks[0].signature == tasks[1].signature
    return tasks


@pytest.mark.parametrize("stats", [False, True])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_vmap_matches_loop(name, stats):
    tasks = _two_same_signature(name)
    g = torch.Generator().manual_seed(0)
    params = [t.init_params(g) for t in tasks]
    batches = [t.sample_batch("train", g) for t in tasks]
    buffers = [t.buffers for t in tasks]
    B = stack(buffers) if buffers[0] else {}
    fn = lambda p, b, x: tasks[0].apply(p, b, x, stats=stats)  # noqa: E731
    with warnings.catch_warnings():
        # no slow per-example fallbacks under vmap (e.g. the fused CPU attention kernel)
        warnings.filterwarnings("error", message=".*performance drop.*")
        out = vmap(fn)(stack(params), B, stack_batches(batches))
    ref = [t.apply(p, b, x, stats=stats) for t, p, b, x in zip(tasks, params, buffers, batches)]
    if not stats:
        torch.testing.assert_close(out, torch.stack(ref), atol=1e-6, rtol=1e-6)
        return
    loss, act = out
    torch.testing.assert_close(loss, torch.stack([r[0] for r in ref]), atol=1e-6, rtol=1e-6)
    assert set(act) == set(ref[0][1])
    if name not in ("quadratic", "matfac"):  # matfac's embeddings are raw Parameters, no layers
        assert act  # every weight of a Linear/Conv/Embedding layer has statistics
    for k in act:
        torch.testing.assert_close(act[k], torch.stack([r[1][k] for r in ref]), atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", ["digits_mlp", "digits_conv", "char_lm"])
def test_forward_mode_and_second_order(name):
    """Meta-gradient estimators need jvp and grad-of-grad through the loss."""
    task = make_family(name, **SMALL[name]).sample_seeded(0)
    g = torch.Generator().manual_seed(0)
    p, batch = task.init_params(g), task.sample_batch("train", g)
    f = lambda q: task.loss(q, batch)  # noqa: E731
    tangent = {k: torch.randn(v.shape, generator=g) for k, v in p.items()}
    _, d = jvp(f, (p,), (tangent,))
    gr = grad(f)(p)
    assert torch.allclose(d, sum((gr[k] * tangent[k]).sum() for k in p), rtol=1e-4, atol=1e-5)
    hv = grad(lambda q: sum((v * tangent[k]).sum() for k, v in grad(f)(q).items()))(p)
    assert all(torch.isfinite(v).all() for v in hv.values())


def test_vmapped_accuracy():
    tasks = _two_same_signature("digits_mlp")
    g = torch.Generator().manual_seed(0)
    params = [t.init_params(g) for t in tasks]
    batch = tasks[0].full_batch("valid")
    acc = vmap(lambda p: tasks[0].accuracy(p, batch))(stack(params))
    for a, t, p in zip(acc, tasks, params):
        assert float(a) == pytest.approx(t.evaluate_accuracy(p, "valid"))


def test_architecture_changes_signature():
    def sig(name, **kw):
        return make_family(name, **{**SMALL[name], **kw}).sample_seeded(0).signature
    base = sig("digits_mlp")
    for kw in (dict(widths=32), dict(depths=1), dict(activations="relu"), dict(batch_sizes=64)):
        assert sig("digits_mlp", **kw) != base, kw
    assert sig("digits_mlp", init_scale=0.5) == sig("digits_mlp", init_scale=1.7)
    conv = sig("digits_conv")
    assert sig("digits_conv", channels=16) != conv and sig("digits_conv", activations="relu") != conv
    assert sig("char_lm", d_model=32) != sig("char_lm")
    assert sig("quadratic", dim=7) != sig("quadratic")
    assert len({sig(n) for n in FAMILIES}) == len(FAMILIES)


def test_family_samples_architectures_from_lists():
    fam = make_family("digits_mlp")
    sigs = {fam.sample_seeded(s).signature for s in range(30)}
    assert len(sigs) > 10
    shapes = {tuple(fam.sample_seeded(s).param_shapes().values()) for s in range(30)}
    assert len(shapes) > 5


def test_bad_options_raise_named_errors():
    with pytest.raises(ValueError, match="Unknown option for task family 'digits_mlp': 'widht'"):
        make_family("digits_mlp", widht=3)
    with pytest.raises(ValueError, match="'foo', 'bar'"):
        make_family("quadratic", foo=1, bar=2)
    with pytest.raises(ValueError, match="Unknown task family: 'mnist'"):
        make_family("mnist")
    with pytest.raises(ValueError, match="Invalid activation: 'swish'"):
        make_family("digits_mlp", activations=("relu", "swish"))
    with pytest.raises(ValueError, match="Invalid cond"):
        make_family("quadratic", cond=(0.5, 10))
    with pytest.raises(ValueError, match="n_heads"):
        make_family("char_lm", d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="Unknown dataset: 'iris'"):
        make_family("logreg_cancer", dataset="iris")
    with pytest.raises(ValueError, match="Invalid dtype"):
        make_family("quadratic", dtype="int32")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_config_round_trip(name):
    fam = make_family(name, **SMALL[name])
    cfg = fam.config()
    assert set(cfg) <= set(family_options(name))
    again = make_family(fam.name, **cfg)
    a, b = fam.sample_seeded(4), again.sample_seeded(4)
    assert a.signature == b.signature
    pa, pb = (t.init_params(torch.Generator().manual_seed(0)) for t in (a, b))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_float64_tasks():
    for name in ("quadratic", "logreg_cancer", "digits_mlp"):
        task = make_family(name, **SMALL[name], dtype=torch.float64).sample_seeded(0)
        p = task.init_params(torch.Generator().manual_seed(0))
        assert all(v.dtype == torch.float64 for v in p.values())
        assert task.loss(p, task.sample_batch("train", torch.Generator())).dtype == torch.float64


def test_user_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] > 0).long()
    ds = ArrayDataset(x, y, seed=0)
    mlp = MLPTask(ds, hidden=(8,), batch_size=16)
    p = sgd(mlp, mlp.init_params(g), 200, 0.5, g)
    assert mlp.evaluate_accuracy(p) > 0.85
    logreg = LogisticTask(ds)
    assert logreg.module.loss_kind == "bce"
    p = sgd(logreg, logreg.init_params(g), 200, 1.0, g)
    assert logreg.evaluate_accuracy(p) > 0.9
    # regression (float targets) -> MSE, and accuracy is refused
    reg = MLPTask(ArrayDataset(x, x.sum(1)), hidden=(), batch_size=32)
    assert reg.module.loss_kind == "mse"
    p = sgd(reg, reg.init_params(g), 200, 0.3, g)
    assert reg.evaluate(p) < 1e-2
    with pytest.raises(ValueError, match="classification"):
        reg.accuracy(p, reg.full_batch("valid"))
    # images -> conv net; 3-class wine -> softmax regression
    imgs = ArrayDataset(torch.rand(60, 2, 6, 6, generator=g), torch.randint(0, 3, (60,), generator=g))
    conv = ConvTask(imgs, channels=(4, 4), batch_size=8)
    assert conv.loss(conv.init_params(g), conv.sample_batch("train", g)).isfinite()
    wine = LogisticTask(make_dataset("wine"))
    assert wine.module.loss_kind == "ce" and wine.param_shapes()["layers.0.weight"] == (3, 13)


def test_sklearn_loaders():
    x, y = load_sklearn("digits")
    assert x.shape == (1797, 1, 8, 8) and x.min() == 0 and x.max() == 1 and y.dtype == torch.int64
    assert load_sklearn("digits", flat=True)[0].shape == (1797, 64)
    x, y = load_sklearn("diabetes", dtype=torch.float64)
    assert x.dtype == y.dtype == torch.float64 and x.shape == (442, 10)
    assert load_sklearn("breast_cancer")[0].shape == (569, 30)
    assert load_sklearn("wine")[1].max() == 2
    x[0, 0] = 123.0  # callers get copies; the cached arrays are unchanged
    assert load_sklearn("diabetes", dtype=torch.float64)[0][0, 0] != 123.0


def test_text_and_vocab():
    text = load_text()
    assert len(text) >= 200_000 and text == load_text()
    assert text.startswith("The Zen of Python")
    vocab = CharVocab.from_text(text)
    assert len(vocab) <= 96
    ids = vocab.encode(text[:1000])
    assert ids.dtype == torch.int64 and vocab.decode(ids) == text[:1000]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CharVocab("ab").encode("abc")
    ds = SequenceDataset(vocab.encode(text), seq_len=8)
    x, y = ds.sample("train", 4, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_mlp_l2_penalises_weight_matrices_only():
    from metaopt.tasks.mlp import MLPModule
    torch.manual_seed(0)
    plain = MLPModule(4, [5], 3).double()
    reg = MLPModule(4, [5], 3, l2=0.3).double()
    reg.load_state_dict(plain.state_dict())
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    weights = sum(l.weight.pow(2).sum() for l in plain.layers)  # biases excluded
    torch.testing.assert_close(reg(x, y) - plain(x, y), 0.5 * 0.3 * weights)
