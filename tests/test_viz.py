"""metaopt.viz: the step recorder and response surface against exact references, and every
figure function rendered to PNG from a tiny real run (pixels not constant, expected labels)."""
import csv
import math

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaopt
from metaopt.meta import MetaTrainer, TrainConfig, make_scheme
from metaopt.meta.evaluate import train_task
from metaopt.rules import make_rule
from metaopt.viz import (StepRecorder, curves_from_rows, iqm, load_sweep, plot_effective_step_sizes,
                         plot_eval_curves, plot_heldout, plot_loss_curves, plot_lr_schedule,
                         plot_response_surface, plot_speedups, plot_sweep,
                         plot_update_distributions, response_surface)

from helpers import TinyFamily


def _check_png(path):
    img = mpimg.imread(path)[..., :3]
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert float(img.std()) > 0.05, "image is (almost) constant"
    assert (img.min(axis=2) < 0.9).mean() > 0.01, "almost nothing drawn"


def _labels(fig):
    return {a.get_xlabel() for a in fig.axes} | {a.get_ylabel() for a in fig.axes}


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    return model, x, y


def _train(opt, model, x, y, steps):
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)


# -- recorder ------------------------------------------------------------------------------------
def test_recorder_sgd_effective_lr_is_lr():
    model, x, y = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with StepRecorder(opt, model=model) as rec:
        _train(opt, model, x, y, 4)
    _train(opt, model, x, y, 2)  # after exit: not recorded (hooks removed)
    log = rec.log()
    assert log.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert list(log.steps) == [1, 2, 3, 4]
    np.testing.assert_allclose(log.grad_ratio, 0.05, rtol=1e-4)
    np.testing.assert_allclose(log.hist.sum(-1), 1.0)


def test_recorder_matches_manual_diff_for_learned_optimizer():
    model, x, y = _tiny_model(1)
    opt = metaopt.LearnedOptimizer(model.named_parameters(), rule=make_rule("adam", lr=1e-2))
    with StepRecorder(opt, every=2) as rec:
        _train(opt, model, x, y, 3)
        before = [p.detach().clone() for p in model.parameters()]
        _train(opt, model, x, y, 1)  # step 4 is not recorded (every=2 -> 1, 3, 5)
        before = [p.detach().clone() for p in model.parameters()]
        _train(opt, model, x, y, 1)
    log = rec.log()
    assert log.names == [n for n, _ in model.named_parameters()]  # from LearnedOptimizer.spec
    assert list(log.steps) == [1, 3, 5]
    for j, (p, p0) in enumerate(zip(model.parameters(), before)):
        u = (p.detach() - p0).abs().double()
        g = p.grad.abs().double()
        keep = g != 0
        assert math.isclose(log.grad_ratio[-1, j], float((u[keep] / g[keep]).median()), rel_tol=1e-9)
        keep = p0 != 0
        if keep.any():
            assert math.isclose(log.param_ratio[-1, j], float((u[keep] / p0.abs()[keep]).median()), rel_tol=1e-9)
        assert math.isclose(log.quantiles[-1, j, 2], float(u.reshape(-1).quantile(0.5)), rel_tol=1e-9)


def test_recorder_errors_and_csv(tmp_path):
    model, x, y = _tiny_model()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="every"):
        StepRecorder(opt, every=0)
    with pytest.raises(ValueError, match="names"):
        StepRecorder(opt, names=["a"])
    with pytest.raises(TypeError, match="optimizer"):
        StepRecorder(model)
    with StepRecorder(opt) as rec:
        _train(opt, model, x, y, 2)
    rows = list(csv.DictReader(open(rec.log().to_csv(tmp_path / "steps.csv"))))
    assert len(rows) == 2 * 4 and rows[0]["tensor"] == "group0.0"
    with pytest.raises(ValueError, match="log"):
        plot_effective_step_sizes(StepRecorder(opt).log())


# -- response surface ----------------------------------------------------------------------------
def test_response_surface_sgd_momentum_exact():
    lr, mu = 0.1, 0.9
    rule = make_rule("sgd", lr=lr, momentum=mu)
    g = np.linspace(-1, 1, 5)
    m = np.array([-0.5, 0.0, 0.5])
    s = response_surface(rule, rule.init_theta(None), grads=g, momenta=m, steps=(3, 0, 1))
    assert s.updates.shape == (3, 3, 5) and list(s.steps) == [3, 0, 1]
    for si, t in enumerate(s.steps):
        buf = m[:, None] * (1 - mu ** t) / (1 - mu) if t > 0 else None  # torch SGD's buffer
        expected = -lr * (mu * buf + g[None, :] if t > 0 else np.broadcast_to(g, (3, 5)))
        np.testing.assert_allclose(s.updates[si], expected, rtol=1e-6, atol=1e-12)  # theta is float32


def test_response_surface_spec_dependent_rule_needs_template():
    rule = make_rule("layerwise_lr", num_steps=4, lr=0.1)
    params = {"a.weight": torch.zeros(4, 6), "a.bias": torch.zeros(4)}
    from metaopt.types import FlatSpec
    theta = rule.init_theta(FlatSpec.of(params))
    theta["log_lr"] = torch.log(torch.tensor([[0.1, 1.0], [0.2, 1.0], [0.3, 1.0], [0.4, 1.0]]))
    with pytest.raises(ValueError, match="params"):
        response_surface(rule, theta)
    with pytest.raises(ValueError, match="tensor"):
        response_surface(rule, theta, params=params, tensor="nope")
    s = response_surface(rule, theta, grads=[-1.0, 2.0], momenta=[0.0, 5.0], steps=(0, 2, 7),
                         params=params)
    for si, lr in enumerate([0.1, 0.3, 0.4]):  # schedule row min(t, num_steps - 1)
        np.testing.assert_allclose(s.updates[si], -lr * np.array([[-1.0, 2.0]] * 2), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(metaopt.rules.RULES))
def test_response_surface_every_registered_rule(name):
    """Any rule, through its public update only (spec-dependent rules with a params template)."""
    from metaopt.types import FlatSpec
    rule = make_rule(name)
    params = {"w": torch.zeros(6, 7), "b": torch.zeros(6)} if rule.spec_dependent else None
    theta = rule.init_theta(FlatSpec.of(params) if params else None, torch.Generator().manual_seed(0))
    s = response_surface(rule, theta, grads=np.linspace(-0.1, 0.1, 7), momenta=(-0.1, 0.0, 0.1),
                         steps=(0, 3), params=params)
    assert s.updates.shape == (2, 3, 7) and np.isfinite(s.updates).all()
    assert np.ptp(s.updates[1]) > 0  # the update depends on the gradient or its history


# -- figures from tiny real runs --------------------------------------------------------------------
@pytest.fixture(scope="module")
def learned_log():
    """The shipped default rule on a tiny model, 12 recorded steps."""
    model, x, y = _tiny_model(2)
    opt = metaopt.LearnedOptimizer.from_pretrained(model.named_parameters(), "default", model=model)
    with StepRecorder(opt) as rec:
        _train(opt, model, x, y, 12)
    return opt, rec.log()


def test_plot_effective_step_sizes(learned_log, tmp_path):
    _, log = learned_log
    assert np.isfinite(log.grad_ratio).all() and (log.grad_ratio > 0).all()
    fig = plot_effective_step_sizes(log, tmp_path / "eff.png")
    _check_png(tmp_path / "eff.png")
    assert {"step", "median |update| / |grad|", "median |update| / |param|"} <= _labels(fig)
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == log.names


def test_plot_update_distributions(learned_log, tmp_path):
    _, log = learned_log
    fig = plot_update_distributions(log, tmp_path / "dist.png", tensors=["0.weight", "2.weight"])
    _check_png(tmp_path / "dist.png")
    assert {"step", "log10 |update|"} <= _labels(fig)
    assert [a.get_title() for a in fig.axes if a.get_title()] == ["0.weight", "2.weight"]
    with pytest.raises(ValueError, match="tensors"):
        plot_update_distributions(log, tensors=["nope"])


def test_plot_response_surface_shipped_default(learned_log, tmp_path):
    opt, _ = learned_log
    s = response_surface(opt, steps=(1, 20), grads=np.linspace(-0.1, 0.1, 9))
    assert np.isfinite(s.updates).all() and np.ptp(s.updates) > 0
    fig = plot_response_surface(s, tmp_path / "resp.png")
    _check_png(tmp_path / "resp.png")
    assert {"gradient", "update (change of the parameter)"} <= _labels(fig)
    assert [a.get_title() for a in fig.axes] == ["after 1 step", "after 20 steps"]


def test_plot_lr_schedule_from_meta_training(tmp_path):
    fam = TinyFamily(dtype=torch.float32)
    rule = make_rule("layerwise_lr", num_steps=4, lr=0.05)
    tr = MetaTrainer(rule, fam, make_scheme("nested", truncation=4),
                     TrainConfig(outer_steps=3, meta_batch=2, horizon=4, outer_lr=0.1, progress=False,
                                 checkpoint_every=3), tmp_path / "run")
    tr.run()
    log_lr = tr.theta_detached()["log_lr"]
    assert not torch.allclose(log_lr, torch.full_like(log_lr, math.log(0.05)))  # it learned something
    names = list(fam.sample_seeded(0).param_shapes())
    ax = plot_lr_schedule(log_lr, names, path=tmp_path / "lr.png")
    _check_png(tmp_path / "lr.png")
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("inner step", "learned learning rate")


@pytest.fixture(scope="module")
def eval_rows():
    """metaopt-eval-style curve rows: learned (shipped default) vs Adam, 2 tasks x 12 steps."""
    fam = TinyFamily(dtype=torch.float32)
    rows = []
    for seed in (0, 1):
        task = fam.sample_seeded(seed)
        for name, mk in (("learned", lambda named, t: metaopt.LearnedOptimizer.from_pretrained(
                              named, "default", model=t.module)),
                         ("adam@0.001", lambda named, t: torch.optim.Adam([p for _, p in named], lr=1e-3))):
            r = train_task(task, mk, 12, seed, eval_every=4, name=name)
            rows += [dict(family="tiny", task_seed=seed, optimizer=name, step=s, valid_loss=v)
                     for s, v in zip(r.steps, r.valid_losses)]
    return rows


def test_plot_loss_curves(eval_rows, tmp_path):
    steps, curves = curves_from_rows(eval_rows)
    assert list(steps) == [0, 4, 8, 12] and curves["learned"].shape == (2, 4)
    fig = plot_loss_curves(curves, steps, tmp_path / "loss.png", title="tiny")
    _check_png(tmp_path / "loss.png")
    assert {"step", "validation loss"} <= _labels(fig)
    assert len(fig.axes[0].collections) == 2  # one shaded band per optimizer
    with pytest.raises(ValueError, match="steps"):
        plot_loss_curves(curves, steps[:2])


def test_plot_eval_curves(eval_rows, tmp_path):
    rows = eval_rows + [dict(r, family="other") for r in eval_rows]
    plot_eval_curves(rows, tmp_path / "curves.png")
    _check_png(tmp_path / "curves.png")


def test_plot_speedups(eval_rows, tmp_path):
    # speedup of each optimizer over Adam on these runs: Adam's steps to reach its final loss / 12
    steps, curves = curves_from_rows(eval_rows)
    rows = []
    for opt, arr in curves.items():
        for i, curve in enumerate(arr):
            adam = np.minimum.accumulate(curves["adam@0.001"][i])
            hit = np.nonzero(adam <= curve[-1])[0]
            rows.append(dict(problem=f"seed {i}", optimizer=opt,
                             speedup=steps[-1] / max(steps[hit[0]], 1) if len(hit) else 1 / 4))
    rows.append(dict(problem="diverged", optimizer="learned", speedup="nan"))
    fig = plot_speedups(rows, tmp_path / "speed.png")
    _check_png(tmp_path / "speed.png")
    assert {"speedup over tuned Adam (steps, >1 = faster)", "task"} <= _labels(fig)
    assert any("IQM" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    with pytest.raises(ValueError, match="speedup"):
        plot_speedups([dict(problem="a", optimizer="b")])
    seeded = [dict(problem="p", seed=s, optimizer="o", speedup=1.0 + s) for s in (0, 1)]
    fig = plot_speedups(seeded)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["p (seed 0)", "p (seed 1)"]
    plt.close(fig)
    assert iqm([1, 2, 3, 100]) == 2.5 and iqm([1, 2, 3, 4, 100]) == 3.0


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """Two real runs laid out like a hydra multirun (overrides.yaml + metrics.csv + checkpoint)."""
    root = tmp_path_factory.mktemp("sweep")
    fam = TinyFamily(dtype=torch.float32)
    for i, (scheme, kw) in enumerate((("nested", dict(truncation=3)), ("interleaved", {}))):
        out = root / f"{i}_scheme={scheme}"
        (out / ".hydra").mkdir(parents=True)
        (out / ".hydra" / "overrides.yaml").write_text(f"- scheme={scheme}\n- meta.outer_steps=4\n")
        MetaTrainer(make_rule("layerwise_lr", num_steps=3, lr=0.05), fam, make_scheme(scheme, **kw),
                    TrainConfig(outer_steps=4, meta_batch=2, horizon=6, outer_lr=0.05, progress=False,
                                checkpoint_every=4), out).run()
    return root


def test_plot_sweep(tiny_sweep, tmp_path):
    runs = load_sweep(tiny_sweep)
    assert [r.label for r in runs] == ["scheme=nested", "scheme=interleaved"]
    assert all(len(r.metrics) == 4 and math.isfinite(r.final_meta_loss) for r in runs)
    fig = plot_sweep(tiny_sweep, tmp_path / "sweep.png", x="inner_steps")
    _check_png(tmp_path / "sweep.png")
    assert {"inner steps consumed (all slots)", "meta-loss", "final meta-loss (last 10%)"} <= _labels(fig)
    fig = plot_sweep(runs, tmp_path / "sweep2.png", heldout={"scheme=nested": (0.5, 0.7)})
    _check_png(tmp_path / "sweep2.png")
    assert "held-out validation loss" in _labels(fig)
    plot_heldout({"a": (1.0, 2.0), "b": (1.5, 2.0)}, tmp_path / "heldout.png")
    _check_png(tmp_path / "heldout.png")
    with pytest.raises(ValueError, match="x"):
        plot_sweep(runs, x="time")


def test_report_writes_pngs_next_to_csv(tiny_sweep):
    from metaopt.cli.report import main
    assert main([str(tiny_sweep), "--eval-steps", "0"]) == 0
    assert (tiny_sweep / "report.csv").exists()
    for name in ("meta_loss_vs_time.png", "meta_loss_vs_inner_steps.png"):
        _check_png(tiny_sweep / name)


def test_import_leaves_backend_alone():
    import importlib
    import matplotlib
    import metaopt.viz
    before = matplotlib.get_backend()
    plt.close("all")
    try:
        matplotlib.use("pdf")
        for mod in [m for name, m in sorted(vars(metaopt.viz).items()) if type(m) is type(metaopt)] + [metaopt.viz]:
            importlib.reload(mod)  # re-runs each viz module's import-time code
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)


def teardown_module(module):
    plt.close("all")


# -- (6) fast weights -------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["delta", "sum", "hebbian", "ttt", "learned"])
def test_fast_weight_trace_matches_layer_state(rule):
    from metaopt.fastweights import FastWeightProgrammer
    from metaopt.viz import fast_weight_trace
    torch.manual_seed(0)
    layer = FastWeightProgrammer(5, d_key=4, d_value=3, n_heads=2, rule=rule, ttt_mini_batch=2).double()
    x = torch.randn(1, 7, 5, dtype=torch.float64)
    tr = fast_weight_trace(layer, x, head=1)
    _, W = layer(x, return_state=True)
    assert tr.W.shape == (7, 3, 4)
    np.testing.assert_allclose(tr.W[-1], W[1].detach().numpy(), rtol=1e-12, atol=1e-12)
    if rule == "delta":
        beta = torch.sigmoid(layer.rate(x))[0, :, 1]
        np.testing.assert_allclose(tr.strength, beta.detach().numpy(), rtol=1e-12)
        # the delta rule's first write: W_1 = beta_1 v_1 k_1^T
        q, k, v, r = layer.qkv(x)
        np.testing.assert_allclose(tr.W[0], (beta[0] * torch.outer(v[1, 0], k[1, 0])).detach().numpy(),
                                   rtol=1e-10, atol=1e-12)
    if rule == "sum":
        assert (tr.strength == 1).all()


def test_plot_fast_weights_after_training(tmp_path):
    from metaopt.fastweights import RetrievalModel
    from metaopt.tasks.retrieval import decode_retrieval, make_retrieval
    from metaopt.viz import fast_weight_trace, plot_fast_weights
    torch.manual_seed(0)
    model = RetrievalModel("fwp", hidden=8, embed=12, readout=16, rule="delta")
    x, y = make_retrieval(64, num_pairs=3, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    tr = fast_weight_trace(model.core, model.embed(x[:1]))
    text = decode_retrieval(x[0])
    fig = plot_fast_weights(tr, tmp_path / "fw.png", tokens=list(text))
    _check_png(tmp_path / "fw.png")
    assert {"key feature", "value dimension", "position in sequence", "write strength"} <= _labels(fig)
    with pytest.raises(ValueError, match="tokens"):
        plot_fast_weights(tr, tokens=["a"])
    with pytest.raises(TypeError, match="layer"):
        fast_weight_trace(model, x[:1])
