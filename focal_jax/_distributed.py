"""Reductions, exact global means across devices, and the RetinaNet positive normalizer."""

from __future__ import annotations

from collections.abc import Hashable

import jax
import jax.numpy as jnp

import focal_spec
from focal_jax import _common


def reduce_loss(loss: jax.Array, reduction: str, count: jax.typing.ArrayLike,
                axis_name: Hashable | None) -> jax.Array:
    """Applies ``reduction`` to the elementwise (or per-position) loss.

    ``count`` is the mean's denominator; it is differentiated like the sum (the softmax loss's
    Σ w[y_i] depends on ``weight``), whatever its sign. A mean over nothing (``count`` of exactly 0)
    is 0, with zero gradients. With ``axis_name``, the numerator and the denominator are
    ``psum``-ed over that named axis (inside ``shard_map`` or ``pmap``), so the mean is the exact
    mean over the global batch and the sum the global sum.
    """
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    if reduction == "sum":
        return total
    count = jnp.asarray(count, total.dtype)
    if axis_name is not None:
        count = jax.lax.psum(count, axis_name)
    nothing = count == 0
    return jnp.where(nothing, jnp.zeros_like(total), total / jnp.where(nothing, jnp.ones_like(count), count))


def positive_normalizer(
    targets: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""RetinaNet-style normalizer: the number of positives in the (global) batch, at least 1.

    .. math::
        Z = \max\Big(\sum_{i\,:\,\mathrm{where}_i} t_i,\ 1\Big)

    Divide a ``reduction="sum"`` focal loss by it, as RetinaNet does (Lin et al. 2017, section 4):
    ``sigmoid_focal_loss(logits, targets, reduction="sum") / positive_normalizer(targets)``. Inside
    ``shard_map`` or ``pmap``, pass the same ``axis_name`` to both: the loss sum and the count of
    positives are then both summed over the devices, and the ratio is exactly the single-device one.
    The normalizer is a constant: no gradient flows through it.

    Args:
      targets: targets of any shape (floating, integer or boolean dtype); soft targets count their
        mass.
      where: optional boolean array broadcasting to ``targets``; ``False`` positions are not
        counted, whatever they hold.
      axis_name: optional name of a mapped axis (``shard_map``/``pmap``) to sum the count over.

    Returns:
      A scalar, float32 (float64 for float64 targets).

    Raises:
      TypeError: a non-numeric ``targets`` dtype, or a ``where`` that is not boolean.
      ValueError: a ``where`` shape that does not broadcast to ``targets``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import focal_jax
      >>> t = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
      >>> print(f"{focal_jax.positive_normalizer(t):.1f}")
      3.0
      >>> print(f"{focal_jax.positive_normalizer(jnp.zeros(4)):.1f}")
      1.0

    References:
      Lin et al., `Focal Loss for Dense Object Detection <https://arxiv.org/abs/1708.02002>`_, 2017.
    """
    targets = _common.as_array(targets, "targets")
    dtype = _common.compute_dtype(targets.dtype)
    # The sigmoid loss's validation covers the targets' dtype and the shape of ``where``.
    focal_spec.sigmoid_options(targets.shape, dtype, targets.shape, targets.dtype, gamma=focal_spec.GAMMA,
                               alpha=None, weight_shape=None, label_smoothing=0.0,
                               where_shape=_common.shape_of(where), reduction="sum",
                               where_dtype=_common.dtype_of(where))
    t = targets.astype(dtype)
    if where is not None:
        t = jnp.where(jnp.broadcast_to(jnp.asarray(where, bool), t.shape), t, jnp.zeros_like(t))
    total = jnp.sum(t)
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    return jax.lax.stop_gradient(jnp.maximum(total, jnp.ones_like(total)))
