"""The focal family for JAX: asymmetric, quality focal and varifocal losses, and class-balanced weights.

Every variant is one elementwise formula of a sanitized logit x and target t (see
:mod:`focal_spec._variants` for the definitions). Everything else is shared by :func:`_family_loss`:
validation by :func:`focal_spec.family_options`, the compute dtype, masking before any math, the
out-of-range target rule, label smoothing, ``weight`` and the reduction. Adding a variant means
writing its elementwise formula and a public function that names its options.

The formulas are written for plain autodiff: every quantity is built from e = exp(-|x|) with smooth
one-sided pieces, each power is a product or ``exp(k · log u)`` of a log-space ``u``, and every
branch that a ``where`` leaves unselected is itself finite, so values, gradients and Hessians stay
finite at any logit and for any exponent, 0 and fractional ones included.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


def _cross_entropy(p: _Sigmoid, t: jax.Array) -> jax.Array:
    """-t log σ(x) - (1-t) log σ(-x): two non-negative terms for t in [0, 1]."""
    return t * p.sp_neg + (1.0 - t) * p.sp_pos


def _asymmetric(x: jax.Array, t: jax.Array, *, gamma_pos: float, gamma_neg: float, clip: float) -> jax.Array:
    """t σ(-x)^γ₊ (-log σ(x)) + (1-t) p_m^γ₋ (-log(1-p_m)), p_m = max(σ(x) - m, 0)."""
    p = _sigmoid(x)
    pos = _power(p.sn, lambda: -p.sp_pos, gamma_pos) * p.sp_neg
    if clip == 0.0:
        neg = _power(p.s, lambda: -p.sp_neg, gamma_neg) * p.sp_pos
    else:
        active = p.s > clip
        pm = jnp.where(active, p.s - clip, 0.5)  # 0.5 keeps both logarithms below finite where inactive
        # -log(1 - p_m): log1p for a small p_m, and the sum σ(-x) + m (never a difference) for a large one
        nll = jnp.where(pm < 0.5, -jnp.log1p(-pm), -jnp.log(p.sn + clip))
        neg = jnp.where(active, _power(pm, lambda: jnp.log(pm), gamma_neg) * nll, 0.0)
    return t * pos + (1.0 - t) * neg


def _quality_focal(x: jax.Array, t: jax.Array, *, beta: float) -> jax.Array:
    """|t - σ(x)|^β ce(x, t), with t - σ(x) = t σ(-x) - (1-t) σ(x) (exact for hard targets)."""
    p = _sigmoid(x)
    d = jnp.abs(t * p.sn - (1.0 - t) * p.s)
    if beta == 0.0 or float(beta).is_integer() and beta <= 8:
        return _power(d, lambda: d, beta) * _cross_entropy(p, t)
    # log|d|: -softplus(±x) for hard targets (smooth at any logit); for soft ones log|d| floored at the
    # smallest normal number, and |d|^β = 0 where d = 0. The soft branch sees |d| = 1 at hard targets.
    one, zero = t == 1, t == 0
    soft_d = jnp.where(one | zero, 1.0, d)
    log_d = jnp.where(one, -p.sp_pos, jnp.where(zero, -p.sp_neg, jnp.log(jnp.maximum(soft_d, _common.tiny(d.dtype)))))
    return jnp.where(soft_d == 0, 0.0, jnp.exp(beta * log_d)) * _cross_entropy(p, t)


def _varifocal(x: jax.Array, t: jax.Array, *, alpha: float, gamma: float) -> jax.Array:
    """ce(x, q) · (q where q > 0, else α σ(x)^γ)."""
    p = _sigmoid(x)
    return jnp.where(t > 0, t, alpha * _power(p.s, lambda: -p.sp_neg, gamma)) * _cross_entropy(p, t)


# ----------------------------------------------------------------------------------------
# The shared pipeline.
# ----------------------------------------------------------------------------------------


def _family_loss(loss: str, term: Callable[..., jax.Array], logits: jax.typing.ArrayLike,
                 targets: jax.typing.ArrayLike, *, weight: Any, where: Any, reduction: str,
                 axis_name: Hashable | None, label_smoothing: Any = 0.0, **hyper: float) -> jax.Array:
    """Validates, casts, masks, applies ``term`` elementwise, weights and reduces."""
    logits = _common.as_array(logits)
    targets = _common.as_array(targets)
    opts = focal_spec.family_options(
        loss, logits.shape, logits.dtype, targets.shape, targets.dtype, weight_shape=_common.shape_of(weight),
        where_shape=_common.shape_of(where), where_dtype="bool" if where is None else _common.dtype_of(where),
        reduction=reduction, label_smoothing=_common.host_value(label_smoothing), **hyper)
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
    if targets.dtype != jnp.bool_:  # cannot raise under jit: a counted target outside [0, 1] gives NaN
        t = jnp.where((t >= 0) & (t <= 1), t, jnp.full((), jnp.nan, cdt))
    eps: Any = opts.label_smoothing
    if eps is None:  # traced: applied whatever its value
        eps = jnp.asarray(label_smoothing, cdt)
    if not isinstance(eps, float) or eps != 0.0:
        t = t * (1.0 - eps) + eps / 2.0
    out = term(x, t, **dict(opts.params))
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
