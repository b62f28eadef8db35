"""Fixtures shared by the parity suite. The inputs, tolerances and adapters live in ``_harness``."""

from __future__ import annotations

import pytest


@pytest.fixture
def x64():
    """Enables JAX float64 for one test only, so every other test runs in JAX's default dtypes."""
    import jax

    with jax.enable_x64(True):
        yield
