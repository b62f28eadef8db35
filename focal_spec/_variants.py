"""The focal family: defaults, validation and float64 references of the variants of the focal loss.

Every variant is a per-element modulator and per-element factors on a cross-entropy; the machinery
(masking, reduction, dtypes) is the focal loss's own. Notation as in :mod:`focal_spec`: x a logit,
t a target, s = σ(x), s̄ = σ(-x) = 1 - s, ε = ``label_smoothing``, t' = t(1-ε) + ε/2.

- Asymmetric loss (ASL, Ridnik et al. 2021), multi-label: with the probability margin m = ``clip``,
  p_m = max(s - m, 0),
  ℓ = w · [t' · s̄^γ₊ · (-log s) + (1-t') · p_m^γ₋ · (-log(1 - p_m))].
  1 - p_m = min(s̄ + m, 1) is a sum, never a difference, so log(1 - p_m) keeps its digits; p_m reaches
  exactly 0 below the margin, where the negative term and its derivatives are exactly 0.
- Quality focal loss (QFL, Li et al. 2020): ℓ = w · |t - s|^β · ce(x, t), for soft targets t in [0, 1].
- Varifocal loss (VFL, Zhang et al. 2021): ℓ = w · ce(x, q) · (q if q > 0 else α s^γ), with the
  target q (an IoU-aware score) weighting the positives.
- Poly-1 (Leng et al. 2022): the focal loss plus ε₁ (1-p_t)^(γ+1), with the focal loss's own factors
  (α_t, weight, mask); softmax: ε₁ Σ_c w_c q_c (1-p_c)^(γ+1).
- Normalized focal loss (arXiv 1909.07829, segmentation_models_pytorch's ``normalized=True``): every
  element's loss is divided by Σ m over counted elements (m the modulators, with their gradient), then
  ``reduction`` applies; ``reduction="sum"`` is then Σℓ / Σm, which at γ = 0 is the mean cross-entropy.
- Reduced focal loss (arXiv 1903.01347, ``reduced_threshold=th``): m = 1 where p_t < th, else
  ((1-p_t)/th)^γ. th must be in (0, 1]; th = 1 is the cross-entropy.
- Sample-dependent γ (FLSD-53, Mukhoti et al. 2020): :class:`GammaSchedule` picks γ per element from
  the detached p_t: ``FLSD_53`` gives γ = 5 where p_t < 0.2, else 3.
- Class-balanced weights (Cui et al. 2019): w_c = (1-β) / (1-β^{n_c}), normalized to sum to C.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from focal_spec import _options
from focal_spec import _validate as V

ASL_GAMMA_POS: float = 0.0
ASL_GAMMA_NEG: float = 4.0
ASL_CLIP: float = 0.05
QFL_BETA: float = 2.0
VFL_ALPHA: float = 0.75
VFL_GAMMA: float = 2.0
CLASS_BALANCE_BETA: float = 0.999


# ----------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------


def check_nonnegative(arg: str, value: Any) -> float:
    expected = "a finite number >= 0"
    v = V._as_float(arg, value, expected)
    if not 0.0 <= v < math.inf:  # NaN fails too; comparisons only (a number traced by torch.compile has no isfinite)
        raise ValueError(V.invalid_value(arg, expected, value))
    return v


def check_poly1(value: Any) -> float:
    """ε₁ of Poly-1: any finite number (the paper uses negative values too); 0 is the focal loss."""
    expected = "a finite number"
    v = V._as_float("poly1", value, expected)
    if not -math.inf < v < math.inf:  # NaN fails too; comparisons only
        raise ValueError(V.invalid_value("poly1", expected, value))
    return v


def check_reduced_threshold(value: Any) -> float | None:
    """None (off), or th in (0, 1]: a threshold of 0 would divide by 0, so it is rejected."""
    if value is None:
        return None
    expected = "None or a number in (0, 1]"
    v = V._as_float("reduced_threshold", value, expected)
    if not 0.0 < v <= 1.0:
        raise ValueError(V.invalid_value("reduced_threshold", expected, value))
    return v


def check_normalized(value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(V.invalid_value("normalized", "True or False", value))
    return bool(value)


@dataclasses.dataclass(frozen=True)
class GammaSchedule:
    """γ chosen per element from the detached p_t: ``values[i]`` for p_t in
    [thresholds[i-1], thresholds[i]), with thresholds increasing in (0, 1]. Hashable, so a JAX
    backend can take it as a static option.

    >>> FLSD_53.gamma_of(np.array([0.1, 0.2, 0.9]))
    array([5., 3., 3.])
    """

    thresholds: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        th = tuple(float(v) for v in self.thresholds)
        vals = tuple(check_nonnegative("gamma", v) for v in self.values)
        if len(vals) != len(th) + 1:
            raise ValueError(V.invalid_value("gamma", "a schedule with one more value than thresholds",
                                             f"{len(th)} thresholds, {len(vals)} values"))
        if any(not 0.0 < a <= 1.0 for a in th) or any(b <= a for a, b in zip(th, th[1:], strict=False)):
            raise ValueError(V.invalid_value("gamma", "schedule thresholds increasing in (0, 1]", th))
        object.__setattr__(self, "thresholds", th)
        object.__setattr__(self, "values", vals)

    def gamma_of(self, p_t: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(np.asarray(self.thresholds), np.asarray(p_t, np.float64), side="right")
        return np.asarray(self.values, np.float64)[idx]

    def gamma_of_q(self, q: np.ndarray) -> np.ndarray:
        """:meth:`gamma_of` decided on q = 1 - p_t (p_t >= th as q <= 1 - th), which stays exact where p_t
        rounds to 1: the rule both backends follow."""
        q = np.asarray(q, np.float64)
        out = np.full(q.shape, self.values[0], np.float64)
        for th, v in zip(self.thresholds, self.values[1:], strict=True):
            out = np.where(q <= 1.0 - th, v, out)
        return out


FLSD_53 = GammaSchedule(thresholds=(0.2,), values=(5.0, 3.0))
"""Mukhoti et al.'s sample-dependent γ: 5 where p_t < 0.2, else 3."""


def class_balanced_weights(counts: Any, *, beta: float = CLASS_BALANCE_BETA) -> np.ndarray:
    """Class-balanced weights of Cui et al. (2019), float64, for ``weight=``.

    The effective number of samples of class c is E_c = (1-β^{n_c}) / (1-β); the weight is 1/E_c,
    normalized so that the weights sum to C. β = 0 gives equal weights, β -> 1 tends to inverse class
    frequency (β = 1 is taken as that limit). A class with count 0 is weighted as a class seen once (the
    largest weight), so that the weights stay finite.

    >>> class_balanced_weights([1, 1, 1], beta=0.9)
    array([1., 1., 1.])
    >>> class_balanced_weights([100, 1], beta=0.0)
    array([1., 1.])
    """
    n = V._host_array("counts", counts, "class counts >= 0")
    if n.ndim != 1 or n.size == 0:
        raise ValueError(V.invalid_value("counts", "a non-empty 1-d array of class counts", counts))
    if not (np.isfinite(n) & (n >= 0)).all():
        raise ValueError(V.invalid_value("counts", "class counts >= 0", counts))
    b = V.check_unit_interval("beta", beta)
    n = np.maximum(n, 1.0)
    if b == 0.0:
        inv = np.ones_like(n)
    elif b == 1.0:
        inv = 1.0 / n
    else:  # (1-β) / (1-β^n); the constant 1-β cancels in the normalization. 1-β^n = -expm1(n log β).
        inv = 1.0 / -np.expm1(n * math.log(b))
    return inv * (n.size / inv.sum())


@dataclasses.dataclass(frozen=True)
class FamilyOptions:
    """Validated options of a variant call: the hyperparameters as floats and the shared ones."""

    loss: str  # "asymmetric", "quality_focal" or "varifocal"
    params: tuple[tuple[str, float], ...]  # the loss's hyperparameters, by name
    label_smoothing: float | None  # None when traced (0-d, not range-checked)
    reduction: str
    compute_dtype: str
    logits_dtype: str

    def __getitem__(self, name: str) -> float:
        return dict(self.params)[name]


_HYPER = {
    "asymmetric": (("gamma_pos", ASL_GAMMA_POS, check_nonnegative), ("gamma_neg", ASL_GAMMA_NEG, check_nonnegative),
                   ("clip", ASL_CLIP, V.check_unit_interval)),
    "quality_focal": (("beta", QFL_BETA, check_nonnegative),),
    "varifocal": (("alpha", VFL_ALPHA, V.check_unit_interval), ("gamma", VFL_GAMMA, check_nonnegative)),
}


def family_options(loss: str, logits_shape: tuple[int, ...], logits_dtype: Any, targets_shape: tuple[int, ...],
                   targets_dtype: Any, *, weight_shape: tuple[int, ...] | None, where_shape: tuple[int, ...] | None,
                   where_dtype: Any = "bool", reduction: Any, label_smoothing: Any = 0.0, weight: Any = None,
                   **hyper: Any) -> FamilyOptions:
    """Validates a call of ``asymmetric_loss``, ``quality_focal_loss`` or ``varifocal_loss`` (elementwise,
    sigmoid-based: the shapes and dtypes follow ``sigmoid_focal_loss``'s rules). Hyperparameters are
    Python numbers. ``weight``, when given, is the weight's host value or ``Unknown``
    (:func:`focal_spec._validate.check_weight`)."""
    base = V.sigmoid_options(logits_shape, logits_dtype, targets_shape, targets_dtype, gamma=0.0, alpha=None,
                             weight_shape=weight_shape, label_smoothing=label_smoothing, where_shape=where_shape,
                             where_dtype=where_dtype, reduction=reduction, weight=weight)
    params = tuple((name, check(name, hyper.get(name, default))) for name, default, check in _HYPER[loss])
    return FamilyOptions(loss=loss, params=params, label_smoothing=base.label_smoothing, reduction=base.reduction,
                         compute_dtype=base.compute_dtype, logits_dtype=base.logits_dtype)


# ----------------------------------------------------------------------------------------
# References (float64), each returning (value, gradient of sum(value) with respect to the logits).
# ----------------------------------------------------------------------------------------


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _sigmoid_inputs(logits, targets, weight, label_smoothing, where, reduction, extra_shape_args=None):
    x = np.asarray(logits, np.float64)
    o = V.sigmoid_options(x.shape, np.asarray(logits).dtype, np.shape(targets), np.asarray(targets).dtype,
                          gamma=0.0, alpha=None, weight_shape=None if weight is None else np.shape(weight),
                          label_smoothing=label_smoothing,
                          where_shape=None if where is None else np.shape(where),
                          where_dtype="bool" if where is None else np.asarray(where).dtype, reduction=reduction)
    mask = np.ones(x.shape, bool) if where is None else np.broadcast_to(np.asarray(where, bool), x.shape)
    x = np.where(mask, x, 0.0)
    t = np.where(mask, np.broadcast_to(np.asarray(targets, np.float64), x.shape), 0.0)
    bad = ~((t >= 0) & (t <= 1))
    if bad.any():
        raise ValueError(V.targets_out_of_range(t[bad].ravel()[0]))
    eps = o.label_smoothing
    tp = t * (1.0 - eps) + eps / 2.0
    w = np.ones(x.shape) if weight is None else np.broadcast_to(np.asarray(weight, np.float64), x.shape)
    return x, tp, np.where(mask, w, 0.0), mask, o.reduction


def _reduce(loss, grad, reduction, mask):
    if reduction == "none":
        return loss, grad
    if reduction == "sum":
        return np.asarray(loss.sum()), grad
    n = float(mask.sum())
    k = 1.0 / n if n else 0.0
    return np.asarray(loss.sum() * k), grad * k


def asymmetric_loss(logits: Any, targets: Any, *, gamma_pos: float = ASL_GAMMA_POS,
                    gamma_neg: float = ASL_GAMMA_NEG, clip: float = ASL_CLIP, weight: Any = None,
                    label_smoothing: float = _options.LABEL_SMOOTHING, where: Any = None,
                    reduction: str = _options.REDUCTION) -> tuple[np.ndarray, np.ndarray]:
    """Multi-label asymmetric loss in float64 (see the module docstring)."""
    o = family_options("asymmetric", np.shape(logits), np.asarray(logits).dtype, np.shape(targets),
                       np.asarray(targets).dtype, weight_shape=None if weight is None else np.shape(weight),
                       where_shape=None if where is None else np.shape(where), reduction=reduction,
                       gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip)
    gp, gn, m = o["gamma_pos"], o["gamma_neg"], o["clip"]
    x, tp, w, mask, reduction = _sigmoid_inputs(logits, targets, weight, label_smoothing, where, reduction)
    ls, lsn = _log_sigmoid(x), _log_sigmoid(-x)
    s, sn = np.exp(ls), np.exp(lsn)
    with np.errstate(divide="ignore", invalid="ignore"):
        # positives: sn^γ₊ (-log s); d/dx = -sn^γ₊ (γ₊ s (-log s) + sn)
        mp = np.where(gp == 0, 1.0, np.exp(gp * lsn))
        l_pos = mp * -ls
        d_pos = -mp * (gp * s * -ls + sn)
        # negatives: P = max(s - m, 0), D = -log(1 - P); d/dx = s sn (γ₋ P^(γ₋-1) D + P^γ₋ / (1 - P))
        p = np.maximum(s - m, 0.0) if m > 0 else s
        one_minus = np.minimum(sn + m, 1.0) if m > 0 else sn
        d_log = -np.log1p(-p) if m > 0 else -lsn
        active = p > 0
        log_p = np.log(np.where(active, p, 1.0)) if m > 0 else ls
        mn = np.where(gn == 0, 1.0, np.where(active, np.exp(gn * log_p), 0.0))
        l_neg = mn * d_log
        # γ₋ P^(γ₋-1) D = γ₋ exp((γ₋-1) log P + log D): finite as P -> 0 (D ~ P)
        log_d = np.log(np.where(active & (d_log > 0), d_log, 1.0))
        first = np.where(active & (gn > 0), gn * np.exp((gn - 1.0) * log_p + log_d), 0.0)
        d_neg = np.where(active, s * sn * (first + mn / one_minus), 0.0)
    loss = w * (tp * l_pos + (1.0 - tp) * l_neg)
    grad = w * (tp * d_pos + (1.0 - tp) * d_neg)
    return _reduce(loss, grad, reduction, mask)


def _bce_parts(x: np.ndarray, t: np.ndarray):
    ls, lsn = _log_sigmoid(x), _log_sigmoid(-x)
    ce = -(t * ls + (1.0 - t) * lsn)
    s, sn = np.exp(ls), np.exp(lsn)
    return ce, s, sn, (1.0 - t) * s - t * sn  # ce, σ(x), σ(-x), σ(x) - t without cancellation at 0/1


def quality_focal_loss(logits: Any, targets: Any, *, beta: float = QFL_BETA, weight: Any = None,
                       where: Any = None, reduction: str = _options.REDUCTION) -> tuple[np.ndarray, np.ndarray]:
    """Quality focal loss in float64: w |t - σ(x)|^β ce(x, t)."""
    b = family_options("quality_focal", np.shape(logits), np.asarray(logits).dtype, np.shape(targets),
                       np.asarray(targets).dtype, weight_shape=None, where_shape=None, reduction=reduction,
                       beta=beta)["beta"]
    x, t, w, mask, reduction = _sigmoid_inputs(logits, targets, weight, 0.0, where, reduction)
    ce, s, sn, d = _bce_parts(x, t)
    a = np.abs(d)
    with np.errstate(divide="ignore", invalid="ignore"):
        mod = np.ones_like(a) if b == 0 else np.exp(b * np.log(np.maximum(a, 1e-300))) * (a > 0)
        dmod = (np.zeros_like(a) if b == 0 else
                np.where(a > 0, b * np.exp((b - 1.0) * np.log(np.maximum(a, 1e-300))) * np.sign(d) * s * sn, 0.0))
    loss = w * mod * ce
    grad = w * (dmod * ce + mod * d)
    return _reduce(loss, grad, reduction, mask)


def varifocal_loss(logits: Any, targets: Any, *, alpha: float = VFL_ALPHA, gamma: float = VFL_GAMMA,
                   weight: Any = None, where: Any = None,
                   reduction: str = _options.REDUCTION) -> tuple[np.ndarray, np.ndarray]:
    """Varifocal loss in float64: w ce(x, q) (q where q > 0, else α σ(x)^γ)."""
    o = family_options("varifocal", np.shape(logits), np.asarray(logits).dtype, np.shape(targets),
                       np.asarray(targets).dtype, weight_shape=None, where_shape=None, reduction=reduction,
                       alpha=alpha, gamma=gamma)
    a, g = o["alpha"], o["gamma"]
    x, q, w, mask, reduction = _sigmoid_inputs(logits, targets, weight, 0.0, where, reduction)
    ce, s, sn, d = _bce_parts(x, q)
    pos = q > 0
    ms = a * np.exp(g * _log_sigmoid(x))  # α s^γ
    factor = np.where(pos, q, ms)
    dfactor = np.where(pos, 0.0, g * ms * sn)  # d(α s^γ)/dx = γ α s^γ σ(-x)
    loss = w * factor * ce
    grad = w * (dfactor * ce + factor * d)
    return _reduce(loss, grad, reduction, mask)
