"""Fixtures shared by the parity suite. The inputs, tolerances and adapters live in ``_harness``."""

from __future__ import annotations

import pytest

from parity_tests import _harness as H


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.slow`` tests run with FOCAL_SLOW=1 or when ``-m`` selects them; otherwise they skip."""
    if H.SLOW or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with FOCAL_SLOW=1 or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def x64():
    """Enables JAX float64 for one test only, so every other test runs in JAX's default dtypes."""
    import jax

    with jax.enable_x64(True):
        yield
