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
import numpy as np

import focal_spec
from focal_jax import _common, _distributed, _family


def _log_parts(others: jax.Array, s: jax.Array, z: jax.Array,
               tails: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """log p, log(1-p) and 1-p from ``others`` = S·(1-p), the sum S and z = x - M.

    log(1-p) is floored at log(tiny) where ``others`` is 0 (a single class, or every other class
    underflowed): finite, so that γ log(1-p) is exactly 0 at γ = 0 and dℓ/dγ = ℓ log(1-p) is 0 there.
    Where 1-p < 1/2, log p = log1p(-(1-p)) keeps the digits that z - log S would lose.

    ``tails`` (the labelled class's values, one per position): 1-p and log(1-p) differentiate without
    cancellation where p is small (see :func:`_omp_with_tails`). dℓ/dγ = ℓ log(1-p) takes the value of log(1-p)
    from :func:`_log1mp_of_small_p`: log(others) - log S keeps only the digits of a small p above the rounding
    of 1.
    """
    log_s = jnp.log(s)
    if tails:
        p = jnp.exp(z - log_s)
        omp, log1mp = _omp_with_tails(others, s, p), _log1mp_with_tails(others, s, p)
    else:
        omp, log1mp = others / s, _log1mp(others, s)
    logp = jnp.where(omp < 0.5, jnp.log1p(-omp), z - log_s)
    return logp, log1mp, omp


def _log1mp(others: jax.Array, s: jax.Array) -> jax.Array:
    has_others = others > 0
    floor = math.log(_common.tiny(s.dtype))
    return jnp.where(has_others, jnp.log(jnp.where(has_others, others, 1.0)) - jnp.log(s), floor)


# 1-p and log(1-p) with the values above, and derivatives that keep the digits of a small p: where p <= 1/2,
# others ~ S, and d(others / S) or d(log others - log S) would be the difference of two near-equal terms (a
# Hessian's entries of order p p_k would round to 0); there they are -dp and -dp / (1-p). Only second derivatives
# read these derivatives, so the first derivative's computation is the same as without them.


@jax.custom_jvp
def _omp_with_tails(others: jax.Array, s: jax.Array, p: jax.Array) -> jax.Array:
    del p  # for the derivative only
    return others / s


def _d_omp(others: jax.Array, s: jax.Array, p: jax.Array, d_others: jax.Array, ds: jax.Array,
           dp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """1-p = others / S and its tangent: -dp where p <= 1/2, d(others / S) elsewhere."""
    omp = others / s
    return omp, jnp.where(p <= 0.5, -dp, (d_others - omp * ds) / s)


@_omp_with_tails.defjvp
def _omp_with_tails_jvp(primals, tangents):
    return _d_omp(*primals, *tangents)


@jax.custom_jvp
def _log1mp_with_tails(others: jax.Array, s: jax.Array, p: jax.Array) -> jax.Array:
    del p  # for the derivative only
    return _log1mp(others, s)


@_log1mp_with_tails.defjvp
def _log1mp_with_tails_jvp(primals, tangents):
    others, s, p = primals
    d_others, ds, dp = tangents
    has_others = others > 0
    direct = jnp.where(has_others, d_others / jnp.where(has_others, others, 1.0) - ds / s, 0.0)
    small = p <= 0.5
    return _log1mp(others, s), jnp.where(small, -dp / jnp.where(small, 1.0 - p, 1.0), direct)


def _log1mp_of_small_p(p: jax.Array, log1mp: jax.Array) -> jax.Array:
    """log1p(-p) where p <= 1/2, ``log1mp`` elsewhere."""
    small = p <= 0.5
    return jnp.where(small, jnp.log1p(-jnp.where(small, p, 0.0)), log1mp)


def _modulator_and_kappa(p: jax.Array, logp: jax.Array, log1mp: jax.Array, omp: jax.Array,
                         gamma: float | jax.Array, gamma_int: int | None) -> tuple[jax.Array | float, jax.Array]:
    """m = (1-p)^γ and κ = m (γ p ρ - 1) with ρ = log p / (1-p), so that dℓ/dz_c = -κ_c for ℓ = -m log p.

    ρ tends to -1 as p -> 1 and is set to -1 where 1-p underflows to 0. With an integer γ,
    m ρ = (1-p)^(γ-1) log p needs no division, and log(1-p) is not used at all. ``gamma`` may be an
    array broadcasting to ``p`` (one γ per position or per class).
    """
    if gamma_int == 0:
        return 1.0, -jnp.ones_like(logp)
    if gamma_int is not None:
        m_1 = _common.power(omp, gamma_int - 1)
        return m_1 * omp, gamma_int * p * logp * m_1 - m_1 * omp
    m = jnp.exp(gamma * log1mp)
    # ρ = log1p(-u)/u with u = 1-p; below u = ε^(1/3) its series -1 - u/2 - u²/3 (the next term, u³/4, is below
    # rounding), whose derivatives stay finite where u² underflows (the quotient's would divide by it)
    small = float(np.cbrt(np.finfo(omp.dtype).eps))
    series = -1.0 - omp * (0.5 + omp / 3.0)
    rho = jnp.where(omp < small, series, logp / jnp.where(omp < small, 1.0, omp))
    return m, m * (gamma * p * rho - 1.0)


# ----------------------------------------------------------------------------------------
# Integer labels without smoothing: only the labelled class enters the loss. The labelled logit
# is gathered (``take_along_axis``); no one-hot is built. Masks are applied with integer
# comparisons against the class index, which XLA fuses into the one pass that computes exp.
# ----------------------------------------------------------------------------------------


ROW_MASK_MIN_CLASSES = 128
"""From this many classes, the index kernel masks positions that are not counted with their per-position
flag (measured on XLA's CPU backend: about 10% faster at C = 1000, several times slower at C = 21)."""


def _index_stats(x: jax.Array, code: jax.Array, axis: int, gamma: float | jax.Array,
                 gamma_int: int | None) -> tuple[jax.Array, ...]:
    """The other classes' e_k = exp(x_k - M) (0 at k = y), and per position: S = Σ_k exp(x_k - M),
    Σ_{k≠y} e_k = S (1 - p_y), p_y, -m_y log p_y, κ_y and log(1 - p_y).

    ``code`` is the label y at counted positions and -1 elsewhere. 1 - p_y = Σ_{k≠y} e_k / S is a sum
    over the other classes, never a difference, so it stays exact when p_y rounds to 1. Per-position
    values keep the positions' shape (no size-1 class axis), which XLA vectorizes far better.
    """
    classes = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    code_k = jnp.expand_dims(code, axis)
    counted = code >= 0
    zero = jnp.zeros((), x.dtype)
    # Garbage (NaN, inf) at positions that are not counted never reaches the arithmetic: their row
    # maximum and labelled logit are replaced by 0 before use, and their logits (or x - M) by 0 inside
    # the exp pass ((k | code) < 0 exactly when code = -1).
    # M is differentiated (not a constant): the value is the same, and a second derivative then sees the leading
    # class's e = exp(x - M) = 1 as a constant and S's derivative as a sum over the other classes, without the
    # cancellation p_k - p_k² where a class other than the label dominates
    m_x = jnp.where(counted, jnp.max(x, axis=axis, initial=-jnp.inf), zero)
    m_k = jnp.expand_dims(m_x, axis)
    # x_y - M from the logits themselves (the same subtraction as (x - M)_y): x - M is then read by the exp pass
    # only, and XLA fuses it there instead of writing it out
    x_y = jnp.take_along_axis(x, jnp.expand_dims(jnp.maximum(code, 0), axis), axis=axis, mode="promise_in_bounds")
    z_y = jnp.where(counted, jnp.squeeze(x_y, axis) - m_x, zero)
    if x.shape[axis] >= ROW_MASK_MIN_CLASSES:  # one select per element on a per-position condition
        z = jnp.where(jnp.expand_dims(counted, axis), x - m_k, zero)
    else:  # short rows: XLA's CPU code for a per-position condition over the class axis is slower there
        z = jnp.where((classes | code_k) >= 0, x, zero) - m_k
    e = jnp.where(classes != code_k, jnp.exp(z), zero)
    others = jnp.sum(e, axis=axis)
    s = others + jnp.exp(z_y)
    logp, log1mp, omp = _log_parts(others, s, z_y, tails=True)
    p = jnp.exp(logp)
    m, kappa = _modulator_and_kappa(p, logp, log1mp, omp, gamma, gamma_int)
    return e, s, others, p, -(m * logp), kappa, log1mp


@jax.custom_jvp
def _at_label(a: jax.Array, per_e: jax.Array, others: jax.Array, s: jax.Array, p: jax.Array) -> jax.Array:
    """a (1 - p_y), a = w_y κ_y, as ``per_e`` · ``others`` (per_e = a / S, others = S (1 - p_y)): the first
    derivative's term at the label, the product XLA keeps out of the gradient pass's per-class loop. Its own
    derivative (a second derivative of the loss) is da (1 - p_y) + a d(1 - p_y), with d(1 - p_y) = -dp_y where
    p_y <= 1/2: there others ~ S, and d(others / S) would be the difference of two near-equal terms."""
    del a, s, p  # for the derivative only
    return per_e * others


@_at_label.defjvp
def _at_label_jvp(primals, tangents):
    a, per_e, others, s, p = primals
    da, _, d_others, ds, dp = tangents
    omp, d_omp = _d_omp(others, s, p, d_others, ds, dp)
    return per_e * others, da * omp + a * d_omp


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6))
def _index_kernel(x: jax.Array, code: jax.Array, wy: jax.Array, gy: jax.Array | None, axis: int,
                  gamma: float | None, gamma_int: int | None) -> jax.Array:
    """Per-position loss -w_y (1-p_y)^γ log p_y (``wy`` is w[y], 0 where ``code`` is -1; ``gy`` is γ_y
    per position for an array γ, None for a number ``gamma``)."""
    # gamma is a number whenever gy is None
    return wy * _index_stats(x, code, axis, gamma if gy is None else gy, gamma_int)[4]  # type: ignore[arg-type]


def _index_kernel_jvp(axis, gamma, gamma_int, primals, tangents):
    x, code, wy, gy = primals
    dx, _, dwy, dgy = tangents  # the labels are integers
    e, s, others, p_y, loss, kappa, log1mp = _index_stats(x, code, axis, gamma if gy is None else gy, gamma_int)
    terms = []
    if _common.perturbed(dx):
        # dℓ/dx_k = w_y κ_y (δ_ky - p_k): w_y κ_y (1 - p_y) at k = y, -w_y κ_y e_k / S elsewhere (e_y is 0).
        # e and two numbers per position are all that the backward pass reads. per_e ends in a division,
        # which XLA computes once per position rather than once per class.
        a = wy * kappa
        per_e = a / s
        at_y = jnp.expand_dims(_at_label(a, per_e, others, s, p_y), axis)
        is_y = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis) == jnp.expand_dims(code, axis)
        terms.append(jnp.sum(jnp.where(is_y, at_y, jnp.zeros_like(at_y)) * dx - e * jnp.expand_dims(per_e, axis) * dx,
                             axis=axis))
    if _common.perturbed(dwy):
        terms.append(loss * dwy)  # dℓ/dw_y = -(1-p_y)^γ log p_y
    if _common.perturbed(dgy):
        terms.append(wy * loss * _log1mp_of_small_p(p_y, log1mp) * dgy)  # dℓ/dγ_y = ℓ log(1-p_y)
    d = functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(loss)
    return wy * loss, d


_index_kernel.defjvp(_index_kernel_jvp, symbolic_zeros=True)


# ----------------------------------------------------------------------------------------
# Class weights times probabilities (soft labels, or smoothed integer labels): every class
# enters the loss, each with its own 1 - p_c.
# ----------------------------------------------------------------------------------------


def _dense_stats(x: jax.Array, axis: int, gamma: float | jax.Array, gamma_int: int | None) -> tuple[jax.Array, ...]:
    """p_c, -m_c log p_c, κ_c, log(1 - p_c) and 1 - p_c for every class."""
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
    return p, -(m * logp), kappa, log1mp, omp


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _dense_kernel(x: jax.Array, wq: jax.Array, g: jax.Array | None, axis: int, gamma: float | None,
                  gamma_int: int | None) -> jax.Array:
    """Per-position loss -Σ_c w_c q_c (1-p_c)^γ_c log p_c (``wq`` is w_c q_c times the mask; ``g`` is an
    array γ broadcasting to ``x`` along the class axis, None for a number ``gamma``)."""
    # gamma is a number whenever g is None
    return jnp.sum(wq * _dense_stats(x, axis, gamma if g is None else g, gamma_int)[1], axis=axis)  # type: ignore[arg-type]


def _dense_kernel_jvp(axis, gamma, gamma_int, primals, tangents):
    x, wq, g = primals
    dx, dwq, dg = tangents
    p, loss, kappa, log1mp, omp = _dense_stats(x, axis, gamma if g is None else g, gamma_int)
    terms = []
    if _common.perturbed(dx):
        # dℓ/dx_k = A_k - p_k Σ_c A_c = A_k (1 - p_k) - p_k Σ_{c≠k} A_c, with 1 - p_k from the sum over the
        # other classes: exact for one-hot probabilities (Σ_{c≠k} A_c is then 0 or one term), where
        # A_k - p_k A_k would lose every digit of a p_k close to 1.
        a = wq * kappa
        terms.append((a * omp - p * (jnp.sum(a, axis=axis, keepdims=True) - a)) * dx)
    if _common.perturbed(dwq):
        terms.append(loss * dwq)  # dℓ/d(w_c q_c) = -(1-p_c)^γ_c log p_c
    if _common.perturbed(dg):
        # dℓ/dγ_c = w_c q_c ℓ_c log(1-p_c), log(1-p_c) with the digits of a small p_c
        terms.append(wq * loss * _log1mp_of_small_p(p, log1mp) * dg)
    d = jnp.sum(functools.reduce(jnp.add, terms), axis=axis) if terms else jnp.zeros_like(loss.sum(axis))
    return jnp.sum(wq * loss, axis=axis), d


_dense_kernel.defjvp(_dense_kernel_jvp, symbolic_zeros=True)


# ----------------------------------------------------------------------------------------
# Poly-1: one smooth formula for plain autodiff, every class entering the loss.
# ----------------------------------------------------------------------------------------


def _poly1_loss(x: jax.Array, wq: jax.Array, g: jax.Array | None, axis: int, gamma: float | None,
                poly1: float) -> jax.Array:
    """Per-position loss Σ_c w_c q_c (1-p_c)^γ_c (ε₁ (1-p_c) - log p_c), differentiated by plain autodiff.

    Where p_c > 1/2, 1-p_c is Σ_{k≠c} e_k / S: for the arg-max a sum over the other classes shifted by their
    own maximum (its logarithm, and every derivative of it, finite even where the sum underflows), for a
    tied class S - e_c >= 1. Elsewhere 1-p_c = -expm1(log p_c) and log(1-p_c) = log1p(-p_c). Each form is
    differentiated where its derivative is a sum rather than a difference of nearly equal terms
    (d(1-p_c)/dx_k = p_c p_k, tiny next to p_k where p_c is), and every branch that a ``where`` discards is
    finite. Whole γ up to 8 are products of 1-p_c, others exp(γ log(1-p_c)).
    """
    c = x.shape[axis]
    m_x = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True, initial=-jnp.inf))
    z = x - m_x
    e = jnp.exp(z)
    s = jnp.sum(e, axis=axis, keepdims=True)
    log_s = jnp.log(s)
    logp_d = z - log_s  # log p_c, accurate where p_c <= 1/2
    if c == 1:  # no other class: p = 1, 1 - p = 0 with log(1-p) floored as in _log_parts
        big = jnp.ones(x.shape, bool)
        omp_b = jnp.zeros_like(x)
        log1mp_b = jnp.full_like(x, math.log(_common.tiny(x.dtype)))
    else:
        classes = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
        top = classes == jnp.argmax(x, axis=axis, keepdims=True)
        m_o = jax.lax.stop_gradient(jnp.max(jnp.where(top, -jnp.inf, z), axis=axis, keepdims=True))
        sum_o = jnp.sum(jnp.where(top, 0.0, jnp.exp(jnp.where(top, m_o, z) - m_o)), axis=axis, keepdims=True)
        rest = jnp.where(top, 1.0, s - e)  # >= 1 where selected
        omp_b = jnp.where(top, jnp.exp(m_o) * sum_o, rest) / s
        log1mp_b = jnp.where(top, m_o + jnp.log(sum_o), jnp.log(rest)) - log_s
        big = omp_b < 0.5
    la = jnp.where(big, -1.0, logp_d)  # log p_c where p_c <= 1/2, a finite stand-in elsewhere
    omp = jnp.where(big, omp_b, -jnp.expm1(la))
    log1mp = jnp.where(big, log1mp_b, jnp.log1p(-jnp.exp(la)))
    logp = jnp.where(big, jnp.log1p(-jnp.where(big, omp_b, 0.0)), logp_d)
    # gamma is a number whenever g is None
    m = _family._power(omp, lambda: log1mp, gamma) if g is None else jnp.exp(g * log1mp)  # type: ignore[arg-type]
    return jnp.sum(wq * (m * (poly1 * omp - logp)), axis=axis)


# ----------------------------------------------------------------------------------------
# The public function.
# ----------------------------------------------------------------------------------------


def softmax_focal_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    gamma: jax.typing.ArrayLike = focal_spec.GAMMA,
    weight: jax.typing.ArrayLike | None = None,
    ignore_index: int = focal_spec.IGNORE_INDEX,
    label_smoothing: jax.typing.ArrayLike = focal_spec.LABEL_SMOOTHING,
    where: jax.typing.ArrayLike | None = None,
    axis: int = focal_spec.JAX_CLASS_AXIS,
    reduction: str = focal_spec.REDUCTION,
    axis_name: Hashable | None = None,
    poly1: float = 0.0,
) -> jax.Array:
    r"""Softmax focal loss for multi-class classification (Lin et al. 2017), classes on ``axis``.

    Per position i, with p = softmax(x) over the class axis and q the (smoothed) target
    distribution:

    .. math::
        \ell_i = -\sum_c w_c \, q_c \, (1-p_c)^{γ_c} \log p_c, \quad
        q = (1-ε)\,\mathrm{onehot}(y) + ε/C \ \text{(or } q(1-ε) + ε/C \text{ for probabilities)}.

    ``poly1`` = ε₁ (Poly-1, Leng et al. 2022) adds :math:`ε_1 \sum_c w_c q_c (1-p_c)^{γ_c+1}` to
    :math:`\ell_i` (0 by default, the focal loss).

    With integer labels and ε = 0 this is :math:`-w_y (1-p_y)^{γ_y} \log p_y`, computed from a
    gather of the labelled logit. :math:`1-p_c` is a sum over the other classes divided by the
    softmax denominator, so the loss and its gradient stay finite and accurate when one class
    dominates. With ``gamma=0`` this is the softmax cross-entropy (``F.cross_entropy``), in value
    and gradient.

    Gradients flow to every floating input: ``logits``, probability ``labels``, ``weight``,
    ``gamma`` and ``label_smoothing``, from closed forms in a ``jax.custom_jvp``
    (dℓ/dγ_c = w_c q_c (1-p_c)^{γ_c} (-log p_c) log(1-p_c), dℓ/d(w_c q_c)) and plain autodiff
    of the per-class factors, so ``jax.grad``, ``jax.jvp``, ``jax.vmap``, ``jax.hessian``,
    ``jax.checkpoint`` and ``lax.scan`` all apply. Only the derivatives that a transform asks for
    are computed.

    ``gamma`` and ``label_smoothing`` may be Python numbers, concrete arrays (JAX or NumPy) or
    traced arrays (arguments of a ``jit``-ed function, ``vmap``-ed, differentiated). Concrete
    values are range-checked (a concrete JAX array is read back to the host for it); traced ones
    are checked by shape only, and a traced value out of range gives a meaningless loss rather
    than an error. A whole-number ``gamma`` known when the loss is traced (a number, or a concrete
    0-d array) up to 8 uses multiplications only; an array or traced ``gamma`` takes the general
    path ``exp(γ log(1-p))``, with ``log(1-p)`` floored at the log of the smallest normal number:
    finite values, gradients and Hessians, the exact cross-entropy gradient at γ = 0, and a finite
    dℓ/dγ. A traced ``label_smoothing`` always takes the dense path (every class enters the loss).
    ``ignore_index`` and ``axis`` are static Python integers: they decide, by integer comparison
    and by layout, which positions are counted, which the caller fixes for a model.

    Args:
      logits: floating array with the classes on ``axis`` (``C = logits.shape[axis]``), or
        anything ``jnp.asarray`` accepts. Half precision is computed in float32 and the result
        returned in the logits' dtype. C = 0 is allowed: a loss over no counted position is 0.
      labels: integer class indices of the logits' shape without the class axis (any integer
        dtype: int8, uint8, int16, int32, int64...), or floating class probabilities of the
        logits' shape.
      gamma: focusing parameter γ >= 0: a number, or one γ per class, shape ``(C,)`` (γ_c on
        class c's modulator).
      weight: optional per-class weights of shape ``(C,)``.
      ignore_index: integer labels equal to it contribute 0 and are not counted. It is compared
        without wrapping: a uint8 label 156 is class 156, never -100, and an ``ignore_index`` that
        the labels' dtype cannot hold matches nothing.
      label_smoothing: ε in [0, 1] (0-d), applied as in ``F.cross_entropy``.
      where: optional boolean array broadcasting to the logits' shape without the class axis.
        Positions where it is False (or ignored) contribute 0, are not counted, and get an exactly
        zero gradient, whatever their logits and labels hold.
      axis: the class axis (static), ``-1`` (channels-last) by default.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      axis_name: inside ``shard_map`` or ``pmap``, the name of the mapped axis: the sum and the
        mean's denominator are ``psum``-ed over it, which makes ``"mean"`` the exact global mean.
        Ignored for ``"none"``.
      poly1: ε₁ of Poly-1, a finite Python number (static under ``jit``; negative values
        allowed): each position's loss gains ε₁ Σ_c w_c q_c (1-p_c)^(γ_c+1). 0 (the default) keeps
        the closed-form path above; any other value computes the whole loss as one smooth formula
        differentiated by plain autodiff (log(1-p_c) as a log-sum-exp over the other classes), with
        the same transforms and finite values, gradients and Hessians at any logit.

    Returns:
      ``"none"``: the per-position loss, of the logits' shape without the class axis.
      ``"sum"``: a scalar. ``"mean"``: a scalar; for integer labels the sum divided by
      Σ w[y_i] over counted positions (``F.cross_entropy``'s weighted mean, whatever the sign of
      the weights), for probabilities divided by the number of counted positions; 0 when that
      denominator is exactly 0. In the logits' dtype. An integer label outside [0, C) that is not
      ``ignore_index`` cannot raise under ``jit``: it makes that position's loss NaN (and so the
      mean and the sum).

    Raises:
      TypeError: non-floating logits, floating labels of the positions' shape, labels that are
        neither integer nor floating, a ``where`` that is not boolean, or an option of the wrong
        type (``gamma=None``, a string, a traced ``poly1``).
      ValueError: a concrete option out of range (a non-finite ``poly1``, say), an unknown
        reduction, a class axis out of range, or a shape of ``labels``, ``gamma``, ``weight`` or
        ``where`` that does not fit the logits.

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
    eps1 = focal_spec.variants.check_poly1(poly1)
    logits = _common.as_array(logits)
    labels = _common.as_array(labels, "labels")
    opts = focal_spec.softmax_options(
        logits.shape, logits.dtype, labels.shape, labels.dtype, gamma=_common.host_value(gamma),
        weight_shape=_common.shape_of(weight), ignore_index=ignore_index,
        label_smoothing=_common.host_value(label_smoothing), where_shape=_common.shape_of(where), axis=axis,
        reduction=reduction, where_dtype=_common.dtype_of(where), weight=_common.host_value(weight),
    )
    cdt = _common.compute_dtype(logits.dtype)
    ax, c = opts.axis, opts.num_classes
    positions = logits.shape[:ax] + logits.shape[ax + 1:]
    x = logits.astype(cdt)
    w = None if weight is None else jnp.asarray(weight, cdt)
    valid = None if where is None else jnp.broadcast_to(jnp.asarray(where, bool), positions)
    g = None if opts.gamma is not None else jnp.asarray(gamma, cdt)  # an array γ: () or (C,)
    eps: float | jax.Array | None = opts.label_smoothing
    if eps is None:  # traced: applied whatever its value
        eps = jnp.asarray(label_smoothing, cdt)
    smoothing = not isinstance(eps, float) or eps != 0
    if c == 0:
        return _no_classes(x, labels, opts, valid, axis_name, logits.dtype)
    if opts.label_kind == "index":
        counted, in_range = _common.label_masks(labels, opts.ignore_index, c)
        valid = counted if valid is None else valid & counted
        # A label outside [0, C) (and not ignore_index) cannot raise under jit: its position's loss
        # becomes NaN.
        bad = valid & ~in_range
        code = jnp.where(valid & in_range, labels.astype(jnp.int32), -1)  # the class, -1 where not counted
        ys = jnp.maximum(code, 0)
        wy = valid.astype(cdt) if w is None else jnp.where(valid, w[ys], jnp.zeros((), cdt))
        wy = jnp.where(bad, jnp.full((), jnp.nan, cdt), wy)
        # Σ w[y] over counted positions; a bad label's NaN reaches the mean through its loss
        count: jax.Array | int = jnp.sum(valid, dtype=jnp.int32) if w is None else jnp.sum(wy)
        if not smoothing and not eps1:
            gy = None if g is None else (g if g.ndim == 0 else g[ys])
            loss = _index_kernel(x, code, wy, gy, ax, opts.gamma, opts.gamma_int)
            return _distributed.reduce_loss(loss, opts.reduction, count, axis_name).astype(logits.dtype)
        x = jnp.where(jnp.expand_dims(valid, ax), x, jnp.zeros_like(x))  # masked garbage never reaches the math
        classes = jax.lax.broadcasted_iota(ys.dtype, x.shape, ax)
        q = jnp.where(classes == jnp.expand_dims(ys, ax), 1.0 - eps + eps / c, eps / c).astype(cdt)
        scale = jnp.expand_dims(jnp.where(bad, jnp.full((), jnp.nan, cdt), valid.astype(cdt)), ax)
    else:
        q = labels.astype(cdt)
        if smoothing:
            q = q * (1.0 - eps) + eps / c
        if valid is None:
            count = math.prod(positions)
            scale = None
        else:
            count = jnp.sum(valid, dtype=cdt)
            x = jnp.where(jnp.expand_dims(valid, ax), x, jnp.zeros_like(x))
            scale = jnp.expand_dims(valid.astype(cdt), ax)
    wq = q
    per_class = (c,) + (1,) * (x.ndim - 1 - ax)
    if w is not None:
        wq = wq * w.reshape(per_class)
    if scale is not None:
        wq = jnp.where(scale != 0, wq * scale, jnp.zeros_like(wq))  # also drops garbage probabilities
    if g is not None and g.ndim:
        g = g.reshape(per_class)
    if eps1:
        loss = _poly1_loss(x, wq, g, ax, opts.gamma, eps1)
    else:
        loss = _dense_kernel(x, wq, g, ax, opts.gamma, opts.gamma_int)
    return _distributed.reduce_loss(loss, opts.reduction, count, axis_name).astype(logits.dtype)


def _no_classes(x: jax.Array, labels: jax.Array, opts: focal_spec.SoftmaxOptions, valid: jax.Array | None,
                axis_name: Hashable | None, dtype: jnp.dtype) -> jax.Array:
    """C = 0: no class to predict. Every position's loss is 0, but an integer label at a counted position
    is out of range (NaN). Gradients are zeros of the logits' (empty) shape."""
    ax = opts.axis
    loss = jnp.sum(x, axis=ax)  # zeros of the positions' shape, differentiable wrt x
    if opts.label_kind == "index":
        counted, _ = _common.label_masks(labels, opts.ignore_index, 0)
        valid = counted if valid is None else valid & counted
    count = math.prod(loss.shape) if valid is None else jnp.sum(valid, dtype=x.dtype)
    if opts.label_kind == "index":
        # valid was set just above for index labels
        loss = jnp.where(valid, jnp.full((), jnp.nan, x.dtype), loss)  # type: ignore[arg-type]
    return _distributed.reduce_loss(loss, opts.reduction, count, axis_name).astype(dtype)
