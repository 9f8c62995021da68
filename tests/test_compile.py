"""torch.compile of the inner step (metaopt.meta.engine.compiled_step): the compiled step computes
what the eager one does (and it is the compiled graph that ran, not the eager fallback), compiles
once per signature, and falls back to eager, with a log line, when no C++ compiler is present or
compilation fails. ES/PES with ``compile=True`` give the estimate of the eager vmapped runs."""
import logging

import pytest
import torch

from metaopt.meta import engine
from metaopt.meta.engine import compiled_step, compiler_available, run_compiled, sample_window
from metaopt.meta.es import ES, PES
from metaopt.meta.slots import new_slot
from metaopt.meta.unroll import get_meta_loss, unroll
from metaopt.rules import make_rule
from metaopt.tasks import make_family

FAM = make_family("digits_mlp", widths=[8], depths=[1], activations=["relu"], batch_sizes=[8])
ML = get_meta_loss("valid_mean")


def _setup(seed=0):
    rule = make_rule("mlp", hidden_size=4)
    slot = new_slot(FAM, rule, seed, horizon=100)
    theta = rule.init_theta(None, torch.Generator().manual_seed(1))
    theta["log_scale"] = theta["log_scale"] + 3.0  # visible steps
    return rule, slot, theta


def _close(a, b, tol):
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.skipif(not compiler_available(), reason="no C++ compiler for inductor")
def test_compiled_step_equals_eager_and_compiles_once(monkeypatch, caplog):
    from torch._dynamo.utils import counters
    monkeypatch.setattr(engine, "_COMPILED", {})  # compile here, not reuse an earlier test's step
    counters.clear()
    rule, slot, theta = _setup()
    tb, vb = sample_window(slot, 4, True)
    with caplog.at_level(logging.WARNING, logger="metaopt.compile"):
        step = compiled_step(rule, slot.task, ML)
        assert not step.ran_compiled()
        with torch.no_grad():
            ref = unroll(rule, theta, slot.task.apply, slot.params, {}, slot.state, tb, vb, ML)
            out = run_compiled(step, theta, slot.params, {}, slot.state, tb, vb, ML)
            # the compiled graph ran: no fallback to eager (which would compare eager with eager)
            assert step.ran_compiled(), caplog.text
            graphs = counters["stats"]["unique_graphs"]
            assert graphs >= 1, "nothing was compiled"
            # other values, same signature: no recompilation
            theta2 = {k: v * 1.1 for k, v in theta.items()}
            out2 = run_compiled(step, theta2, out.params, {}, out.state, tb, vb, ML)
            ref2 = unroll(rule, theta2, slot.task.apply, ref.params, {}, ref.state, tb, vb, ML)
            assert counters["stats"]["unique_graphs"] == graphs
            assert step.ran_compiled()
    assert "running eager" not in caplog.text, caplog.text
    # float32, inductor's fused kernels vs eager ops: equal to float32 rounding
    for o, r in ((out, ref), (out2, ref2)):
        torch.testing.assert_close(o.meta_loss, r.meta_loss, rtol=1e-6, atol=1e-6)
        _close(o.params, r.params, 1e-6)
        _close(o.state, r.state, 1e-6)
    assert not torch.equal(out.params["layers.0.weight"], slot.params["layers.0.weight"])
    # ES / PES estimates with compile=True equal the eager vmapped runs (same noise)
    for cls in (ES, PES):
        est = {}
        for c in (False, True):
            _, s, _ = _setup()
            est[c] = cls(truncation=3, num_samples=2, theta_run=False, compile=c).meta_gradient(
                rule, theta, [s], "valid_mean")
        assert engine._COMPILED and all(f.ran_compiled() for f in engine._COMPILED.values())
        # the estimate divides float32 loss differences by sigma: rounding of the losses (~3e-7)
        # shows up as ~1e-5 in it (measured 1.8e-5 between the eager one-run-at-a-time and
        # vmapped paths, on estimates of size 0.25), so 1e-4 here; the slot's own run is plain
        _close(est[True].grads, est[False].grads, 1e-4)
        _close(est[True].params[0], est[False].params[0], 1e-6)


def test_compile_falls_back_to_eager_with_a_log_line(monkeypatch, caplog):
    monkeypatch.setattr(engine, "compiler_available", lambda: False)
    monkeypatch.setattr(engine, "_COMPILED", {})
    rule, slot, theta = _setup()
    tb, vb = sample_window(slot, 2, True)
    with caplog.at_level(logging.WARNING, logger="metaopt.compile"):
        step = compiled_step(rule, slot.task, ML)
    assert "no C++ compiler" in caplog.text
    with torch.no_grad():
        out = run_compiled(step, theta, slot.params, {}, slot.state, tb, vb, ML)
        ref = unroll(rule, theta, slot.task.apply, slot.params, {}, slot.state, tb, vb, ML)
    assert not step.ran_compiled()
    # the fallback runs the very ops unroll runs, in the same order: bit-identical
    torch.testing.assert_close(out.meta_loss, ref.meta_loss, rtol=0, atol=0)
    _close(out.params, ref.params, 0)


def test_compile_failure_falls_back_to_eager_once_and_says_so(monkeypatch, caplog):
    """A compiler present but compilation failing: one warning, then eager for good, and
    ``ran_compiled()`` reports the fallback (what the compiled-vs-eager test relies on)."""
    calls = []

    def broken_compile(fn, **kw):
        def run(*a):
            calls.append(1)
            raise RuntimeError("inductor exploded")
        return run
    monkeypatch.setattr(engine, "compiler_available", lambda: True)
    monkeypatch.setattr(engine, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    rule, slot, theta = _setup()
    tb, vb = sample_window(slot, 3, True)
    with caplog.at_level(logging.WARNING, logger="metaopt.compile"):
        step = compiled_step(rule, slot.task, ML)
        with torch.no_grad():
            out = run_compiled(step, theta, slot.params, {}, slot.state, tb, vb, ML)
    assert not step.ran_compiled() and len(calls) == 1  # tried once, then eager for every step
    assert caplog.text.count("torch.compile of the inner step failed") == 1
    assert "RuntimeError: inductor exploded" in caplog.text
    with torch.no_grad():
        ref = unroll(rule, theta, slot.task.apply, slot.params, {}, slot.state, tb, vb, ML)
    _close(out.params, ref.params, 0)
