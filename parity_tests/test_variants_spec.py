"""The focal family's spec: each float64 reference against finite differences, against the plain formula of
the library that introduced it, and against the identities that tie it to the focal loss."""

from __future__ import annotations

import numpy as np
import pytest

import focal_spec
from focal_spec import _variants as variants
from focal_spec import reference

RNG = np.random.default_rng(20261201)
X = np.concatenate([RNG.normal(size=40) * 4.0, [0.0, 1e-3, -1e-3, 9.0, -9.0, 17.3, -17.3, 30.0, -30.0]])
HARD = (RNG.random(X.size) < 0.3).astype(np.float64)
SOFT = RNG.random(X.size)
IOU = np.where(RNG.random(X.size) < 0.3, RNG.uniform(0.05, 1.0, X.size), 0.0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _bce(x, t):
    return np.logaddexp(0.0, x) - t * x


def _fd(f, x, h=1e-6):
    """Central differences of an elementwise loss, one element at a time."""
    return np.array([(f(x[i:i + 1] + h, i) - f(x[i:i + 1] - h, i)) / (2 * h) for i in range(x.size)])


def _assert_grad_matches_fd(fn, targets, **kwargs):
    value, grad = fn(X, targets, reduction="none", **kwargs)
    num = _fd(lambda z, i: float(fn(z, targets[i:i + 1], reduction="sum", **kwargs)[0]), X)
    # central differences of float64 values: accurate to ~1e-8 relative of the loss' own scale
    scale = np.abs(grad) + 1e-7 * (np.abs(value) + 1e-12)
    assert np.all(np.abs(num - grad) <= 1e-5 * scale + 1e-9), np.max(np.abs(num - grad) / scale)
    assert np.isfinite(value).all() and np.isfinite(grad).all()


CASES = [
    ("asl", variants.asymmetric_loss, HARD, {"gamma_pos": 1.0, "gamma_neg": 4.0, "clip": 0.05}),
    ("asl-soft-fractional", variants.asymmetric_loss, SOFT,
     {"gamma_pos": 0.5, "gamma_neg": 0.5, "clip": 0.05, "label_smoothing": 0.1}),
    ("asl-no-clip", variants.asymmetric_loss, SOFT, {"gamma_pos": 0.3, "gamma_neg": 2.5, "clip": 0.0}),
    ("qfl", variants.quality_focal_loss, SOFT, {"beta": 2.0}),
    ("qfl-fractional", variants.quality_focal_loss, HARD, {"beta": 0.5}),
    ("vfl", variants.varifocal_loss, IOU, {}),
    ("vfl-fractional", variants.varifocal_loss, IOU, {"alpha": 0.5, "gamma": 0.5}),
    ("poly1", reference.sigmoid_focal_loss, SOFT, {"gamma": 2.0, "alpha": 0.25, "poly1": 1.0}),
    ("reduced", reference.sigmoid_focal_loss, HARD, {"gamma": 2.0, "reduced_threshold": 0.3}),  # no p_t near 0.3
    ("flsd53", reference.sigmoid_focal_loss, HARD, {"gamma": variants.FLSD_53}),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in CASES])
def test_reference_gradient_matches_finite_differences(case):
    _, fn, targets, kwargs = case
    _assert_grad_matches_fd(fn, targets, **kwargs)


def test_normalized_gradient_matches_finite_differences():
    x = X[:12]
    t = SOFT[:12]
    _, grad = reference.sigmoid_focal_loss(x, t, gamma=2.0, normalized=True, reduction="sum")
    h = 1e-6
    num = np.array([(float(reference.sigmoid_focal_loss(x + h * e, t, gamma=2.0, normalized=True,
                                                         reduction="sum")[0])
                     - float(reference.sigmoid_focal_loss(x - h * e, t, gamma=2.0, normalized=True,
                                                          reduction="sum")[0])) / (2 * h)
                    for e in np.eye(x.size)])
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-10)


def test_softmax_poly1_gradient_matches_finite_differences():
    x = RNG.normal(size=(5, 4)) * 3
    y = np.array([0, 3, 1, 2, 2])
    w = np.array([1.0, 2.0, 0.5, 1.5])
    kwargs = {"gamma": 1.5, "weight": w, "label_smoothing": 0.1, "poly1": -0.7, "axis": 1, "reduction": "sum"}
    _, grad = reference.softmax_focal_loss(x, y, **kwargs)
    h = 1e-6
    num = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        num[idx] = (float(reference.softmax_focal_loss(x + e, y, **kwargs)[0])
                    - float(reference.softmax_focal_loss(x - e, y, **kwargs)[0])) / (2 * h)
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-10)


# ----------------------------------------------------------------------------------------
# Against the plain formulas of the libraries that introduced each variant (float64, moderate logits, so
# that the plain formulas' cancellations stay below the tolerance).
# ----------------------------------------------------------------------------------------

MODERATE = np.clip(X, -8, 8)


def test_asymmetric_loss_equals_the_plain_formula():
    x, t, m, gp, gn = MODERATE, HARD, 0.05, 1.0, 4.0
    p = _sigmoid(x)
    pm = np.maximum(p - m, 0.0)
    plain = -(t * (1 - p) ** gp * np.log(p) + (1 - t) * pm ** gn * np.log(1 - pm))
    ours, _ = variants.asymmetric_loss(x, t, gamma_pos=gp, gamma_neg=gn, clip=m, reduction="none")
    np.testing.assert_allclose(ours, plain, rtol=1e-9)


def test_quality_focal_loss_equals_the_plain_formula():
    x, y, beta = MODERATE, SOFT, 2.0
    plain = np.abs(y - _sigmoid(x)) ** beta * _bce(x, y)
    ours, _ = variants.quality_focal_loss(x, y, beta=beta, reduction="none")
    np.testing.assert_allclose(ours, plain, rtol=1e-9)


def test_varifocal_loss_equals_the_plain_formula():
    x, q, alpha, gamma = MODERATE, IOU, 0.75, 2.0
    p = _sigmoid(x)
    weight = np.where(q > 0, q, alpha * np.abs(p - q) ** gamma)
    plain = _bce(x, q) * weight
    ours, _ = variants.varifocal_loss(x, q, alpha=alpha, gamma=gamma, reduction="none")
    np.testing.assert_allclose(ours, plain, rtol=1e-9)


def test_poly1_adds_its_term_to_the_focal_loss():
    x, t, eps1, gamma = MODERATE, SOFT, 2.0, 1.5
    p = _sigmoid(x)
    one_minus_pt = t * (1 - p) + (1 - t) * p
    alpha_t = 0.25 * t + 0.75 * (1 - t)
    fl, _ = reference.sigmoid_focal_loss(x, t, gamma=gamma, alpha=0.25, reduction="none")
    ours, _ = reference.sigmoid_focal_loss(x, t, gamma=gamma, alpha=0.25, poly1=eps1, reduction="none")
    np.testing.assert_allclose(ours, fl + eps1 * alpha_t * one_minus_pt ** (gamma + 1), rtol=1e-9)


def test_reduced_focal_loss_equals_the_plain_formula():
    x, t, th, gamma = MODERATE, HARD, 0.5, 2.0
    p = _sigmoid(x)
    pt = t * p + (1 - t) * (1 - p)
    plain = np.where(pt < th, 1.0, ((1 - pt) / th) ** gamma) * _bce(x, t)
    ours, _ = reference.sigmoid_focal_loss(x, t, gamma=gamma, reduced_threshold=th, reduction="none")
    np.testing.assert_allclose(ours, plain, rtol=1e-9)


# ----------------------------------------------------------------------------------------
# Identities.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_asl_with_equal_gammas_and_no_margin_is_the_focal_loss(gamma):
    ours = variants.asymmetric_loss(X, HARD, gamma_pos=gamma, gamma_neg=gamma, clip=0.0, reduction="none")
    fl = reference.sigmoid_focal_loss(X, HARD, gamma=gamma, reduction="none")
    for a, b in zip(ours, fl, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("beta", [0.5, 2.0, 3.0])
def test_qfl_with_hard_targets_is_the_focal_loss_without_alpha(beta):
    ours = variants.quality_focal_loss(X, HARD, beta=beta, reduction="none")
    fl = reference.sigmoid_focal_loss(X, HARD, gamma=beta, reduction="none")
    for a, b in zip(ours, fl, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-300)


def test_normalized_focal_loss_at_gamma_zero_is_the_mean_bce():
    value, _ = reference.sigmoid_focal_loss(X, SOFT, gamma=0.0, normalized=True, reduction="sum")
    np.testing.assert_allclose(value, _bce(X, SOFT).mean(), rtol=1e-12)


def test_reduced_threshold_of_one_is_the_cross_entropy_and_zero_is_rejected():
    value, _ = reference.sigmoid_focal_loss(MODERATE, HARD, gamma=3.0, reduced_threshold=1.0, reduction="none")
    np.testing.assert_allclose(value, _bce(MODERATE, HARD), rtol=1e-12)
    # also where p_t rounds to 1 in float64 (the decision is made on 1 - p_t)
    far = np.array([40.0, -40.0, 80.0, -80.0])
    value, _ = reference.sigmoid_focal_loss(far, np.array([1.0, 0.0, 1.0, 0.0]), gamma=3.0, reduced_threshold=1.0,
                                            reduction="none")
    np.testing.assert_allclose(value, np.log1p(np.exp(-np.abs(far))), rtol=1e-12)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="reduced_threshold"):
            reference.sigmoid_focal_loss(X, HARD, reduced_threshold=bad)


def test_flsd53_is_the_focal_loss_with_gamma_fixed_per_element():
    p = _sigmoid(X)
    pt = HARD * p + (1 - HARD) * (1 - p)
    gamma = np.where(pt < 0.2, 5.0, 3.0)
    ours = reference.sigmoid_focal_loss(X, HARD, gamma=variants.FLSD_53, reduction="none")
    fixed = reference.sigmoid_focal_loss(X, HARD, gamma=gamma, reduction="none")
    for a, b in zip(ours, fixed, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-300)
    assert set(np.unique(gamma)) == {3.0, 5.0}  # both branches are exercised


def test_class_balanced_weights():
    np.testing.assert_allclose(variants.class_balanced_weights([5, 50, 500], beta=0.0), [1.0, 1.0, 1.0])
    counts = np.array([10.0, 100.0, 1000.0])
    beta = 0.99
    w = (1 - beta) / (1 - beta**counts)
    np.testing.assert_allclose(variants.class_balanced_weights(counts, beta=beta), w * 3 / w.sum(), rtol=1e-12)
    inv = 1 / counts
    np.testing.assert_allclose(variants.class_balanced_weights(counts, beta=1.0), inv * 3 / inv.sum(), rtol=1e-12)
    assert np.isfinite(variants.class_balanced_weights([0, 3], beta=0.9)).all()
    with pytest.raises(ValueError, match="counts"):
        variants.class_balanced_weights([-1, 3])
    with pytest.raises(ValueError, match="beta"):
        variants.class_balanced_weights([1, 3], beta=1.5)


def test_gamma_schedule_validation():
    with pytest.raises(ValueError, match="gamma"):
        variants.GammaSchedule(thresholds=(0.5, 0.2), values=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="gamma"):
        variants.GammaSchedule(thresholds=(0.2,), values=(1.0,))
    with pytest.raises(ValueError, match="gamma"):
        variants.GammaSchedule(thresholds=(0.2,), values=(-1.0, 2.0))
    assert hash(variants.FLSD_53) == hash(variants.GammaSchedule((0.2,), (5.0, 3.0)))


def test_variant_options_are_validated():
    with pytest.raises(ValueError, match="gamma_neg"):
        variants.asymmetric_loss(X, HARD, gamma_neg=-1.0)
    with pytest.raises(ValueError, match="clip"):
        variants.asymmetric_loss(X, HARD, clip=1.5)
    with pytest.raises(TypeError, match="normalized"):
        reference.sigmoid_focal_loss(X, HARD, normalized=1)
    with pytest.raises(ValueError, match="poly1"):
        reference.sigmoid_focal_loss(X, HARD, poly1=float("inf"))
    with pytest.raises(ValueError, match="targets"):
        variants.quality_focal_loss(X, HARD * 255)
    assert focal_spec.reference is reference


@pytest.mark.parametrize("gamma", [0.5, 2.0, 3.5])
def test_softmax_reference_gradient_is_finite_at_extreme_margins(gamma):
    """1 - p underflows to 0 in float64 at margins beyond ~745: the reference's gradient stays finite and equals
    its limit (0 at the dominant class, the cross-entropy's p - onehot elsewhere)."""
    x = np.array([[1e4, -1e4, 3.0, 2.0], [900.0, 0.0, -5.0, 1.0]])
    _, g = reference.softmax_focal_loss(x, np.array([0, 0]), gamma=gamma, reduction="none")
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g, np.zeros_like(g))
    _, g = reference.softmax_focal_loss(x, np.array([1, 1]), gamma=gamma, reduction="none")
    np.testing.assert_allclose(g, [[1.0, -1.0, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0]], atol=1e-300)
