"""The slot engine's memory-saving paths compute what the plain ones do: a LazyWindow hands out
exactly the batches sample_window stacks (and leaves the slot's generator in the same state);
the continuous adjoint with valid_last (lazy training batches, last validation batch only) gives
the meta-gradient of the stored-window path."""
import copy

import pytest
import torch

from metaopt.meta import engine
from metaopt.meta.continuous import Continuous
from metaopt.meta.engine import LazyWindow, sample_window, stack_group
from metaopt.meta.slots import new_slot
from metaopt.rules import make_rule
from metaopt.tasks import make_family
from tests.helpers import needs_extra_for

FAM = make_family("digits_mlp", widths=[8], depths=[1], activations=["relu"], batch_sizes=[4],
                  dtype=torch.float64)


def _slots(rule, k=2):
    return [new_slot(FAM, rule, 3 + i, horizon=100, dtype=torch.float64) for i in range(k)]


def test_lazy_window_matches_the_stored_window():
    rule = make_rule("sgd", lr=0.1)
    T = 7
    a, b = _slots(rule), _slots(rule)
    ref = stack_group(a, T, True, last_valid=True)
    lazy = stack_group(b, T, True, last_valid=True, lazy_block=3)
    assert isinstance(lazy.train, LazyWindow)
    for k in list(range(T)) + list(reversed(range(T))):  # forward, then backward (adjoint order)
        for x, y in zip(lazy.train.at(k), ref.train):
            assert torch.equal(x, y[:, k])
    for x, y in zip(lazy.valid, ref.valid):
        assert x.shape[1] == 1 and torch.equal(x, y)
    full = [sample_window(s, T, True) for s in _slots(rule)]  # the last valid batch is the same
    for j in range(2):
        for x, y in zip(ref.valid, full[j][1]):
            assert torch.equal(x[j, 0], y[-1])
    for s, t in zip(a, b):  # both generators advanced by the same draws
        assert torch.equal(s.gen.get_state(), t.gen.get_state())


def test_continuous_adjoint_valid_last_lazy_equals_stored(monkeypatch):
    needs_extra_for("continuous")
    rule = make_rule("sgd", lr=0.2, momentum=0.5)
    theta = {k: v.double().requires_grad_(True) for k, v in rule.init_theta(None).items()}
    sch = Continuous(window=6, method="rk4", gradient="adjoint", substeps=2, store_every=6)
    lazy = sch.meta_gradient(rule, theta, _slots(rule), "valid_last")
    real = engine.run_slots
    monkeypatch.setattr("metaopt.meta.continuous.run_slots",
                        lambda *a, **kw: real(*a, **{**kw, "lazy_block": 0}))
    stored = sch.meta_gradient(rule, theta, _slots(rule), "valid_last")
    for k in theta:
        torch.testing.assert_close(lazy.grads[k], stored.grads[k], rtol=1e-12, atol=1e-14)
        assert float(lazy.grads[k].abs().max()) > 0
    # the lazy and stored windows feed the solver by different code: equal to float64 rounding
    assert lazy.meta_losses == pytest.approx(stored.meta_losses, rel=1e-12, abs=0)
