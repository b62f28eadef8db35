"""Sigmoid focal loss (binary and multi-label) with a closed-form ``jax.custom_jvp``."""

from __future__ import annotations

import functools
from collections.abc import Hashable

import jax
import jax.numpy as jnp

import focal_spec
from focal_jax import _common, _distributed, _family

_variants = focal_spec.variants

# ----------------------------------------------------------------------------------------
# The elementwise kernel. ``x`` is the (sanitized) logit in the compute dtype, ``t`` the smoothed
# target t', ``a`` the scale α_t · weight · mask, ``g`` an array γ (None for a number, which is
# static: ``gamma`` and its multiply-only ``gamma_int``) and ``pw`` the positive weight π. Every
# quantity below is built from exp(-|x|) with smooth, one-sided pieces, so that autodiff through
# the derivative rule (second derivatives, ``jax.hessian``) stays finite at any logit.
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


def _parts(x: jax.Array, t: jax.Array, pw: jax.Array | None, for_value: bool = False) -> tuple[jax.Array, ...]:
    """σ(x), σ(-x), the cross-entropy, 1-p_t, log(σ(x)σ(-x)) and softplus(∓x), each without cancellation.

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
    sp_neg = l1pe + jnp.where(pos, 0.0, -x)  # softplus(-x) = -log σ(x)
    sp_pos = l1pe + jnp.where(pos, x, 0.0)  # softplus(x) = -log σ(-x)
    if pw is None:
        ce = l1pe + jnp.where(pos, (1.0 - t) * x, -t * x)  # as _cross_entropy
    else:
        ce = pw * t * sp_neg + (1.0 - t) * sp_pos
    q = t * sn + (1.0 - t) * s  # 1 - p_t: a sum of two non-negative terms
    log_s_sn = -2.0 * l1pe - jnp.where(pos, x, -x)  # log σ(x) + log σ(-x) = -2 log1p(e^-|x|) - |x|
    return s, sn, ce, q, log_s_sn, sp_neg, sp_pos


def _log_q(q: jax.Array) -> jax.Array:
    """log(1-p_t), floored at the smallest normal number: finite, so that γ log(1-p_t) is 0 at γ = 0."""
    return jnp.log(jnp.maximum(q, _common.tiny(q.dtype)))


def _log_q_exact(x: jax.Array, t: jax.Array, pw: jax.Array | None) -> jax.Array:
    """log(1-p_t) to its last digits also where p_t is small: log1p(-p_t) there (1-p_t rounds to 1 within p_t,
    and its log would keep only the digits of p_t above that rounding), :func:`_log_q` elsewhere. What dℓ/dγ =
    ℓ log(1-p_t) reads; the modulator's value needs no more than :func:`_log_q`."""
    s, sn, _, q, *_ = _parts(x, t, pw)
    p_t = t * s + (1.0 - t) * sn  # a sum of two non-negative terms
    small = p_t < 0.5
    return jnp.where(small, jnp.log1p(-jnp.where(small, p_t, 0.0)), _log_q(q))


def _value(x: jax.Array, t: jax.Array, pw: jax.Array | None, gamma: float | jax.Array,
           gamma_int: int | None) -> jax.Array:
    """The unscaled elementwise loss (1-p_t)^γ · ce."""
    _, _, ce, q, *_ = _parts(x, t, pw, for_value=True)
    if gamma_int is not None:
        return _common.power(q, gamma_int) * ce
    return jnp.exp(gamma * _log_q(q)) * ce


def _coefficient(x: jax.Array, t: jax.Array, pw: jax.Array | None, gamma: float | jax.Array,
                 gamma_int: int | None) -> jax.Array:
    """d/dx of the unscaled loss: γ m (1-2t') r ce + m dce/dx, with r = σ(x)σ(-x)/(1-p_t).

    dce/dx = (1-t')σ(x) - π t'σ(-x), exact for hard targets at saturated logits. With an integer γ,
    m·r = q^(γ-1) σ(x)σ(-x): no division, no logarithm. Otherwise
    m·r = exp((γ-1) log q + log σ(x)σ(-x)): no division by q either, so that differentiating this
    coefficient again (``jax.hessian``) never divides by q², which underflows at saturated logits. The small
    factor σ(x)σ(-x) is multiplied by ce (of order |x| there) before any factor below 1: XLA's CPU code flushes
    subnormal intermediates to 0, which would take the γ term of the second derivative with them near
    float32's smallest normal number.
    """
    s, sn, ce, q, log_s_sn, _, _ = _parts(x, t, pw)
    bce = (1.0 - t) * s - (t if pw is None else pw * t) * sn
    if gamma_int == 0:
        return bce
    if gamma_int is not None:
        return _common.power(q, gamma_int - 1) * (gamma_int * (1.0 - 2.0 * t) * (s * sn * ce) + q * bce)
    log_q = _log_q(q)
    m = jnp.exp(gamma * log_q)
    m_r = jnp.exp((gamma - 1.0) * log_q + log_s_sn)
    return gamma * (1.0 - 2.0 * t) * (m_r * ce) + m * bce


def _target_coefficient(x: jax.Array, t: jax.Array, pw: jax.Array | None, gamma: float | jax.Array,
                        gamma_int: int | None) -> jax.Array:
    """d/dt' of the unscaled loss: γ q^(γ-1) (σ(-x) - σ(x)) ce + m dce/dt'.

    dce/dt' = π softplus(-x) - softplus(x) (= -x when π = 1). ce/q stays bounded where q underflows
    (both vanish together at saturated hard targets), and q^(γ-1) ce is computed as a product of
    finite numbers, q floored at the smallest normal number.
    """
    s, sn, ce, q, _, sp_neg, sp_pos = _parts(x, t, pw)
    dce = -x if pw is None else pw * sp_neg - sp_pos
    if gamma_int == 0:
        return dce
    if gamma_int is not None:
        return _common.power(q, gamma_int - 1) * (gamma_int * (sn - s) * ce + q * dce)
    log_q = _log_q(q)
    return gamma * jnp.exp((gamma - 1.0) * log_q) * (sn - s) * ce + jnp.exp(gamma * log_q) * dce


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6))
def _kernel(x: jax.Array, t: jax.Array, a: jax.Array | None, g: jax.Array | None, pw: jax.Array | None,
            gamma: float | None, gamma_int: int | None) -> jax.Array:
    """The elementwise loss ``a · (1-p_t)^γ · ce``, whose derivative wrt x is ``a · _coefficient``."""
    # gamma is a number whenever g is None
    value = _value(x, t, pw, gamma if g is None else g, gamma_int)  # type: ignore[arg-type]
    value = value if a is None else a * value
    # Returns x where x is NaN (where the loss is NaN anyway): a select at the root keeps XLA from
    # splitting this elementwise pass across the reduction that follows it, which would keep
    # several input-sized intermediates alive.
    return jnp.where(jnp.isnan(x), x, value)


def _kernel_jvp(gamma, gamma_int, primals, tangents):
    """Closed forms for every input: only the tangents that are perturbed are computed.

    dℓ/dx = a·_coefficient, dℓ/dt' = a·_target_coefficient, dℓ/dγ = ℓ log(1-p_t),
    dℓ/dπ = a m t' softplus(-x) and dℓ/da = ℓ/a (the unscaled loss).
    """
    x, t, a, g, pw = primals
    dx, dt, da, dg, dpw = tangents
    gam = gamma if g is None else g
    out = _kernel(x, t, a, g, pw, gamma, gamma_int)
    terms = []
    if _common.perturbed(dx):
        terms.append(_coefficient(x, t, pw, gam, gamma_int) * dx)
    if _common.perturbed(dt):
        terms.append(_target_coefficient(x, t, pw, gam, gamma_int) * dt)
    unscaled = None
    if _common.perturbed(dg) or _common.perturbed(da):
        unscaled = _kernel(x, t, None, g, pw, gamma, gamma_int)
    if _common.perturbed(dg):
        terms.append(unscaled * _log_q_exact(x, t, pw) * dg)
    if _common.perturbed(dpw):
        _, _, _, q, _, sp_neg, _ = _parts(x, t, pw)
        m = _common.power(q, gamma_int) if gamma_int is not None else jnp.exp(gam * _log_q(q))
        terms.append(m * t * sp_neg * dpw)
    d = functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(out)
    if a is not None:
        d = a * d
    if _common.perturbed(da):
        d = d + unscaled * da
    return out, d


_kernel.defjvp(_kernel_jvp, symbolic_zeros=True)


# ----------------------------------------------------------------------------------------
# The public function.
# ----------------------------------------------------------------------------------------


def sigmoid_focal_loss(
    logits: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    gamma: jax.typing.ArrayLike = focal_spec.GAMMA,
    alpha: jax.typing.ArrayLike | None = focal_spec.ALPHA,
    weight: jax.typing.ArrayLike | None = None,
    pos_weight: jax.typing.ArrayLike | None = None,
    label_smoothing: jax.typing.ArrayLike = focal_spec.LABEL_SMOOTHING,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = focal_spec.REDUCTION,
    axis_name: Hashable | None = None,
    poly1: float = 0.0,
    normalized: bool = False,
    reduced_threshold: float | None = None,
) -> jax.Array:
    r"""Sigmoid focal loss for binary and multi-label classification (Lin et al. 2017).

    Every element is an independent binary prediction. With t' the smoothed target, σ the
    sigmoid and π the positive weight (1 when ``pos_weight`` is None):

    .. math::
        t' = t(1-ε) + ε/2, \quad
        ce = -π t' \log σ(x) - (1-t') \log σ(-x), \quad
        1-p_t = t' σ(-x) + (1-t') σ(x),

    .. math::
        \ell = α_t \cdot w \cdot [(1-p_t)^γ \cdot ce + ε_1 (1-p_t)^{γ+1}], \quad α_t = α t' + (1-α)(1-t'),

    with ε₁ = ``poly1`` (Poly-1; 0 by default). The focal family's options of
    :mod:`focal_spec.variants` change the modulator m = (1-p_t)^γ: ``reduced_threshold`` = th makes it 1
    where p_t < th and ((1-p_t)/th)^γ elsewhere (the reduced focal loss); a
    :class:`focal_spec.GammaSchedule` ``gamma`` picks γ per element from the detached p_t
    (``focal_spec.FLSD_53``: 5 where p_t < 0.2, else 3); ``normalized=True`` divides every element's
    loss by Σ m over the counted elements (m with its gradient) before ``reduction`` applies, so that
    ``reduction="sum"`` gives Σℓ / Σm, the mean cross-entropy at γ = 0.

    With ``gamma=0`` and no ``alpha`` this is the binary cross-entropy
    (``F.binary_cross_entropy_with_logits``, ``pos_weight`` included), in value and gradient.
    Called as ``sigmoid_focal_loss(x, t, alpha=a, gamma=g, reduction="none")`` it equals
    ``optax.sigmoid_focal_loss(x, t, alpha=a, gamma=g)``.

    Gradients flow to every floating input: ``logits``, ``targets``, ``gamma``, ``alpha``,
    ``weight``, ``pos_weight`` and ``label_smoothing``, from closed forms in a ``jax.custom_jvp``
    (dℓ/dγ = ℓ log(1-p_t), dℓ/dt' and dℓ/dπ) and plain autodiff of the per-element scale, so
    ``jax.grad``, ``jax.jvp``, ``jax.vmap``, ``jax.hessian``, ``jax.checkpoint`` and
    ``lax.scan`` all apply. Only the derivatives that a transform asks for are computed. With any of
    ``poly1``, ``normalized``, ``reduced_threshold`` or a schedule ``gamma`` the loss is instead one
    smooth formula (log-sigmoid pieces, powers as products or exp(k log(1-p_t)), every branch that a
    threshold discards finite) differentiated by plain autodiff, with the same transforms and finite
    values, gradients and Hessians at any logit; the defaults keep the closed-form path above.

    ``gamma``, ``alpha`` and ``label_smoothing`` may be Python numbers, concrete arrays (JAX or
    NumPy) or traced arrays (arguments of a ``jit``-ed function, ``vmap``-ed, differentiated).
    Concrete values are range-checked (a concrete JAX array is read back to the host for it);
    traced ones are checked by shape only, and a traced value out of range gives a meaningless
    loss rather than an error. A whole-number ``gamma`` known when the loss is traced (a number, or
    a concrete 0-d array) up to 8 uses multiplications only; an array or traced ``gamma`` takes the
    general path ``exp(γ log(1-p_t))``, with ``1-p_t`` floored at the smallest normal number:
    finite values, gradients and Hessians at any logit, the exact cross-entropy gradient at
    γ = 0, and a finite dℓ/dγ.

    Args:
      logits: floating array of any shape (float16, bfloat16, float32 or float64), or anything
        ``jnp.asarray`` accepts (NumPy arrays, lists, numbers). Half precision is computed in
        float32 and the result returned in the logits' dtype.
      targets: probabilities in [0, 1] (soft or hard), floating, integer or boolean, with a
        shape that broadcasts to ``logits``. Cast to the compute dtype, never to a half dtype.
        A target outside [0, 1] at a counted element (255 in a uint8 mask, say) cannot raise
        under ``jit``: that element's loss is NaN. Mask such elements with ``where``.
      gamma: focusing parameter γ >= 0: a number, an array broadcasting to ``logits`` (one γ
        per class, for example), or a :class:`focal_spec.GammaSchedule` (static: hashable, a
        compile-time constant under ``jit``), which picks γ per element from the detached p_t.
      alpha: None (no class balance), a number in [0, 1], or an array broadcasting to ``logits``
        (one alpha per class, for example).
      weight: optional array broadcasting to ``logits``; multiplies the elementwise loss.
      pos_weight: optional array broadcasting to ``logits`` (typically one per class): the weight
        π of the positive term of the cross-entropy, as in
        ``F.binary_cross_entropy_with_logits``. The modulator and α_t are unchanged.
      label_smoothing: ε in [0, 1] (0-d); targets become t(1-ε) + ε/2.
      where: optional boolean array broadcasting to ``logits``. Elements where it is False
        contribute 0, are not counted by the mean, and get an exactly zero gradient, whatever
        their logits (NaN and inf included) and targets hold.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      axis_name: inside ``shard_map`` or ``pmap``, the name of the mapped axis: the sum and the
        number of counted elements are ``psum``-ed over it, which makes ``"mean"`` the exact
        global mean (and ``"sum"`` the global sum). Ignored for ``"none"``, except that with
        ``normalized=True`` the normalizer Σ m is ``psum``-ed over it for every reduction.
      poly1: ε₁ of Poly-1 (Leng et al. 2022), a finite Python number (negative values allowed):
        adds α_t · w · ε₁ (1-p_t)^(γ+1) to each element's loss. 0 (the default) is the focal loss.
      normalized: a Python bool. True divides each element's loss by Σ m, the sum of the
        modulators over counted elements (0 everywhere when Σ m is 0); ``reduction`` then applies
        to the quotients. A counted target outside [0, 1] then makes every element NaN.
      reduced_threshold: None (off), or a Python number th in (0, 1]: the modulator is 1 where
        p_t < th and ((1-p_t)/th)^γ elsewhere (the reduced focal loss); th = 1 is the
        cross-entropy. The ε₁ term of ``poly1`` keeps its (1-p_t)^(γ+1). p_t < th (and a
        schedule's p_t >= threshold) is decided as 1-p_t > 1-th on the cancellation-free 1-p_t, so
        th = 1 gives the cross-entropy wherever 1-p_t has not underflowed.

    Returns:
      ``"none"``: the elementwise loss, of the logits' shape. ``"sum"``: a scalar.
      ``"mean"``: a scalar, the sum over counted elements divided by their number (0 when
      nothing is counted). In the logits' dtype.

    Raises:
      TypeError: non-floating logits, targets that are not floating, integer or boolean, a
        ``where`` that is not boolean, or an option of the wrong type (``gamma=None``, a string,
        ``normalized`` that is not a bool, a traced ``poly1`` or ``reduced_threshold``).
      ValueError: a concrete option out of range (a non-finite ``poly1``, a ``reduced_threshold``
        outside (0, 1], 0 included), an unknown reduction, or a shape of ``targets``, ``gamma``,
        ``alpha``, ``weight``, ``pos_weight`` or ``where`` that does not broadcast to the logits.

    Examples:
      >>> import jax
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
      >>> step = jax.jit(jax.grad(lambda g: focal_jax.sigmoid_focal_loss(logits, targets, gamma=g)))
      >>> print(f"{step(2.0):.4f}")  # dℓ/dγ, compiled once for every γ
      -0.0867
      >>> import focal_spec
      >>> print(f"{focal_jax.sigmoid_focal_loss(logits, targets, gamma=focal_spec.FLSD_53, poly1=1.0):.4f}")
      0.8837
      >>> ce = focal_jax.sigmoid_focal_loss(logits, targets, gamma=0.0)
      >>> nfl = focal_jax.sigmoid_focal_loss(logits, targets, gamma=0.0, normalized=True, reduction="sum")
      >>> print(f"{ce:.4f} {nfl:.4f}")  # normalized at γ = 0: the mean cross-entropy
      1.1157 1.1157

    References:
      Lin et al., `Focal Loss for Dense Object Detection <https://arxiv.org/abs/1708.02002>`_, 2017.
    """
    schedule = gamma if isinstance(gamma, _variants.GammaSchedule) else None
    eps1 = _variants.check_poly1(poly1)
    normalized = _variants.check_normalized(normalized)
    th = _variants.check_reduced_threshold(reduced_threshold)
    logits = _common.as_array(logits)
    targets = _common.as_array(targets, "targets")
    opts = focal_spec.sigmoid_options(
        logits.shape, logits.dtype, targets.shape, targets.dtype,
        gamma=0.0 if schedule is not None else _common.host_value(gamma),
        alpha=_common.host_value(alpha), weight_shape=_common.shape_of(weight),
        label_smoothing=_common.host_value(label_smoothing), where_shape=_common.shape_of(where),
        reduction=reduction, where_dtype=_common.dtype_of(where), pos_weight_shape=_common.shape_of(pos_weight),
        weight=_common.host_value(weight), pos_weight=_common.host_value(pos_weight),
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
    if targets.dtype != jnp.bool_:
        # cannot raise under jit: a counted target outside [0, 1] makes that element's loss NaN
        t = jnp.where((t >= 0) & (t <= 1), t, jnp.full((), jnp.nan, cdt))
    eps: float | jax.Array | None = opts.label_smoothing
    if eps is None:  # traced: applied whatever its value
        eps = jnp.asarray(label_smoothing, cdt)
        t = t * (1.0 - eps) + eps / 2.0
    elif eps:
        t = t * (1.0 - eps) + eps / 2.0
    scale: jax.Array | None = None
    if opts.alpha is not None:
        a = opts.alpha if isinstance(opts.alpha, float) else jnp.asarray(alpha, cdt)
        scale = a * t + (1.0 - a) * (1.0 - t)
    if weight is not None:
        w = jnp.asarray(weight, cdt)
        scale = w if scale is None else scale * w
    if mask is not None:
        scale = mask.astype(cdt) if scale is None else jnp.where(mask, scale, jnp.zeros_like(scale))
    if scale is not None:
        scale = jnp.broadcast_to(scale, shape)
    g = None
    if opts.gamma is None:  # an array γ, concrete or traced: the general path
        g = jnp.broadcast_to(jnp.asarray(gamma, cdt), shape)
        if mask is not None:
            g = jnp.where(mask, g, jnp.zeros_like(g))
    pw = None
    if pos_weight is not None:
        pw = jnp.broadcast_to(jnp.asarray(pos_weight, cdt), shape)
        if mask is not None:
            pw = jnp.where(mask, pw, jnp.ones_like(pw))
    if schedule is None and not eps1 and not normalized and th is None:
        loss = _kernel(x, t, scale, g, pw, opts.gamma, opts.gamma_int)
    else:  # the variants: one smooth formula, differentiated by plain autodiff
        gam = schedule if schedule is not None else opts.gamma if g is None else g
        # gam is never None: opts.gamma is a number whenever g is None
        loss, m = _family.focal_variant(x, t, pw=pw, gamma=gam, poly1=eps1, reduced_threshold=th)  # type: ignore[arg-type]
        if scale is not None:
            loss = loss * scale
        if normalized:  # ℓ / Σ m over counted elements (and over the devices of axis_name), 0 when Σ m is 0
            z = jnp.sum(m if mask is None else jnp.where(mask, m, jnp.zeros_like(m)))
            if axis_name is not None:
                z = jax.lax.psum(z, axis_name)
            nothing = z == 0
            loss = jnp.where(nothing, jnp.zeros_like(loss), loss / jnp.where(nothing, jnp.ones_like(z), z))
    count = logits.size if mask is None else jnp.sum(mask, dtype=cdt)
    out = _distributed.reduce_loss(loss, opts.reduction, count, axis_name)
    return out.astype(logits.dtype)
