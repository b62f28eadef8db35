"""Softmax focal loss (multi-class) with a closed-form ``jax.custom_jvp``.

Per position, over the class axis, with M = max_k x_k, e_k = exp(x_k - M) and S = Σ_k e_k,
1 - p_c is computed as a sum over the other classes divided by S, never as 1 - p_c, so that the
modulator (1 - p_c)^γ and its derivative stay accurate when one class dominates.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp

import focal_spec
from focal_jax import _common, _distributed


def _log_parts(others: jax.Array, s: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """log p, log(1-p) and 1-p from ``others`` = S·(1-p), the sum S and z = x - M.

    log(1-p) is -inf where ``others`` is 0 (a single class, or every other class underflowed).
    Where 1-p < 1/2, log p = log1p(-(1-p)) keeps the digits that z - log S would lose.
    """
    has_others = others > 0
    log_s = jnp.log(s)
    omp = others / s
    log1mp = jnp.where(has_others, jnp.log(jnp.where(has_others, others, 1.0)) - log_s, -jnp.inf)
    logp = jnp.where(omp < 0.5, jnp.log1p(-omp), z - log_s)
    return logp, log1mp, omp


def _modulator_and_kappa(p: jax.Array, logp: jax.Array, log1mp: jax.Array, omp: jax.Array, gamma: float,
                         gamma_int: int | None) -> tuple[jax.Array | float, jax.Array]:
    """m = (1-p)^γ and κ = m (γ p ρ - 1) with ρ = log p / (1-p), so that dℓ/dz_c = -κ_c for ℓ = -m log p.

    ρ tends to -1 as p -> 1 and is set to -1 where 1-p underflows to 0. With an integer γ,
    m ρ = (1-p)^(γ-1) log p needs no division, and log(1-p) is not used at all.
    """
    if gamma_int == 0:
        return 1.0, -jnp.ones_like(logp)
    if gamma_int is not None:
        m_1 = _common.power(omp, gamma_int - 1)
        return m_1 * omp, gamma_int * p * logp * m_1 - m_1 * omp
    m = jnp.exp(gamma * log1mp)
    rho = jnp.where(omp > 0, logp / jnp.where(omp > 0, omp, 1.0), -1.0)
    return m, m * (gamma * p * rho - 1.0)


# ----------------------------------------------------------------------------------------
# Integer labels without smoothing: only the labelled class enters the loss. The labelled logit
# is gathered (``take_along_axis``); no one-hot is built. Masks are applied with integer
# comparisons against the class index, which XLA fuses into the one pass that computes exp.
# ----------------------------------------------------------------------------------------


def _index_stats(x: jax.Array, code: jax.Array, axis: int, gamma: float,
                 gamma_int: int | None) -> tuple[jax.Array, ...]:
    """The other classes' e_k = exp(x_k - M) (0 at k = y), and per position: S = Σ_k exp(x_k - M),
    Σ_{k≠y} e_k = S (1 - p_y), -m_y log p_y and κ_y.

    ``code`` is the label y at counted positions and -1 elsewhere. 1 - p_y = Σ_{k≠y} e_k / S is a sum
    over the other classes, never a difference, so it stays exact when p_y rounds to 1. Per-position
    values keep the positions' shape (no size-1 class axis), which XLA vectorizes far better.
    """
    classes = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    code_k = jnp.expand_dims(code, axis)
    counted = code >= 0
    zero = jnp.zeros((), x.dtype)
    # Garbage (NaN, inf) at positions that are not counted never reaches the arithmetic: their row
    # maximum and labelled logit are replaced by 0 before use, and their logits by 0 inside the
    # exp pass ((k | code) < 0 exactly when code = -1).
    m_x = jnp.where(counted, jax.lax.stop_gradient(jnp.max(x, axis=axis, initial=-jnp.inf)), zero)
    m_k = jnp.expand_dims(m_x, axis)
    x_y = jnp.take_along_axis(x - m_k, jnp.expand_dims(jnp.maximum(code, 0), axis), axis=axis,
                              mode="promise_in_bounds")
    z_y = jnp.where(counted, jnp.squeeze(x_y, axis), zero)
    e = jnp.where(classes != code_k, jnp.exp(jnp.where((classes | code_k) >= 0, x, zero) - m_k), zero)
    others = jnp.sum(e, axis=axis)
    s = others + jnp.exp(z_y)
    logp, log1mp, omp = _log_parts(others, s, z_y)
    m, kappa = _modulator_and_kappa(jnp.exp(logp), logp, log1mp, omp, gamma, gamma_int)
    return e, s, others, -(m * logp), kappa


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _index_kernel(x: jax.Array, code: jax.Array, wy: jax.Array, axis: int, gamma: float,
                  gamma_int: int | None) -> jax.Array:
    """Per-position loss -w_y (1-p_y)^γ log p_y (``wy`` is w[y], 0 where ``code`` is -1)."""
    return wy * _index_stats(x, code, axis, gamma, gamma_int)[3]


@_index_kernel.defjvp
def _index_kernel_jvp(axis, gamma, gamma_int, primals, tangents):
    x, code, wy = primals
    dx = tangents[0]  # labels and weights are constants
    e, s, others, loss, kappa = _index_stats(x, code, axis, gamma, gamma_int)
    # dℓ/dx_k = w_y κ_y (δ_ky - p_k): w_y κ_y (1 - p_y) at k = y, -w_y κ_y e_k / S elsewhere (e_y is 0).
    # e and two numbers per position are all that the backward pass reads. per_e ends in a division,
    # which XLA computes once per position rather than once per class.
    per_e = (wy * kappa) / s
    at_y = jnp.expand_dims(per_e * others, axis)
    is_y = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis) == jnp.expand_dims(code, axis)
    d = jnp.sum(jnp.where(is_y, at_y, jnp.zeros_like(at_y)) * dx - e * jnp.expand_dims(per_e, axis) * dx, axis=axis)
    return wy * loss, d


# ----------------------------------------------------------------------------------------
# Class weights times probabilities (soft labels, or smoothed integer labels): every class
# enters the loss, each with its own 1 - p_c.
# ----------------------------------------------------------------------------------------


def _dense_stats(x: jax.Array, axis: int, gamma: float, gamma_int: int | None) -> tuple[jax.Array, ...]:
    """p_c, -m_c log p_c and κ_c for every class."""
    m_x = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True, initial=-jnp.inf))  # cancels out
    z = x - m_x
    e = jnp.exp(z)
    s = jnp.sum(e, axis=axis, keepdims=True)
    at_max = z == 0
    # Σ over every class but one arg-max, without cancellation: the ties beyond the first add 1 each
    s_wo_max = (jnp.sum(jnp.where(at_max, jnp.zeros_like(e), e), axis=axis, keepdims=True)
                + (jnp.sum(at_max, axis=axis, keepdims=True, dtype=x.dtype) - 1.0))
    others = jnp.where(at_max, s_wo_max, s - e)
    logp, log1mp, omp = _log_parts(others, s, z)
    p = e / s
    m, kappa = _modulator_and_kappa(p, logp, log1mp, omp, gamma, gamma_int)
    return p, -(m * logp), kappa


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _dense_kernel(x: jax.Array, wq: jax.Array, axis: int, gamma: float, gamma_int: int | None) -> jax.Array:
    """Per-position loss -Σ_c w_c q_c (1-p_c)^γ log p_c (``wq`` is w_c q_c times the mask)."""
    return jnp.sum(wq * _dense_stats(x, axis, gamma, gamma_int)[1], axis=axis)


@_dense_kernel.defjvp
def _dense_kernel_jvp(axis, gamma, gamma_int, primals, tangents):
    x, wq = primals
    dx = tangents[0]
    p, loss, kappa = _dense_stats(x, axis, gamma, gamma_int)
    a = wq * kappa  # dℓ/dx_k = A_k - p_k Σ_c A_c
    grad = a - p * jnp.sum(a, axis=axis, keepdims=True)
    return jnp.sum(wq * loss, axis=axis), jnp.sum(grad * dx, axis=axis)


# ----------------------------------------------------------------------------------------
# The public function.
# ----------------------------------------------------------------------------------------


def softmax_focal_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    gamma: float = focal_spec.GAMMA,
    weight: jax.typing.ArrayLike | None = None,
    ignore_index: int = focal_spec.IGNORE_INDEX,
    label_smoothing: float = focal_spec.LABEL_SMOOTHING,
    where: jax.typing.ArrayLike | None = None,
    axis: int = focal_spec.JAX_CLASS_AXIS,
    reduction: str = focal_spec.REDUCTION,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Softmax focal loss for multi-class classification (Lin et al. 2017), classes on ``axis``.

    Per position i, with p = softmax(x) over the class axis and q the (smoothed) target
    distribution:

    .. math::
        \ell_i = -\sum_c w_c \, q_c \, (1-p_c)^γ \log p_c, \quad
        q = (1-ε)\,\mathrm{onehot}(y) + ε/C \ \text{(or } q(1-ε) + ε/C \text{ for probabilities)}.

    With integer labels and ε = 0 this is :math:`-w_y (1-p_y)^γ \log p_y`, computed from a gather
    of the labelled logit. :math:`1-p_c` is a sum over the other classes divided by the softmax
    denominator, so the loss and its gradient stay finite and accurate when one class dominates.
    With ``gamma=0`` this is the softmax cross-entropy (``F.cross_entropy``), in value and
    gradient. The gradient with respect to ``logits`` has a closed form (a ``jax.custom_jvp``);
    ``labels`` and ``weight`` are constants (their gradients are zero).

    Args:
      logits: floating array with the classes on ``axis`` (``C = logits.shape[axis]``, C >= 1).
        Half precision is computed in float32 and the result returned in the logits' dtype.
      labels: integer class indices of the logits' shape without the class axis, or floating
        class probabilities of the logits' shape.
      gamma: focusing parameter γ >= 0, a Python number (static). Whole numbers up to 8 use
        multiplications only.
      weight: optional per-class weights of shape ``(C,)``.
      ignore_index: integer labels equal to it contribute 0 and are not counted.
      label_smoothing: ε in [0, 1], applied as in ``F.cross_entropy``.
      where: optional boolean array broadcasting to the logits' shape without the class axis.
        Positions where it is False (or ignored) contribute 0, are not counted, and get an exactly
        zero gradient, whatever their logits and labels hold.
      axis: the class axis (static), ``-1`` (channels-last) by default.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      axis_name: inside ``shard_map`` or ``pmap``, the name of the mapped axis: the sum and the
        mean's denominator are ``psum``-ed over it, which makes ``"mean"`` the exact global mean.
        Ignored for ``"none"``.

    Returns:
      ``"none"``: the per-position loss, of the logits' shape without the class axis.
      ``"sum"``: a scalar. ``"mean"``: a scalar; for integer labels the sum divided by
      Σ w[y_i] over counted positions (``F.cross_entropy``'s weighted mean), for probabilities
      divided by the number of counted positions; 0 when nothing is counted. In the logits' dtype.
      An integer label outside [0, C) that is not ``ignore_index`` cannot raise under ``jit``: it
      makes that position's loss NaN (and so the mean and the sum).

    Raises:
      TypeError: non-floating logits, floating labels of the positions' shape, labels that are
        neither integer nor floating, or a traced option.
      ValueError: an option out of range, an unknown reduction, a class axis out of range, or a
        shape of ``labels``, ``weight`` or ``where`` that does not fit the logits.

    Examples:
      >>> import jax.numpy as jnp
      >>> import focal_jax
      >>> logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
      >>> labels = jnp.array([0, 1])
      >>> print(f"{focal_jax.softmax_focal_loss(logits, labels):.4f}")
      0.8568
      >>> loss = focal_jax.softmax_focal_loss(logits, labels, gamma=0.0, reduction="none")  # cross-entropy
      >>> with jnp.printoptions(precision=4, suppress=True):
      ...     print(loss)
      [0.2413 2.1698]

    References:
      Lin et al., `Focal Loss for Dense Object Detection <https://arxiv.org/abs/1708.02002>`_, 2017.
    """
    logits = _common.as_array(logits)
    labels = _common.as_array(labels)
    opts = focal_spec.softmax_options(
        logits.shape, logits.dtype, labels.shape, labels.dtype, gamma=gamma,
        weight_shape=_common.shape_of(weight), ignore_index=ignore_index, label_smoothing=label_smoothing,
        where_shape=_common.shape_of(where), axis=axis, reduction=reduction,
    )
    cdt = _common.compute_dtype(logits.dtype)
    ax, c = opts.axis, opts.num_classes
    positions = logits.shape[:ax] + logits.shape[ax + 1:]
    x = logits.astype(cdt)
    w = None if weight is None else jnp.asarray(weight, cdt)
    valid = None if where is None else jnp.broadcast_to(jnp.asarray(where, bool), positions)
    eps = opts.label_smoothing
    if opts.label_kind == "index":
        y = labels
        counted = y != opts.ignore_index
        valid = counted if valid is None else valid & counted
        # One unsigned comparison tests 0 <= y < C. A label outside that range (and not ignore_index)
        # cannot raise under jit: its position's loss becomes NaN.
        unsigned = jnp.dtype(f"uint{8 * y.dtype.itemsize}") if jnp.issubdtype(y.dtype, jnp.signedinteger) else y.dtype
        in_range = y.astype(unsigned) < c
        bad = valid & ~in_range
        code = jnp.where(valid & in_range, y, -1).astype(jnp.int32)  # the class, -1 where not counted
        ys = jnp.maximum(code, 0)
        wy = valid.astype(cdt) if w is None else jnp.where(valid, w[ys], jnp.zeros((), cdt))
        wy = jnp.where(bad, jnp.full((), jnp.nan, cdt), wy)
        # Σ w[y] over counted positions; a bad label's NaN reaches the mean through its loss
        count = jnp.sum(valid, dtype=jnp.int32) if w is None else jnp.sum(wy)
        if eps == 0:
            loss = _index_kernel(x, code, jax.lax.stop_gradient(wy), ax, opts.gamma, opts.gamma_int)
            return _distributed.reduce_loss(loss, opts.reduction, count, axis_name).astype(logits.dtype)
        x = jnp.where(jnp.expand_dims(valid, ax), x, jnp.zeros_like(x))  # masked garbage never reaches the math
        classes = jax.lax.broadcasted_iota(ys.dtype, x.shape, ax)
        q = jnp.where(classes == jnp.expand_dims(ys, ax), 1.0 - eps + eps / c, eps / c).astype(cdt)
        scale = jnp.expand_dims(jnp.where(bad, jnp.full((), jnp.nan, cdt), valid.astype(cdt)), ax)
    else:
        q = labels.astype(cdt)
        if eps:
            q = q * (1.0 - eps) + eps / c
        if valid is None:
            count = math.prod(positions)
            scale = None
        else:
            count = jnp.sum(valid, dtype=cdt)
            x = jnp.where(jnp.expand_dims(valid, ax), x, jnp.zeros_like(x))
            scale = jnp.expand_dims(valid.astype(cdt), ax)
    wq = q
    if w is not None:
        wq = wq * w.reshape((c,) + (1,) * (x.ndim - 1 - ax))
    if scale is not None:
        wq = jnp.where(scale != 0, wq * scale, jnp.zeros_like(wq))  # also drops garbage probabilities
    loss = _dense_kernel(x, jax.lax.stop_gradient(wq), ax, opts.gamma, opts.gamma_int)
    return _distributed.reduce_loss(loss, opts.reduction, count, axis_name).astype(logits.dtype)
