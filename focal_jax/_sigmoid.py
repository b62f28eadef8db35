"""Sigmoid focal loss (binary and multi-label) with a closed-form ``jax.custom_jvp``."""

from __future__ import annotations

import functools
from collections.abc import Hashable

import jax
import jax.numpy as jnp

import focal_spec
from focal_jax import _common, _distributed

# ----------------------------------------------------------------------------------------
# The elementwise kernel. ``x`` is the (sanitized) logit in the compute dtype, ``t`` the smoothed
# target t' and ``a`` the constant scale α_t · weight · mask. Every quantity below is built from
# exp(-|x|) with smooth, one-sided pieces, so that autodiff through the derivative rule (second
# derivatives, ``jax.hessian``) stays finite at any logit.
# ----------------------------------------------------------------------------------------


def _exp_neg_abs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x >= 0, and exp(-|x|) with the right derivative on each side of 0."""
    pos = x >= 0
    return pos, jnp.exp(jnp.where(pos, -x, x))


def _cross_entropy(x: jax.Array, t: jax.Array, pos: jax.Array, e: jax.Array) -> jax.Array:
    """ce = softplus(x) - t x = log1p(exp(-|x|)) + (1-t) relu(x) + t relu(-x): non-negative terms only."""
    return jnp.log1p(e) + jnp.where(pos, (1.0 - t) * x, -t * x)


def binary_cross_entropy(x: jax.Array, t: jax.Array) -> jax.Array:
    """The elementwise binary cross-entropy with logits, without cancellation (plain autodiff)."""
    pos, e = _exp_neg_abs(x)
    return _cross_entropy(x, t, pos, e)


def _parts(x: jax.Array, t: jax.Array, for_value: bool = False) -> tuple[jax.Array, ...]:
    """σ(x), σ(-x), the cross-entropy, 1-p_t and log(σ(x)σ(-x)), each without cancellation.

    ``for_value`` spells exp(-|x|) with ``abs``: the same numbers, but an expression XLA does not
    merge with the derivative's, so that ``value_and_grad`` recomputes the few elementwise operations
    in each pass instead of keeping input-sized intermediates alive between them. (The value's own
    autodiff is never used: the derivative comes from the custom JVP rule.)
    """
    if for_value:
        pos, e = x >= 0, jnp.exp(-jnp.abs(x))
    else:
        pos, e = _exp_neg_abs(x)
    inv = 1.0 / (1.0 + e)
    ei = e * inv
    s = jnp.where(pos, inv, ei)  # σ(x)
    sn = jnp.where(pos, ei, inv)  # σ(-x)
    l1pe = jnp.log1p(e)
    ce = l1pe + jnp.where(pos, (1.0 - t) * x, -t * x)  # as _cross_entropy
    q = t * sn + (1.0 - t) * s  # 1 - p_t: a sum of two non-negative terms
    log_s_sn = -2.0 * l1pe - jnp.where(pos, x, -x)  # log σ(x) + log σ(-x) = -2 log1p(e^-|x|) - |x|
    return s, sn, ce, q, log_s_sn


def _value(x: jax.Array, t: jax.Array, gamma: float, gamma_int: int | None) -> jax.Array:
    """The unscaled elementwise loss (1-p_t)^γ · ce."""
    _, _, ce, q, _ = _parts(x, t, for_value=True)
    if gamma_int is not None:
        return _common.power(q, gamma_int) * ce
    return jnp.exp(gamma * jnp.log(jnp.maximum(q, _common.tiny(x.dtype)))) * ce


def _coefficient(x: jax.Array, t: jax.Array, gamma: float, gamma_int: int | None) -> jax.Array:
    """d/dx of the unscaled loss: γ m (1-2t') r ce + m (σ(x) - t'), with r = σ(x)σ(-x)/(1-p_t).

    σ(x) - t' is written (1-t')σ(x) - t'σ(-x), exact for hard targets at saturated logits. With an
    integer γ, m·r = q^(γ-1) σ(x)σ(-x): no division, no logarithm. Otherwise
    m·r = exp((γ-1) log q + log σ(x)σ(-x)): no division by q either, so that differentiating this
    coefficient again (``jax.hessian``) never divides by q², which underflows at saturated logits.
    """
    s, sn, ce, q, log_s_sn = _parts(x, t)
    bce = (1.0 - t) * s - t * sn
    if gamma_int == 0:
        return bce
    if gamma_int is not None:
        return _common.power(q, gamma_int - 1) * (gamma_int * (1.0 - 2.0 * t) * s * sn * ce + q * bce)
    log_q = jnp.log(jnp.maximum(q, _common.tiny(x.dtype)))
    m = jnp.exp(gamma * log_q)
    m_r = jnp.exp((gamma - 1.0) * log_q + log_s_sn)
    return gamma * (1.0 - 2.0 * t) * m_r * ce + m * bce


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _kernel(x: jax.Array, t: jax.Array, a: jax.Array | None, gamma: float, gamma_int: int | None) -> jax.Array:
    """The elementwise loss ``a · (1-p_t)^γ · ce``, whose derivative is ``a · _coefficient``."""
    value = _value(x, t, gamma, gamma_int)
    value = value if a is None else a * value
    # Returns x where x is NaN (where the loss is NaN anyway): a select at the root keeps XLA from
    # splitting this elementwise pass across the reduction that follows it, which would keep
    # several input-sized intermediates alive.
    return jnp.where(jnp.isnan(x), x, value)


@_kernel.defjvp
def _kernel_jvp(gamma, gamma_int, primals, tangents):
    x, t, a = primals
    dx = tangents[0]  # targets and scales are constants: their tangents are ignored
    coef = _coefficient(x, t, gamma, gamma_int)
    return _kernel(x, t, a, gamma, gamma_int), (coef if a is None else a * coef) * dx


# ----------------------------------------------------------------------------------------
# The public function.
# ----------------------------------------------------------------------------------------


def sigmoid_focal_loss(
    logits: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    gamma: float = focal_spec.GAMMA,
    alpha: jax.typing.ArrayLike | None = focal_spec.ALPHA,
    weight: jax.typing.ArrayLike | None = None,
    label_smoothing: float = focal_spec.LABEL_SMOOTHING,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = focal_spec.REDUCTION,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Sigmoid focal loss for binary and multi-label classification (Lin et al. 2017).

    Every element is an independent binary prediction. With t' the smoothed target and σ the
    sigmoid:

    .. math::
        t' = t(1-ε) + ε/2, \quad
        ce = -t' \log σ(x) - (1-t') \log σ(-x), \quad
        1-p_t = t' σ(-x) + (1-t') σ(x),

    .. math::
        \ell = α_t \cdot w \cdot (1-p_t)^γ \cdot ce, \quad α_t = α t' + (1-α)(1-t').

    With ``gamma=0`` and no ``alpha`` this is the binary cross-entropy, in value and gradient.
    The gradient with respect to ``logits`` has a closed form (a ``jax.custom_jvp``), so
    ``jax.grad``, ``jax.jvp``, ``jax.vmap`` and ``jax.hessian`` all apply; ``targets``,
    ``alpha`` and ``weight`` are constants (their gradients are zero).

    Args:
      logits: floating array of any shape (float16, bfloat16, float32 or float64). Half
        precision is computed in float32 and the result returned in the logits' dtype.
      targets: probabilities in [0, 1] (soft or hard), floating, integer or boolean, with a
        shape that broadcasts to ``logits``. Cast to the compute dtype, never to a half dtype.
      gamma: focusing parameter γ >= 0, a Python number (static). Whole numbers up to 8 use
        multiplications only.
      alpha: None (no class balance), a number in [0, 1], or an array broadcasting to ``logits``
        (one alpha per class, for example).
      weight: optional array broadcasting to ``logits``; multiplies the elementwise loss.
      label_smoothing: ε in [0, 1]; targets become t(1-ε) + ε/2.
      where: optional boolean array broadcasting to ``logits``. Elements where it is False
        contribute 0, are not counted by the mean, and get an exactly zero gradient, whatever
        their logits (NaN and inf included) and targets hold.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      axis_name: inside ``shard_map`` or ``pmap``, the name of the mapped axis: the sum and the
        number of counted elements are ``psum``-ed over it, which makes ``"mean"`` the exact
        global mean (and ``"sum"`` the global sum). Ignored for ``"none"``.

    Returns:
      ``"none"``: the elementwise loss, of the logits' shape. ``"sum"``: a scalar.
      ``"mean"``: a scalar, the sum over counted elements divided by their number (0 when
      nothing is counted). In the logits' dtype.

    Raises:
      TypeError: non-floating logits, targets that are not floating, integer or boolean, or a
        traced ``gamma``/``label_smoothing``.
      ValueError: an option out of range, an unknown reduction, or a shape of ``targets``,
        ``alpha``, ``weight`` or ``where`` that does not broadcast to the logits.

    Examples:
      >>> import jax.numpy as jnp
      >>> import focal_jax
      >>> logits = jnp.array([[2.0, -1.0], [0.5, -3.0]])
      >>> targets = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> print(f"{focal_jax.sigmoid_focal_loss(logits, targets):.4f}")
      0.7920
      >>> loss = focal_jax.sigmoid_focal_loss(logits, targets, alpha=0.25, reduction="none")
      >>> with jnp.printoptions(precision=4, suppress=True):
      ...     print(loss)
      [[0.0005 0.017 ]
       [0.2831 0.6916]]

    References:
      Lin et al., `Focal Loss for Dense Object Detection <https://arxiv.org/abs/1708.02002>`_, 2017.
    """
    logits = _common.as_array(logits)
    targets = _common.as_array(targets)
    opts = focal_spec.sigmoid_options(
        logits.shape, logits.dtype, targets.shape, targets.dtype, gamma=gamma, alpha=alpha,
        weight_shape=_common.shape_of(weight), label_smoothing=label_smoothing,
        where_shape=_common.shape_of(where), reduction=reduction,
    )
    cdt = _common.compute_dtype(logits.dtype)
    shape = logits.shape
    x = logits.astype(cdt)
    t = jnp.broadcast_to(targets.astype(cdt), shape)
    mask = None
    if where is not None:
        mask = jnp.broadcast_to(jnp.asarray(where, bool), shape)
        x = jnp.where(mask, x, jnp.zeros_like(x))  # never let masked garbage reach the math
        t = jnp.where(mask, t, jnp.zeros_like(t))
    eps = opts.label_smoothing
    if eps:
        t = t * (1.0 - eps) + eps / 2.0
    scale: jax.Array | None = None
    if opts.alpha is not None:
        a = jnp.asarray(alpha, cdt)
        scale = a * t + (1.0 - a) * (1.0 - t)
    if weight is not None:
        w = jnp.asarray(weight, cdt)
        scale = w if scale is None else scale * w
    if mask is not None:
        scale = mask.astype(cdt) if scale is None else jnp.where(mask, scale, jnp.zeros_like(scale))
    t = jax.lax.stop_gradient(t)
    if scale is not None:
        scale = jax.lax.stop_gradient(jnp.broadcast_to(scale, shape))
    loss = _kernel(x, t, scale, opts.gamma, opts.gamma_int)
    count = logits.size if mask is None else jnp.sum(mask, dtype=cdt)
    out = _distributed.reduce_loss(loss, opts.reduction, count, axis_name)
    return out.astype(logits.dtype)
