"""Private helpers shared by the JAX losses: arrays, dtypes and small arithmetic."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import focal_spec


def as_array(value: jax.typing.ArrayLike) -> jax.Array:
    """``jnp.asarray`` that keeps an existing array (and its dtype) untouched."""
    return value if isinstance(value, jax.Array) else jnp.asarray(value)


def shape_of(value: Any) -> tuple[int, ...] | None:
    """The shape of an optional array-like argument, or None."""
    if value is None:
        return None
    return tuple(value.shape) if hasattr(value, "shape") else tuple(np.shape(value))


def compute_dtype(dtype: Any) -> jnp.dtype:
    """float64 for float64 inputs, float32 for everything else (half precision included)."""
    return jnp.dtype(focal_spec.compute_dtype(focal_spec.dtype_name(jnp.dtype(dtype))))


def tiny(dtype: Any) -> float:
    """The smallest normal number of ``dtype``: the floor of every logarithm's argument."""
    return float(jnp.finfo(dtype).tiny)


def power(q: jax.Array, n: int) -> jax.Array | float:
    """q**n for a small whole n, by repeated multiplication (1 when n = 0)."""
    out: jax.Array | float = 1.0
    for _ in range(n):
        out = q * out
    return out
