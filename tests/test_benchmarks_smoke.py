"""benchmarks/bench_core.py's correctness part at tiny size: metaopt, higher and torchopt compute
the same meta-gradient (float64), so the benchmark times one computation three ways."""
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_core.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_core", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def test_bench_core_meta_gradients_agree():
    bench = load_bench()
    d = bench.gradient_diffs(tasks=2, steps=3, width=8, depth=1, batch_size=8)
    assert d["max_abs_grad"] > 1e-6, "meta-gradient vanished; the comparison would be vacuous"
    # three libraries, one float64 computation: equal to rounding (measured 1e-18 on gradients
    # of 4e-3), so the bound is relative to the gradient's size
    for impl in ("higher", "torchopt", "metaopt_loop"):
        assert d[impl] <= 1e-12 * d["max_abs_grad"], (
            f"{impl} differs from metaopt's vmapped meta-gradient by {d[impl]:.3e} "
            f"(max |grad| {d['max_abs_grad']:.3e})")
