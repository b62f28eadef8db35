"""The focal family for JAX: asymmetric, quality focal and varifocal losses, and class-balanced weights.

Every variant is one elementwise formula of a sanitized logit x and target t (see
:mod:`focal_spec._variants` for the definitions). Everything else is shared by :func:`_family_loss`:
validation by :func:`focal_spec.family_options`, the compute dtype, masking before any math, the
out-of-range target rule, label smoothing, ``weight`` and the reduction. Adding a variant means
writing its elementwise formula and a public function that names its options. :func:`focal_variant`
is the elementwise formula of :func:`focal_jax.sigmoid_focal_loss`'s own options (``poly1``,
``reduced_threshold``, a :class:`focal_spec.GammaSchedule`, and the modulator ``normalized`` divides by).

The formulas are written for plain autodiff: every quantity is built from e = exp(-|x|) with smooth
one-sided pieces, each power is a product or ``exp(k · log u)`` of a log-space ``u``, and every
branch that a ``where`` leaves unselected is itself finite, so values, gradients and Hessians stay
finite at any logit and for any exponent, 0 and fractional ones included. ASL and QFL give their
derivatives in closed form (a ``custom_jvp``, itself written the same way, so ``grad``, ``jacfwd``,
``hessian`` and ``vmap`` still apply), recomputed by the backward pass under ``jax.checkpoint``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

import focal_spec
from focal_jax import _common, _distributed

_variants = focal_spec.variants

# ----------------------------------------------------------------------------------------
# Elementwise pieces.
# ----------------------------------------------------------------------------------------


class _Sigmoid(NamedTuple):
    s: jax.Array  # σ(x)
    sn: jax.Array  # σ(-x) = 1 - σ(x)
    sp_neg: jax.Array  # softplus(-x) = -log σ(x)
    sp_pos: jax.Array  # softplus(x) = -log σ(-x)


def _sigmoid(x: jax.Array) -> _Sigmoid:
    """σ(±x) and -log σ(±x) from e = exp(-|x|), each without cancellation and with accurate derivatives
    (exp(-|x|) is spelled per side so that its derivative at 0 is one-sided, not 0)."""
    pos = x >= 0
    e = jnp.exp(jnp.where(pos, -x, x))
    inv = 1.0 / (1.0 + e)
    ei = e * inv
    l1pe = jnp.log1p(e)
    return _Sigmoid(jnp.where(pos, inv, ei), jnp.where(pos, ei, inv), l1pe + jnp.where(pos, 0.0, -x),
                    l1pe + jnp.where(pos, x, 0.0))


def _power(u: jax.Array, log_u: Callable[[], jax.Array], k: float) -> jax.Array | float:
    """u^k for u in [0, 1]: 1 at k = 0 (no 0^0), products for a whole k up to 8, else exp(k log u)."""
    if k == 0.0:
        return 1.0
    if float(k).is_integer() and k <= 8:
        return _common.power(u, int(k))
    return jnp.exp(k * log_u())


def _cross_entropy(p: _Sigmoid, t: jax.Array, pw: jax.Array | None = None) -> jax.Array:
    """-π t log σ(x) - (1-t) log σ(-x): two non-negative terms for t in [0, 1] (π = ``pw``, 1 when None)."""
    return (t if pw is None else pw * t) * p.sp_neg + (1.0 - t) * p.sp_pos


def _log_sided(p: _Sigmoid, t: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log u for a u that is σ(-x) at t = 1 and σ(x) at t = 0 (1 - p_t, or |t - σ(x)|): -softplus(±x) at
    hard targets (smooth at any logit), log u floored at the smallest normal number elsewhere. Also returns
    u as that soft branch sees it (1 at hard targets)."""
    one, zero = t == 1, t == 0
    soft_u = jnp.where(one | zero, 1.0, u)
    log_u = jnp.where(one, -p.sp_pos, jnp.where(zero, -p.sp_neg, jnp.log(jnp.maximum(soft_u, _common.tiny(u.dtype)))))
    return log_u, soft_u


# ----------------------------------------------------------------------------------------
# ASL and QFL with closed-form derivatives. One function of (x, t) gives the elementwise loss and
# its partial derivatives in x and t; ``_closed_form`` makes these its JVP, and ``jax.checkpoint``
# has the backward pass recompute them from x and t. Under jit the forward pass is then one fused
# reduction and the backward pass one fused loop, instead of the many intermediates that autodiff
# of the formula writes out. The derivatives are built like the formulas (smooth pieces, finite
# unselected branches), so forward mode, Hessians and vmap differentiate them in turn. Notation:
# s = σ(x), s̄ = σ(-x), a = softplus(-x) = -log s, b = softplus(x) = -log s̄.
# ----------------------------------------------------------------------------------------


@jax.custom_jvp
def _logistic(x: jax.Array) -> jax.Array:
    """σ(x) = 1 / (1 + e^-x), a few ulps from exact at any logit; its derivative σ(x) σ(-x) is formed from
    both sides (autodiff of the formula gives σ(x)(1 - σ(x)), which cancels for a large x)."""
    return 1.0 / (1.0 + jnp.exp(-x))


@_logistic.defjvp
def _logistic_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    (x,), (dx,) = primals, tangents
    s = _logistic(x)
    return s, s * _logistic(-x) * dx


def _sides(x: jax.Array) -> _Sigmoid:
    """s, s̄, a, b from two sigmoids and one logarithm: log(1 + e^-|x|) = -log1p(-min(s, s̄)), then
    a = that + max(-x, 0) and b = that + max(x, 0), sums of terms >= 0."""
    s, sn = _logistic(x), _logistic(-x)
    lg = -jnp.log1p(-jnp.minimum(s, sn))
    return _Sigmoid(s, sn, lg + jnp.maximum(-x, 0.0), lg + jnp.maximum(x, 0.0))


_Parts = tuple[jax.Array, jax.Array, jax.Array]  # (ℓ, ∂ℓ/∂x, ∂ℓ/∂t), elementwise


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _closed_form(parts: Callable[[jax.Array, jax.Array], _Parts], x: jax.Array, t: jax.Array) -> jax.Array:
    return parts(x, t)[0]


def _closed_form_jvp(parts: Callable[[jax.Array, jax.Array], _Parts], primals: tuple[jax.Array, jax.Array],
                     tangents: tuple[Any, Any]) -> tuple[jax.Array, jax.Array]:
    x, t = primals
    dx, dt = tangents
    value, d_x, d_t = parts(x, t)
    out = None if isinstance(dx, SymbolicZero) else d_x * dx
    if not isinstance(dt, SymbolicZero):
        out = d_t * dt if out is None else out + d_t * dt
    return value, jnp.zeros_like(value) if out is None else out


_closed_form.defjvp(_closed_form_jvp, symbolic_zeros=True)


def _fused(parts: Callable[..., _Parts], x: jax.Array, t: jax.Array, **params: float) -> jax.Array:
    """The loss of ``parts`` with its closed-form derivatives, recomputed in the backward pass."""
    return jax.checkpoint(functools.partial(_closed_form, functools.partial(parts, **params)))(x, t)


def _whole(k: float) -> int | None:
    """A whole exponent up to 8 (computed by products), else None."""
    return int(k) if float(k).is_integer() and 0 <= k <= 8 else None


def _asymmetric_parts(x: jax.Array, t: jax.Array, *, gamma_pos: float, gamma_neg: float, clip: float) -> _Parts:
    """ℓ = t pos + (1-t) neg and its derivatives, with
    pos = s̄^γ₊ a,  ∂pos/∂x = -s̄^γ₊ (γ₊ s a + s̄);
    neg = p_m^γ₋ ν, p_m = max(s - m, 0), ν = -log(1 - p_m),  ∂neg/∂x = s s̄ p_m^(γ₋-1) (γ₋ ν + p_m / (1 - p_m))
    (m = 0: neg = s^γ₋ b, ∂neg/∂x = s^γ₋ (γ₋ s̄ b + s))."""
    s, sn, a, b = _sides(x)
    if gamma_pos == 0.0:
        pos, d_pos = a, -sn
    else:
        mp = _power(sn, lambda: -b, gamma_pos)
        pos, d_pos = mp * a, -mp * (gamma_pos * s * a + sn)
    if clip == 0.0:
        ms = _power(s, lambda: -a, gamma_neg)
        neg, d_neg = ms * b, ms * (gamma_neg * sn * b + s)
    else:
        active = s > clip
        pm = jnp.maximum(s - clip, 0.0)
        omp = jnp.minimum(sn + clip, 1.0)  # 1 - p_m as a sum: the difference loses the digits of a small s̄ + m
        # -log1p(-p_m) below p_m = 1/2 (where 1 - p_m is exact), -log of the sum above
        nu = jnp.where(pm < 0.5, -jnp.log1p(-jnp.minimum(pm, 0.5)), -jnp.log(omp))
        if gamma_neg == 0.0:
            neg, d_neg = nu, jnp.where(active, s * sn / omp, 0.0)
        else:
            k = _whole(gamma_neg)
            if k is not None:
                m1 = _common.power(pm, k - 1)
            else:  # p_m^(γ₋-1) in log space, 0 where the margin is inactive (where log sees 1)
                m1 = jnp.where(active, jnp.exp((gamma_neg - 1.0) * jnp.log(jnp.where(active, pm, 1.0))), 0.0)
            neg, d_neg = m1 * pm * nu, s * sn * m1 * (gamma_neg * nu + pm / omp)
    return t * pos + (1.0 - t) * neg, t * d_pos + (1.0 - t) * d_neg, pos - neg


def _quality_focal_parts(x: jax.Array, t: jax.Array, *, beta: float) -> _Parts:
    """ℓ = |d|^β ce with d = t - s = t s̄ - (1-t) s and ce = t a + (1-t) b:
    ∂ℓ/∂x = -(β |d|^(β-1) sign(d) s s̄ ce + |d|^β d)  (two terms of one sign),
    ∂ℓ/∂t = β |d|^(β-1) sign(d) (s + s̄) ce - |d|^β x."""
    s, sn, a, b = _sides(x)
    d = t * sn - (1.0 - t) * s
    ce = t * a + (1.0 - t) * b
    if beta == 0.0:
        return ce, -d, -x
    k = _whole(beta)
    mod: jax.Array | float
    if k == 1:
        mod, d_mod = jnp.abs(d), jnp.sign(d)
    elif k is not None:  # even powers of d itself, odd ones of |d|
        u = d if k % 2 == 0 else jnp.abs(d)
        mod, d_mod = _common.power(u, k), k * d * _common.power(u, k - 2)
    else:
        # log|d|: -softplus(±x) for hard targets (smooth at any logit); for soft ones log|d| floored at the
        # smallest normal number, and |d|^β = 0 with a zero derivative where d = 0
        one, zero = t == 1, t == 0
        soft = jnp.where(one | zero, 1.0, jnp.abs(d))
        log_d = jnp.where(one, -b, jnp.where(zero, -a, jnp.log(jnp.maximum(soft, _common.tiny(d.dtype)))))
        live = soft != 0
        mod = jnp.where(live, jnp.exp(beta * log_d), 0.0)
        d_mod = jnp.where(live, beta * jnp.sign(d) * jnp.exp((beta - 1.0) * log_d), 0.0)
    return mod * ce, -(d_mod * s * sn * ce + mod * d), d_mod * (s + sn) * ce - mod * x


def _asymmetric(x: jax.Array, t: jax.Array, *, gamma_pos: float, gamma_neg: float, clip: float) -> jax.Array:
    """t σ(-x)^γ₊ (-log σ(x)) + (1-t) p_m^γ₋ (-log(1-p_m)), p_m = max(σ(x) - m, 0)."""
    return _fused(_asymmetric_parts, x, t, gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip)


def _quality_focal(x: jax.Array, t: jax.Array, *, beta: float) -> jax.Array:
    """|t - σ(x)|^β ce(x, t), with t - σ(x) = t σ(-x) - (1-t) σ(x) (exact for hard targets)."""
    return _fused(_quality_focal_parts, x, t, beta=beta)


def _varifocal(x: jax.Array, t: jax.Array, *, alpha: float, gamma: float) -> jax.Array:
    """ce(x, q) · (q where q > 0, else α σ(x)^γ)."""
    p = _sigmoid(x)
    return jnp.where(t > 0, t, alpha * _power(p.s, lambda: -p.sp_neg, gamma)) * _cross_entropy(p, t)


# ----------------------------------------------------------------------------------------
# The focal loss's own variants (Poly-1, reduced, sample-dependent γ, and the modulator that the
# normalized loss divides by), for ``focal_jax.sigmoid_focal_loss``'s options.
# ----------------------------------------------------------------------------------------


class _Scheduled(NamedTuple):
    """A :class:`focal_spec.GammaSchedule` picked per element: ``above[i]`` is p_t >= thresholds[i]
    (1 - p_t <= 1 - thresholds[i])."""

    above: tuple[jax.Array, ...]
    values: tuple[float, ...]


def _focal_power(u: jax.Array, log_u: jax.Array, gamma: float | jax.Array | _Scheduled,
                 extra: float = 0.0) -> jax.Array | float:
    """u^(γ + extra) for a Python number γ (as :func:`_power`), a per-element schedule (one :func:`_power` per
    value, selected: every branch is finite), or an array γ (exp((γ + extra) log u), 1 where γ + extra = 0)."""
    if isinstance(gamma, _Scheduled):
        out = _power(u, lambda: log_u, gamma.values[0] + extra)
        for above, v in zip(gamma.above, gamma.values[1:], strict=True):
            out = jnp.where(above, _power(u, lambda: log_u, v + extra), out)
        return out
    if isinstance(gamma, float):
        return _power(u, lambda: log_u, gamma + extra)
    return jnp.exp((gamma + extra) * log_u)


def focal_variant(x: jax.Array, t: jax.Array, *, pw: jax.Array | None,
                  gamma: float | jax.Array | focal_spec.GammaSchedule | _Scheduled, poly1: float,
                  reduced_threshold: float | None) -> tuple[jax.Array, jax.Array]:
    """The unscaled elementwise focal loss with the options of :mod:`focal_spec._variants`, and its modulator:
    (m · ce + ε₁ (1-p_t)^(γ+1), m).

    m = (1-p_t)^γ, or with a reduced threshold th, 1 where p_t < th and ((1-p_t)/th)^γ elsewhere. γ is a
    Python number, an array broadcasting to ``x``, or a :class:`focal_spec.GammaSchedule`, evaluated on the
    detached p_t. 1 - p_t = t σ(-x) + (1-t) σ(x) is a sum of non-negative terms, log(1-p_t) is a
    log-sigmoid at hard targets, and the branch a threshold discards is 1, so values, gradients and
    Hessians are finite at any logit. A comparison p_t < th is made as 1 - p_t > 1 - th, on that sum, so
    that it holds wherever 1 - p_t has not underflowed (th = 1 is the cross-entropy at |x| = 80 too).
    """
    p = _sigmoid(x)
    q = t * p.sn + (1.0 - t) * p.s
    log_q, _ = _log_sided(p, t, q)
    q_d = jax.lax.stop_gradient(q)
    if isinstance(gamma, focal_spec.GammaSchedule):
        gamma = _Scheduled(tuple(q_d <= 1.0 - th for th in gamma.thresholds), gamma.values)
    if reduced_threshold is None:
        m = _focal_power(q, log_q, gamma)
    else:
        below = q_d > 1.0 - reduced_threshold
        u = jnp.where(below, 1.0, q / reduced_threshold)
        log_u = jnp.where(below, 0.0, log_q - math.log(reduced_threshold))
        m = jnp.where(below, 1.0, _focal_power(u, log_u, gamma))
    m = jnp.broadcast_to(m, x.shape)
    loss = m * _cross_entropy(p, t, pw)
    if poly1:
        loss = loss + poly1 * _focal_power(q, log_q, gamma, 1.0)
    return loss, m


# ----------------------------------------------------------------------------------------
# The shared pipeline.
# ----------------------------------------------------------------------------------------


def _family_loss(loss: str, term: Callable[..., jax.Array], logits: jax.typing.ArrayLike,
                 targets: jax.typing.ArrayLike, *, weight: Any, where: Any, reduction: str,
                 axis_name: Hashable | None, label_smoothing: Any = 0.0, **hyper: float) -> jax.Array:
    """Validates, casts, masks, applies ``term`` elementwise, weights and reduces."""
    logits = _common.as_array(logits)
    targets = _common.as_array(targets, "targets")
    opts = focal_spec.family_options(
        loss, logits.shape, logits.dtype, targets.shape, targets.dtype, weight_shape=_common.shape_of(weight),
        where_shape=_common.shape_of(where), where_dtype="bool" if where is None else _common.dtype_of(where),
        reduction=reduction, label_smoothing=_common.host_value(label_smoothing),
        weight=None if weight is None else _common.host_value(weight), **hyper)
    cdt = _common.compute_dtype(logits.dtype)
    shape = logits.shape
    x = logits.astype(cdt)
    t = jnp.broadcast_to(targets.astype(cdt), shape)
    scale = None if weight is None else jnp.broadcast_to(jnp.asarray(weight, cdt), shape)
    count: Any = logits.size
    if where is not None:
        mask = jnp.broadcast_to(jnp.asarray(where, bool), shape)
        x = jnp.where(mask, x, jnp.zeros_like(x))  # masked garbage never reaches the math
        t = jnp.where(mask, t, jnp.zeros_like(t))
        scale = mask.astype(cdt) if scale is None else jnp.where(mask, scale, jnp.zeros_like(scale))
        count = jnp.sum(mask, dtype=cdt)
    # cannot raise under jit: a counted target outside [0, 1] gives a NaN loss. Selected on the loss rather
    # than on the targets, so that the forward and backward passes each read the targets themselves (XLA
    # would otherwise write the checked targets out and run both passes from that copy, about twice slower).
    ok = None if targets.dtype == jnp.bool_ else (t >= 0) & (t <= 1)
    eps: Any = opts.label_smoothing
    if eps is None:  # traced: applied whatever its value
        eps = jnp.asarray(label_smoothing, cdt)
    if not isinstance(eps, float) or eps != 0.0:
        t = t * (1.0 - eps) + eps / 2.0
    out = term(x, t, **dict(opts.params))
    if ok is not None:
        out = jnp.where(ok, out, jnp.full((), jnp.nan, out.dtype))
    if scale is not None:
        out = out * scale
    return _distributed.reduce_loss(out, opts.reduction, count, axis_name).astype(logits.dtype)


# ----------------------------------------------------------------------------------------
# The public functions.
# ----------------------------------------------------------------------------------------

_SHARED_ARGS = """
      weight: optional array broadcasting to ``logits`` (one weight per class, for example, such as
        :func:`class_balanced_weights`); multiplies the elementwise loss.
      where: optional boolean array broadcasting to ``logits``. Elements where it is False contribute
        0, are not counted by the mean, and get an exactly zero gradient, whatever their logits (NaN
        and inf included) and targets hold.
      reduction: ``"none"``, ``"mean"`` (the sum over the number of counted elements; 0 when nothing
        is counted) or ``"sum"``.
      axis_name: inside ``shard_map`` or ``pmap``, the name of the mapped axis: the sum and the number
        of counted elements are ``psum``-ed over it (the exact global mean). Ignored for ``"none"``."""

_SHARED_RETURNS = """
    Returns:
      ``"none"``: the elementwise loss, of the logits' shape. ``"mean"`` and ``"sum"``: a scalar. In the
      logits' dtype (half precision is computed in float32).

    Raises:
      TypeError: non-floating logits, targets that are not floating, integer or boolean, a ``where``
        that is not boolean, or a hyperparameter that is not a number.
      ValueError: a hyperparameter out of range, an unknown reduction, or a shape of ``targets``,
        ``weight`` or ``where`` that does not broadcast to the logits."""



def _shared_doc(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Fills in the Args and Returns/Raises text that every variant shares."""
    fn.__doc__ = (fn.__doc__ or "").replace("      <shared-args>\n", _SHARED_ARGS.lstrip("\n") + "\n").replace(
        "    <shared-returns>\n", _SHARED_RETURNS.lstrip("\n") + "\n")
    return fn


@_shared_doc
def asymmetric_loss(
    logits: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    gamma_pos: float = _variants.ASL_GAMMA_POS,
    gamma_neg: float = _variants.ASL_GAMMA_NEG,
    clip: float = _variants.ASL_CLIP,
    weight: jax.typing.ArrayLike | None = None,
    label_smoothing: jax.typing.ArrayLike = focal_spec.LABEL_SMOOTHING,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = focal_spec.REDUCTION,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Asymmetric loss (ASL) for multi-label classification (Ridnik et al. 2021).

    Every element is an independent binary prediction. Positives and negatives get their own
    focusing exponent, and the negatives' probability is shifted by the margin m = ``clip``, which
    discards easy negatives (σ(x) <= m) entirely:

    .. math::
        p_m = \max(σ(x) - m, 0), \quad
        \ell = w \, [t' \, σ(-x)^{γ_+} (-\log σ(x)) + (1-t') \, p_m^{γ_-} (-\log(1 - p_m))],

    with t' = t(1-ε) + ε/2. With ``gamma_pos == gamma_neg == γ`` and ``clip=0`` it is
    :func:`focal_jax.sigmoid_focal_loss` with that γ for hard targets. The logarithms are taken
    without cancellation (log-sigmoid, and 1 - p_m = min(σ(-x) + m, 1) as a sum), so the loss keeps
    its digits where a clamp of the probabilities would not. Differentiable by plain autodiff
    (``grad``, ``hessian``, ``vmap``, ``jit``), with finite values, gradients and Hessians at any
    logit.

    Args:
      logits: floating array of any shape (float16, bfloat16, float32 or float64).
      targets: targets in [0, 1] (multi-hot or soft) broadcasting to ``logits``; floating, integer or
        boolean. A target outside [0, 1] at a counted element gives a NaN loss there.
      gamma_pos: focusing exponent γ₊ >= 0 of the positive term (a Python number).
      gamma_neg: focusing exponent γ₋ >= 0 of the negative term (a Python number).
      clip: probability margin m in [0, 1] of the negative term; 0 turns it off.
      label_smoothing: ε in [0, 1] (0-d); targets become t(1-ε) + ε/2.
      <shared-args>

    <shared-returns>

    Examples:
      >>> import jax.numpy as jnp
      >>> from focal_jax._family import asymmetric_loss
      >>> logits = jnp.array([[2.0, -1.0, 0.5], [-3.0, 1.5, -4.0]])
      >>> targets = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> print(f"{asymmetric_loss(logits, targets, reduction='sum'):.6f}")
      0.420162

    References:
      Ridnik et al., `Asymmetric Loss For Multi-Label Classification <https://arxiv.org/abs/2009.14119>`_,
      ICCV 2021.
    """
    return _family_loss("asymmetric", _asymmetric, logits, targets, weight=weight, where=where,
                        reduction=reduction, axis_name=axis_name, label_smoothing=label_smoothing,
                        gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip)


@_shared_doc
def quality_focal_loss(
    logits: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    beta: float = _variants.QFL_BETA,
    weight: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = focal_spec.REDUCTION,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Quality focal loss (QFL) of Generalized Focal Loss (Li et al. 2020).

    A focal loss for soft targets (an IoU-aware classification score, say): the modulator is the
    distance between the target and the prediction,

    .. math::
        \ell = w \, |t - σ(x)|^β \, [-t \log σ(x) - (1-t) \log σ(-x)].

    With hard targets and β = γ it is :func:`focal_jax.sigmoid_focal_loss` without ``alpha``. The
    difference t - σ(x) is formed as t σ(-x) - (1-t) σ(x), exact for hard targets at saturated logits.
    |t - σ(x)|^β is 0 where t = σ(x) exactly, with a zero gradient there.

    Args:
      logits: floating array of any shape (float16, bfloat16, float32 or float64).
      targets: soft targets in [0, 1] broadcasting to ``logits``; floating, integer or boolean. A
        target outside [0, 1] at a counted element gives a NaN loss there.
      beta: the modulator's exponent β >= 0 (a Python number); 0 is the binary cross-entropy.
      <shared-args>

    <shared-returns>

    Examples:
      >>> import jax.numpy as jnp
      >>> from focal_jax._family import quality_focal_loss
      >>> logits = jnp.array([[2.0, -1.0, 0.5], [-3.0, 1.5, -4.0]])
      >>> targets = jnp.array([[0.9, 0.0, 0.0], [0.0, 0.6, 0.0]])
      >>> print(f"{quality_focal_loss(logits, targets):.6f}")
      0.073041

    References:
      Li et al., `Generalized Focal Loss <https://arxiv.org/abs/2006.04388>`_, NeurIPS 2020.
    """
    return _family_loss("quality_focal", _quality_focal, logits, targets, weight=weight, where=where,
                        reduction=reduction, axis_name=axis_name, beta=beta)


@_shared_doc
def varifocal_loss(
    logits: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    alpha: float = _variants.VFL_ALPHA,
    gamma: float = _variants.VFL_GAMMA,
    weight: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = focal_spec.REDUCTION,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Varifocal loss (VFL) of VarifocalNet (Zhang et al. 2021).

    Asymmetric in its targets q (IoU-aware scores): a positive (q > 0) is weighted by its own q, a
    negative (q = 0) is down-weighted as in the focal loss,

    .. math::
        \ell = w \, [-q \log σ(x) - (1-q) \log σ(-x)] \cdot
        \begin{cases} q & q > 0 \\ α σ(x)^γ & q = 0. \end{cases}

    This is mmdetection's ``varifocal_loss`` with ``iou_weighted=True``.

    Args:
      logits: floating array of any shape (float16, bfloat16, float32 or float64).
      targets: target scores q in [0, 1] broadcasting to ``logits`` (0 for negatives); floating,
        integer or boolean. A target outside [0, 1] at a counted element gives a NaN loss there.
      alpha: weight α in [0, 1] of the negatives (a Python number).
      gamma: focusing exponent γ >= 0 of the negatives (a Python number).
      <shared-args>

    <shared-returns>

    Examples:
      >>> import jax.numpy as jnp
      >>> from focal_jax._family import varifocal_loss
      >>> logits = jnp.array([[2.0, -1.0, 0.5], [-3.0, 1.5, -4.0]])
      >>> targets = jnp.array([[0.9, 0.0, 0.0], [0.0, 0.6, 0.0]])
      >>> print(f"{varifocal_loss(logits, targets):.6f}")
      0.179204

    References:
      Zhang et al., `VarifocalNet: An IoU-aware Dense Object Detector <https://arxiv.org/abs/2008.13367>`_,
      CVPR 2021.
    """
    return _family_loss("varifocal", _varifocal, logits, targets, weight=weight, where=where,
                        reduction=reduction, axis_name=axis_name, alpha=alpha, gamma=gamma)


def class_balanced_weights(counts: jax.typing.ArrayLike, *, beta: float = _variants.CLASS_BALANCE_BETA) -> jax.Array:
    r"""Class-balanced weights (Cui et al. 2019) from per-class sample counts, for ``weight=``.

    .. math::
        w_c \propto \frac{1 - β}{1 - β^{n_c}}, \quad \sum_c w_c = C.

    β = 0 gives equal weights, β -> 1 inverse class frequencies. A class with count 0 is weighted as a
    class seen once. Computed on the host (the counts must be concrete, not traced) by
    :func:`focal_spec.class_balanced_weights`.

    Args:
      counts: 1-d array of C class counts >= 0 (integer or floating).
      beta: β in [0, 1].

    Returns:
      A (C,) array: float64 for float64 counts when float64 is enabled, float32 otherwise.

    Raises:
      TypeError: non-numeric counts or beta.
      ValueError: counts that are not a non-empty 1-d array of finite numbers >= 0, or β outside [0, 1].

    Examples:
      >>> import jax.numpy as jnp
      >>> from focal_jax._family import class_balanced_weights
      >>> with jnp.printoptions(precision=4):
      ...     print(class_balanced_weights(jnp.array([900, 90, 10]), beta=0.99))
      [0.2284 0.3836 2.388 ]

    References:
      Cui et al., `Class-Balanced Loss Based on Effective Number of Samples
      <https://arxiv.org/abs/1901.05555>`_, CVPR 2019.
    """
    dtype = _common.dtype_of(counts)
    w = _variants.class_balanced_weights(np.asarray(counts), beta=beta)
    wide = focal_spec.compute_dtype(focal_spec.dtype_name(dtype)) == "float64"
    return jnp.asarray(w, jax.dtypes.canonicalize_dtype(jnp.float64 if wide else jnp.float32))
