"""Private code shared by the JAX losses: arrays, dtypes, option values, label masks and small arithmetic."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

import focal_spec


def as_array(value: jax.typing.ArrayLike, arg: str | None = None) -> jax.Array:
    """``jnp.asarray`` that keeps an existing array (and its dtype) untouched.

    With ``arg`` (labels, targets): host integers that JAX would narrow (int64 to int32 without
    ``jax_enable_x64``) must fit the narrower dtype, or a ValueError names ``arg``: a wrapped label would be
    another class, or the ignored index, with no sign of it."""
    if isinstance(value, jax.Array):
        return value
    if arg is not None and not is_traced(value):
        host = np.asarray(value)
        if host.dtype.kind in "iu" and host.size:
            narrow = np.dtype(jax.dtypes.canonicalize_dtype(host.dtype))
            if narrow != host.dtype:
                info, lo, hi = np.iinfo(narrow), host.min(), host.max()
                if lo < info.min or hi > info.max:
                    raise ValueError(focal_spec.integers_narrowed(
                        arg, int(lo) if lo < info.min else int(hi), str(host.dtype), str(narrow)))
            return jnp.asarray(host)
    return jnp.asarray(value)


def shape_of(value: Any) -> tuple[int, ...] | None:
    """The shape of an optional array-like argument, or None."""
    if value is None:
        return None
    return tuple(value.shape) if hasattr(value, "shape") else tuple(np.shape(value))


def dtype_of(value: Any) -> Any:
    """The dtype of an optional array-like argument (NumPy's for lists and numbers), or None."""
    if value is None:
        return None
    return value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype


def is_traced(value: Any) -> bool:
    """Whether ``value`` is a tracer (``jit``, ``vmap``, ``grad``...): its values are unknown here."""
    return isinstance(value, jax.core.Tracer)


def host_value(value: Any) -> Any:
    """What :mod:`focal_spec`'s checks see of an option.

    A traced array is ``focal_spec.Unknown(shape, dtype)`` (checked by shape and dtype only); a concrete JAX array is
    copied to NumPy (a device-to-host transfer, as reading any array's values is) and checked in full;
    anything else (numbers, NumPy arrays, lists, and wrong types, which the checks reject) as it is.
    """
    if is_traced(value):
        return focal_spec.Unknown(tuple(value.shape), focal_spec.dtype_name(value.dtype))
    if isinstance(value, (jax.Array, np.ndarray)):
        arr = np.asarray(value)
        if arr.dtype not in (np.float32, np.float64) and jnp.issubdtype(arr.dtype, jnp.floating):
            arr = arr.astype(np.float32)  # bfloat16 (not a NumPy kind "f") and float16: exact in float32
        return arr
    return value


def perturbed(tangent: Any) -> bool:
    """Whether a custom-JVP tangent is a real one (not None, not a symbolic zero)."""
    return tangent is not None and not isinstance(tangent, SymbolicZero)


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


def label_masks(y: jax.Array, ignore_index: int | None, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """(y != ignore_index, 0 <= y < num_classes) for integer labels of any dtype, without wrapping.

    An ``ignore_index`` that ``y``'s dtype cannot hold matches nothing (a uint8 label 156 is class 156,
    never -100), and ``num_classes`` beyond the dtype's range is not converted to it either.
    """
    info = np.iinfo(y.dtype)
    if ignore_index is not None and info.min <= ignore_index <= info.max:
        counted = y != np.asarray(ignore_index, y.dtype)
    else:
        counted = jnp.ones(y.shape, bool)
    if num_classes > info.max:
        in_range = y >= np.asarray(0, y.dtype)
    else:
        # one unsigned comparison tests 0 <= y < C (a negative y wraps to a large unsigned number)
        unsigned = np.dtype(f"uint{8 * y.dtype.itemsize}")
        in_range = y.astype(unsigned) < np.asarray(num_classes, unsigned)
    return counted, in_range
