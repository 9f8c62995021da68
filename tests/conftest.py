"""Test tiers and limits.

* Tests marked ``@pytest.mark.slow`` are skipped by default; run them with ``--run-slow`` (or
  select them with ``-m slow``). The default run stays well under 5 minutes on 2 cores.
* Every test gets a per-test timeout (pytest-timeout): a hung solver or a deadlocked loader
  fails that test instead of stalling the run. A test's own ``@pytest.mark.timeout`` or a
  ``--timeout`` on the command line takes precedence.
"""
import pytest
import torch

# The test problems are tiny: one thread is fastest and immune to oversubscription when other
# processes share the two cores.
torch.set_num_threads(1)

DEFAULT_TIMEOUT_S = 120  # the slowest default test takes ~16 s on a loaded 2-core machine
SLOW_TIMEOUT_S = 600


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow") or "slow" in (config.getoption("-m") or "")
    set_timeout = not config.getoption("timeout", None)
    skip = pytest.mark.skip(reason="slow: run with --run-slow or -m slow")
    for item in items:
        slow = item.get_closest_marker("slow") is not None
        if slow and not run_slow:
            item.add_marker(skip)
        if set_timeout and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S if slow else DEFAULT_TIMEOUT_S))
