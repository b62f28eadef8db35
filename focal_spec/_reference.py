"""Float64 NumPy reference of every loss, with its gradient with respect to the logits.

These are the plainest possible transcriptions of the formulas in :mod:`focal_spec`,
computed in float64 and in log space. They are slow and allocate freely; they exist so
that both backends can be checked against one independent statement of the semantics.

Every function returns ``(value, grad)``: the loss after ``reduction``, and the gradient
of ``sum(value)`` with respect to the logits (for ``reduction="none"`` that is the
elementwise derivative).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from focal_spec import _options, _variants
from focal_spec import _validate as V

_LN2 = float(np.log(2.0))
_NO_IGNORE = -(2**62)  # an ignore_index no label can hold (the original modules ignore nothing)


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _reduce(loss: np.ndarray, grad: np.ndarray, reduction: str, denom: float) -> tuple[np.ndarray, np.ndarray]:
    if reduction == "none":
        return loss, grad
    if reduction == "sum":
        return np.asarray(loss.sum()), grad
    scale = 1.0 / denom if denom != 0 else 0.0
    return np.asarray(loss.sum() * scale), grad * scale


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _modulator(gamma: Any, log_q: np.ndarray) -> np.ndarray:
    """(1-p)^γ = exp(γ log(1-p)), exactly 1 wherever γ = 0 (also where 1-p = 0: no 0^0 NaN)."""
    g = np.broadcast_to(_f64(gamma), log_q.shape)
    with np.errstate(invalid="ignore"):
        return np.where(g == 0, 1.0, np.exp(g * log_q))


def sigmoid_focal_loss(
    logits: Any, targets: Any, *, gamma: Any = _options.GAMMA, alpha: Any = None, weight: Any = None,
    label_smoothing: float = _options.LABEL_SMOOTHING, where: Any = None, reduction: str = _options.REDUCTION,
    pos_weight: Any = None, poly1: float = 0.0, normalized: bool = False, reduced_threshold: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid focal loss in float64.

    .. math::
        t' = t(1-ε) + ε/2, \\quad ce = -π t' \\log σ(x) - (1-t') \\log σ(-x), \\quad
        1-p_t = t' σ(-x) + (1-t') σ(x), \\quad
        \\ell = α_t \\, w \\, [(1-p_t)^γ \\, ce + ε_1 (1-p_t)^{γ+1}],

    with π = ``pos_weight`` (1 when None), as in ``F.binary_cross_entropy_with_logits``, and ε₁ =
    ``poly1``. ``gamma`` is a number, an array broadcasting to the logits, or a
    :class:`focal_spec.GammaSchedule` (γ from the detached p_t). ``reduced_threshold`` and ``normalized``
    are the variants of :mod:`focal_spec._variants`. Targets outside [0, 1] at counted elements raise
    ``ValueError``.
    """
    schedule = gamma if isinstance(gamma, _variants.GammaSchedule) else None
    eps1 = _variants.check_poly1(poly1)
    normalized = _variants.check_normalized(normalized)
    th = _variants.check_reduced_threshold(reduced_threshold)
    x = _f64(logits)
    o = V.sigmoid_options(x.shape, np.asarray(logits).dtype, np.shape(targets), np.asarray(targets).dtype,
                          gamma=0.0 if schedule else gamma, alpha=alpha,
                          weight_shape=None if weight is None else np.shape(weight),
                          label_smoothing=label_smoothing, where_shape=None if where is None else np.shape(where),
                          where_dtype="bool" if where is None else np.asarray(where).dtype, reduction=reduction,
                          pos_weight_shape=None if pos_weight is None else np.shape(pos_weight))
    mask = np.ones(x.shape, bool) if where is None else np.broadcast_to(np.asarray(where, bool), x.shape)
    x = np.where(mask, x, 0.0)  # masked positions may hold NaN or inf: never let them into the math
    t = np.where(mask, np.broadcast_to(_f64(targets), x.shape), 0.0)
    out_of_range = ~((t >= 0) & (t <= 1))
    if out_of_range.any():
        raise ValueError(V.targets_out_of_range(t[out_of_range].ravel()[0]))
    # the reference is called with concrete values: label_smoothing is never None (traced) here
    eps: float = o.label_smoothing  # type: ignore[assignment]
    tp = t * (1.0 - eps) + eps / 2.0
    pw = 1.0 if pos_weight is None else np.broadcast_to(_f64(pos_weight), x.shape)
    lp, ln = _log_sigmoid(x), _log_sigmoid(-x)  # log σ(x), log σ(-x)
    ce = -(pw * tp * lp + (1.0 - tp) * ln)
    with np.errstate(divide="ignore"):
        log_q = np.logaddexp(np.log(tp) + ln, np.log1p(-tp) + lp)  # log(1 - p_t)
    # 1 - p_t as a sum of two non-negative terms (exact at hard targets and where p_t rounds to 1): the
    # decisions on p_t (a schedule's steps, a reduced threshold) are made on it, as in both backends
    q = tp * np.exp(ln) + (1.0 - tp) * np.exp(lp)
    g = schedule.gamma_of_q(q) if schedule else np.broadcast_to(_f64(gamma), x.shape)
    m = _modulator(g, log_q)
    dm_on = np.ones_like(x)  # where the modulator depends on x (not where a reduced threshold sets it to 1)
    if th is not None:
        below = q > 1.0 - th  # p_t < th
        m = np.where(below, 1.0, _modulator(g, log_q - np.log(th)))
        dm_on = np.where(below, 0.0, 1.0)
    if o.alpha is None:
        at = np.ones_like(x)
    else:
        a = _f64(alpha)
        at = a * tp + (1.0 - a) * (1.0 - tp)
    w = np.ones_like(x) if weight is None else np.broadcast_to(_f64(weight), x.shape)
    scale = np.where(mask, at * w, 0.0)
    # d(1-p_t)/dx = (1-2t') σ(x) σ(-x); the modulator's derivative is γ m (1-2t') r with
    # r = σ(x)σ(-x)/(1-p_t), written in log space so that it is finite everywhere.
    # dce/dx = (1-t')σ(x) - π t' σ(-x)
    r = np.exp(lp + ln - log_q)
    dce = (1.0 - tp) * np.exp(lp) - pw * tp * np.exp(ln)
    dm = dm_on * g * m * (1.0 - 2.0 * tp) * r
    loss = scale * m * ce
    grad = scale * (dm * ce + m * dce)
    if eps1:  # ε₁ (1-p_t)^(γ+1), derivative ε₁ (γ+1) (1-p_t)^γ (1-2t') σ(x)σ(-x)
        loss = loss + scale * eps1 * np.exp((g + 1.0) * log_q)
        grad = grad + scale * eps1 * (g + 1.0) * np.exp(g * log_q + lp + ln) * (1.0 - 2.0 * tp)
    if normalized:  # ℓ / Σ m over counted elements; the gradient of Σℓ/Σm includes Σm's own
        z = float(np.where(mask, m, 0.0).sum())
        total = float(loss.sum())
        dz = np.where(mask, dm, 0.0)
        grad = (grad * z - total * dz) / z**2 if z else np.zeros_like(grad)
        loss = loss / z if z else np.zeros_like(loss)
        if o.reduction == "none":  # the gradient of sum(value) is that of Σℓ/Σm
            return loss, grad
    return _reduce(loss, grad, o.reduction, float(mask.sum()))


def _softmax_parts(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log p_c, log(1 - p_c) and p_c over ``axis``, each computed without cancellation."""
    xm = np.moveaxis(x, axis, -1)
    lse = np.logaddexp.reduce(xm, axis=-1, keepdims=True)
    c = xm.shape[-1]
    others = np.empty_like(xm)
    for k in range(c):  # log Σ_{j≠k} exp(x_j)
        rest = np.delete(xm, k, axis=-1)
        others[..., k] = np.logaddexp.reduce(rest, axis=-1) if c > 1 else -np.inf
    log1mp = others - lse
    with np.errstate(divide="ignore"):
        logp = np.where(log1mp < -_LN2, np.log1p(-np.exp(log1mp)), xm - lse)
    return logp, log1mp, np.exp(logp)


def softmax_focal_loss(
    logits: Any, labels: Any, *, gamma: Any = _options.GAMMA, weight: Any = None,
    ignore_index: int = _options.IGNORE_INDEX, label_smoothing: float = _options.LABEL_SMOOTHING,
    where: Any = None, axis: int = _options.JAX_CLASS_AXIS, reduction: str = _options.REDUCTION,
    poly1: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax focal loss in float64.

    .. math::
        \\ell_i = -\\sum_c w_c \\, q_c \\, (1-p_c)^γ \\log p_c, \\quad
        q = (1-ε)\\,\\mathrm{onehot}(y) + ε/C \\ \\text{(or smoothed probabilities)}.

    ``mean`` divides by ``Σ w[y_i]`` over counted positions for class indices (as
    ``F.cross_entropy``, whatever its sign), and by the number of counted positions for
    probabilities; a zero denominator gives 0. ``gamma`` is a number or one value per class (C,).
    ``poly1`` = ε₁ adds ε₁ Σ_c w_c q_c (1-p_c)^(γ_c+1) (Poly-1).
    """
    eps1 = _variants.check_poly1(poly1)
    x = _f64(logits)
    labels_np = np.asarray(labels)
    o = V.softmax_options(x.shape, np.asarray(logits).dtype, labels_np.shape, labels_np.dtype, gamma=gamma,
                          weight_shape=None if weight is None else np.shape(weight), ignore_index=ignore_index,
                          label_smoothing=label_smoothing, where_shape=None if where is None else np.shape(where),
                          where_dtype="bool" if where is None else np.asarray(where).dtype, axis=axis,
                          reduction=reduction)
    c = o.num_classes
    xm = np.moveaxis(x, o.axis, -1)
    positions = xm.shape[:-1]
    valid = np.ones(positions, bool) if where is None else np.broadcast_to(np.asarray(where, bool), positions).copy()
    w = np.ones(c) if weight is None else _f64(weight)
    # the reference is called with concrete values: label_smoothing is never None (traced) here
    eps: float = o.label_smoothing  # type: ignore[assignment]
    if o.label_kind == "index":
        y = labels_np.astype(np.int64)
        valid &= y != o.ignore_index
        bad = valid & ((y < 0) | (y >= c))
        if bad.any():
            raise ValueError(V.label_out_of_range(int(y[bad].ravel()[0]), c, o.ignore_index))
        ys = np.where(valid, y, 0)
        q = (1.0 - eps) * np.eye(c)[ys] + (eps / c if c else 0.0)
        denom = float(np.where(valid, w[ys], 0.0).sum())
    else:
        q = np.moveaxis(_f64(labels), o.axis, -1) * (1.0 - eps) + (eps / c if c else 0.0)
        denom = float(valid.sum())
    xm = np.where(valid[..., None], xm, 0.0)
    q = np.where(valid[..., None], q, 0.0)
    logp, log1mp, p = _softmax_parts(xm, -1) if c > 0 else (xm, xm, xm)
    g = np.broadcast_to(_f64(gamma), xm.shape)
    m = _modulator(g, log1mp)
    wq = w * q
    loss = -(wq * m * logp).sum(-1)
    # dℓ/dx_k = A_k - p_k Σ_c A_c with A_c = w_c q_c κ_c and κ_c = m_c (γ p_c log p_c / (1-p_c) - 1).
    with np.errstate(divide="ignore", invalid="ignore"):
        # ρ = log p / (1 - p) -> -1 - (1 - p)/2 as 1 - p -> 0: -1 to float64 precision below 1 - p = e^-40
        # (where exp(log1mp) would underflow to 0 and give 0/0)
        rho = np.where(log1mp > -40.0, logp / np.exp(np.maximum(log1mp, -40.0)), -1.0)
    kappa = m * (g * p * rho - 1.0)
    a_c = wq * kappa
    if eps1:  # d(1-p_c)^(γ+1)/dx_k = -(γ+1)(1-p_c)^γ p_c (δ_ck - p_k)
        loss = loss + eps1 * (wq * np.exp((g + 1.0) * log1mp)).sum(-1)
        a_c = a_c - eps1 * wq * (g + 1.0) * m * p
    # as A_k (1 - p_k) - p_k Σ_{c≠k} A_c: at a p_k close to 1, A_k - p_k A_k would cancel
    a_others = np.stack([np.delete(a_c, k, axis=-1).sum(-1) for k in range(c)], axis=-1) if c else a_c
    with np.errstate(invalid="ignore"):  # inf·0 where a logit is infinite: NaN, as the formula gives there
        grad = a_c * np.exp(log1mp) - p * a_others
    value, grad = _reduce(loss, grad, o.reduction, denom)
    return value, np.moveaxis(grad, -1, o.axis)


# ----------------------------------------------------------------------------------------
# The original blog modules (SegmentationFocalLoss / ClassificationFocalLoss).
# ----------------------------------------------------------------------------------------


def original_focal_loss(
    pred: Any, teacher: Any, *, gamma: float = 2.0, weights: Any = None, logits: bool = True,
    n_classes: int | None = None, axis: int = _options.ORIGINAL_CLASS_AXIS,
) -> tuple[np.ndarray, np.ndarray]:
    """The original modules' loss in float64, with every defect of the original fixed.

    logits=True: ``(1-p_t)^γ · ce · weights[c]`` with the geometric ``1-p_t = -expm1(-ce)``
    and a plain mean over every element. logits=False: the softmax focal loss on
    ``teacher.argmax(axis)`` (or on class indices), with ``weights[y]`` per position and a
    plain mean over positions. ``n_classes`` selects ClassificationFocalLoss' handling of
    class-index teachers.
    """
    opts = V.original_options(gamma, weights, logits, n_classes)
    x = _f64(pred)
    teacher_np = np.asarray(teacher)
    ax, kind = V.check_original_call(x.shape, np.asarray(pred).dtype, teacher_np.shape, opts.weights, axis,
                                     classification=n_classes is not None)
    c = x.shape[ax]
    w_shape = [1] * x.ndim
    w_shape[ax] = c
    w = np.ones(c) if opts.weights is None else np.asarray(opts.weights)
    if kind == "index":  # the original modules have no ignore_index: every index must be a class
        y = teacher_np.astype(np.int64)
        bad = (y < 0) | (y >= c)
        if bad.any():
            raise ValueError(V.label_out_of_range(int(y[bad].ravel()[0]), c, None))
    if opts.logits:
        if kind == "index":
            t = np.moveaxis(np.eye(c)[teacher_np.astype(np.int64)], -1, ax)
        else:
            t = _f64(teacher)
        lp, ln = _log_sigmoid(x), _log_sigmoid(-x)
        ce = -(t * lp + (1.0 - t) * ln)
        q = -np.expm1(-ce)
        m = q ** opts.gamma
        wc = w.reshape(w_shape)
        loss = wc * m * ce
        dce = np.exp(lp) - t
        with np.errstate(divide="ignore", invalid="ignore"):
            dm = np.where(q > 0, opts.gamma * q ** (opts.gamma - 1.0) * np.exp(-ce), 0.0) if opts.gamma else 0.0
        grad = wc * (dm * ce + m) * dce / x.size
        return np.asarray(loss.mean()), grad
    y = teacher_np.astype(np.int64) if kind == "index" else np.argmax(teacher_np, axis=ax)
    value, grad = softmax_focal_loss(x, y, gamma=opts.gamma, weight=w, axis=ax, reduction="sum",
                                     ignore_index=_NO_IGNORE)
    n = y.size
    return value / n, grad / n
