"""focal_jax on the inputs users pass: every integer label dtype, weights of any sign, targets outside [0, 1],
concrete option arrays, no classes, NumPy arrays and lists, 0-d and empty arrays, and pos_weight.

Expected values come from the float64 reference (``focal_spec.reference``), which never wraps integers and
raises where JAX, which cannot raise under ``jit``, returns NaN.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import focal_spec
from focal_spec import reference
from parity_tests import _harness as H

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
import focal_jax  # noqa: E402

F32 = {"rtol": 2e-5, "atol": 0.0}  # relative: a loss of 3e-7 never passes as 0


def _close(actual, expected, **tol):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), **(tol or F32))


def _softmax_expected(x, y, ignore_index, reduction="none", **kw):
    """The reference's per-position loss, NaN where the reference would raise (a label out of range)."""
    y = np.asarray(y, np.int64)
    c = x.shape[-1]
    bad = (y != ignore_index) & ((y < 0) | (y >= c))
    loss, _ = reference.softmax_focal_loss(x, np.where(bad, 0, y), where=~bad, ignore_index=ignore_index,
                                           reduction="none", **kw)
    loss = np.where(bad, np.nan, loss)
    if reduction == "none":
        return loss
    if reduction == "sum" or bad.any():
        return loss.sum()
    return reference.softmax_focal_loss(x, y, ignore_index=ignore_index, reduction=reduction, **kw)[0]


# ----------------------------------------------------------------------------------------
# A1. Integer labels of every dtype: ignore_index and the range check never wrap.
# ----------------------------------------------------------------------------------------


def test_uint8_label_156_is_class_156_not_the_default_ignore_index():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 200)).astype(np.float32)
    lab = np.array([156, 7], np.uint8)
    out = focal_jax.softmax_focal_loss(x, lab, reduction="none")
    expected, _ = reference.softmax_focal_loss(x, lab.astype(np.int64), reduction="none")
    _close(out, expected)
    _close(out, [5.3887, 7.0566], rtol=1e-4)  # 156 is a class: a loss, not the 0 of an ignored position


# (label dtype, labels, ignore_index, C): each ignore_index would wrap to one of the labels if it were
# converted to the labels' dtype (uint8: -100 -> 156, -1 -> 255; int8: 255 -> -1, 156 -> -100; ...).
WRAP = [
    ("uint8", [156, 7, 255, 3], -100, 200),
    ("uint8", [255, 7, 1, 3], -1, 256),
    ("uint8", [255, 7, 1, 3], -1, 8),  # 255 is out of range: NaN, never an ignored 0
    ("int8", [-1, 2, 5, 0], 255, 6),  # -1 is out of range: NaN
    ("int8", [-100, 2, 5, 0], 156, 6),
    ("int8", [-100, 2, 5, 0], -100, 6),  # an ignore_index the dtype holds still matches
    ("uint8", [5, 2, 5, 0], 5, 6),
    ("int16", [-1, 2, 5, 0], 65535, 6),
    ("int16", [1000, 2, 5, 0], 1000 - 65536, 1001),
    ("int32", [-1, 2, 5, 0], 2**32 - 1, 6),
    ("int32", [7, 2, 5, 0], -100, 6),  # out of range: NaN
    ("int32", [-100, 2, 5, 0], -100, 6),
    ("uint16", [65535, 2, 5, 0], -1, 6),
]


@pytest.mark.parametrize("dtype,labels,ignore_index,c", WRAP,
                         ids=[f"{d}-{lab[0]}-ignore={i}-C={c}" for d, lab, i, c in WRAP])
def test_integer_labels_are_compared_without_wrapping(dtype, labels, ignore_index, c):
    rng = np.random.default_rng(len(labels) + c)
    x = rng.normal(size=(4, c)).astype(np.float32)
    y = np.array(labels).astype(dtype)
    assert np.array_equal(y.astype(np.int64), labels)  # the labels themselves are representable
    fn = jax.jit(lambda a, b: (focal_jax.softmax_focal_loss(a, b, ignore_index=ignore_index, reduction="none"),
                               focal_jax.softmax_focal_loss(a, b, ignore_index=ignore_index, weight=jnp.ones(c))))
    for got, reduction in zip(fn(x, jnp.asarray(y)), ("none", "mean"), strict=True):
        expected = _softmax_expected(x.astype(np.float64), labels, ignore_index, reduction)
        np.testing.assert_array_equal(np.isnan(np.asarray(got)), np.isnan(expected))
        _close(np.nan_to_num(np.asarray(got, np.float64)), np.nan_to_num(expected))


def test_int64_labels_under_x64(x64):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5))
    y = np.array([2**40, 4, -100], np.int64)
    out = focal_jax.softmax_focal_loss(jnp.asarray(x), jnp.asarray(y), reduction="none")
    assert jnp.asarray(y).dtype == jnp.int64
    expected = _softmax_expected(x, y, -100)
    np.testing.assert_array_equal(np.isnan(np.asarray(out)), np.isnan(expected))
    np.testing.assert_allclose(np.nan_to_num(np.asarray(out)), np.nan_to_num(expected), rtol=1e-12)
    # an ignore_index beyond int64 matches nothing; one that int64 holds matches
    out = focal_jax.softmax_focal_loss(jnp.asarray(x), jnp.asarray(np.array([1, 4, 2**40])),
                                       ignore_index=2**40, reduction="none")
    np.testing.assert_allclose(np.asarray(out), _softmax_expected(x, [1, 4, 2**40], 2**40), rtol=1e-12)


NARROWED = {  # NumPy int64 values that int32 (JAX's int without x64) cannot hold: each would wrap to another one
    "softmax": lambda y: focal_jax.softmax_focal_loss(np.zeros((len(y), 3), np.float32), y, reduction="none"),
    "softmax-ignored": lambda y: focal_jax.softmax_focal_loss(np.zeros((len(y), 3), np.float32), y,
                                                              ignore_index=-(2**40), reduction="none"),
    "linear": lambda y: focal_jax.linear_softmax_focal_loss(np.ones((len(y), 2), np.float32),
                                                            np.ones((3, 2), np.float32), y, reduction="none"),
    "sigmoid": lambda y: focal_jax.sigmoid_focal_loss(np.zeros(len(y), np.float32), y, reduction="none"),
}


@pytest.mark.parametrize("value", [2**32 + 1, -(2**40)])
@pytest.mark.parametrize("loss", sorted(NARROWED))
def test_host_int64_labels_that_int32_cannot_hold_are_an_error_without_x64(loss, value):
    """Without x64, JAX narrows NumPy int64 to int32: 2**32 + 1 would become class 1 and -2**40 class 0 (counted
    even where it is the ignore_index). Host values are read before that, and such a value is an error."""
    if jax.config.jax_enable_x64:
        pytest.skip("x64 is on: int64 labels are kept as they are (test_int64_labels_under_x64)")
    y = np.array([1, value, 0], np.int64)
    with pytest.raises(ValueError, match=rf"Invalid value for argument `(labels|targets)`.*int32.*={value}$"):
        NARROWED[loss](y)
    ok = np.asarray(NARROWED[loss](np.array([1, 2**31 - 1 if loss != "sigmoid" else 1, 0], np.int64)))
    assert ok.shape == (3,)  # values that int32 holds are converted as before (an out-of-range class: NaN)


# 5 classes, and enough for the index kernel's per-position mask (focal_jax._softmax.ROW_MASK_MIN_CLASSES)
GARBAGE_CLASSES = [5, 130]


@pytest.mark.parametrize("c", GARBAGE_CLASSES)
@pytest.mark.parametrize("dtype,ignore_index", [("uint8", 255), ("uint8", 0), ("int8", -1), ("uint16", 65535)])
def test_garbage_at_ignored_positions_of_small_label_dtypes_is_harmless(dtype, ignore_index, c):
    from focal_jax import _softmax

    assert max(GARBAGE_CLASSES) >= _softmax.ROW_MASK_MIN_CLASSES > min(GARBAGE_CLASSES)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, c)).astype(np.float32)
    y = np.array([1, ignore_index, 3, ignore_index]).astype(dtype)
    x[1], x[3] = np.nan, np.inf  # ignored positions may hold anything
    x[3, 0] = -np.inf
    counted = np.array([0, 2])
    for kw in ({}, {"label_smoothing": 0.1}):
        value, grad = jax.value_and_grad(
            lambda a, kw=kw: focal_jax.softmax_focal_loss(a, y, ignore_index=ignore_index, **kw))(x)
        want = H.expected("softmax", H.Inputs(x[counted].astype(np.float64), y[counted].astype(np.int64), kw,
                                              "float32"))
        want.check(value, np.asarray(grad)[counted], "float32", f"C={c} {kw}")
        assert np.all(np.asarray(grad)[[1, 3]] == 0.0)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16", "int32"])
def test_every_label_dtype_matches_the_reference_with_smoothing_and_weights(dtype):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    y = rng.integers(0, 5, size=6).astype(dtype)
    w = rng.uniform(0.5, 2.0, size=5).astype(np.float32)
    for kw in ({"gamma": 2.0}, {"gamma": 1.5, "label_smoothing": 0.1, "weight": w}):
        out = focal_jax.softmax_focal_loss(x, y, reduction="mean", **kw)
        _close(out, reference.softmax_focal_loss(x, y.astype(np.int64), reduction="mean", **kw)[0])


# ----------------------------------------------------------------------------------------
# A2. Weighted mean: divide by Σ w[y_i] whatever its sign; exactly 0 gives 0.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [[-1.0, -1.0, -1.0, -1.0], [1.0, -3.0, 0.5, 2.0], [1.0, 1.0, 0.0, -2.0]],
                         ids=["all-negative", "negative-sum", "zero-sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_weighted_mean_divides_like_cross_entropy_whatever_the_sign(weight, smoothing):
    x = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0], [3.0, 1.0, -2.0, 0.5]], np.float32)
    y = np.array([3, 1, 0])  # Σ w[y]: -3, -0.5, 0
    w = np.array(weight, np.float32)
    denom = w[y].sum()
    value, grad = jax.value_and_grad(lambda a: focal_jax.softmax_focal_loss(a, y, weight=w, gamma=0.0,
                                                                            label_smoothing=smoothing))(x)
    want = H.expected("softmax", H.Inputs(x.astype(np.float64), y, {"weight": w.astype(np.float64), "gamma": 0.0,
                                                                     "label_smoothing": smoothing}, "float32"))
    if denom == 0:
        assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)
        assert want.value == 0.0
    else:
        assert denom < 0 and float(value) != 0.0
    want.check(value, grad, "float32", f"weight={weight}")


def test_negative_weights_mean_matches_the_cross_entropy_value():
    # F.cross_entropy(x, y, weight=-torch.ones(4)) for these inputs is 2.1314 (sum / Σ w[y] = -sum / -2)
    x = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0]], np.float32)
    y = np.array([0, 1])
    out = focal_jax.softmax_focal_loss(x, y, weight=-np.ones(4, np.float32), gamma=0.0)
    ce = -(jax.nn.log_softmax(x)[np.arange(2), y]).mean()
    _close(out, ce)
    _close(out, reference.softmax_focal_loss(x, y, weight=-np.ones(4), gamma=0.0)[0])


# ----------------------------------------------------------------------------------------
# A3. Sigmoid targets outside [0, 1] at counted elements: NaN for that element only.
# ----------------------------------------------------------------------------------------

BAD_TARGETS = [
    ("float32", [[1.0, 0.0, 255.0], [0.3, -0.5, 1.5]]),
    ("uint8", [[1, 0, 255], [0, 1, 2]]),
    ("int32", [[1, -1, 0], [0, 1, 7]]),
    ("int8", [[1, 0, -128], [2, 1, 0]]),
    ("float32", [[1.0, np.nan, 0.0], [0.5, 0.25, np.inf]]),
]


@pytest.mark.parametrize("dtype,targets", BAD_TARGETS, ids=[f"{d}-{i}" for i, (d, _) in enumerate(BAD_TARGETS)])
def test_sigmoid_targets_outside_unit_interval_are_nan(dtype, targets):
    x = np.array([[2.0, -1.0, 2.0], [0.5, 3.0, -2.0]], np.float32)
    t = np.array(targets).astype(dtype)
    tf = t.astype(np.float64)
    bad = ~((tf >= 0) & (tf <= 1))
    fn = jax.jit(lambda a, b, **kw: focal_jax.sigmoid_focal_loss(a, b, alpha=0.25, **kw),
                 static_argnames=("reduction",))
    out = np.asarray(fn(x, t, reduction="none"))
    np.testing.assert_array_equal(np.isnan(out), bad)
    expected, _ = reference.sigmoid_focal_loss(x, np.where(bad, 0.0, tf), alpha=0.25, where=~bad, reduction="none")
    _close(out[~bad], expected[~bad])
    assert np.isnan(float(fn(x, t, reduction="mean")))
    # masked elements may hold anything
    masked = np.asarray(focal_jax.sigmoid_focal_loss(x, t, alpha=0.25, where=~bad, reduction="none"))
    _close(masked, expected)
    value, grad = jax.value_and_grad(lambda a: focal_jax.sigmoid_focal_loss(a, t, alpha=0.25, where=~bad))(x)
    want = H.expected("sigmoid", H.Inputs(x.astype(np.float64), np.where(bad, 0.0, tf),
                                          {"alpha": 0.25, "where": ~bad}, "float32"))
    want.check(value, grad, "float32", "masked")


def test_sigmoid_255_target_is_not_a_large_negative_number():
    # the plain formula gives -1.9e7 here; a counted 255 is NaN, whatever the dtype
    for t in (np.array([255.0], np.float32), np.array([255], np.uint8)):
        assert np.isnan(np.asarray(focal_jax.sigmoid_focal_loss(np.array([2.0], np.float32), t,
                                                                reduction="none"))).all()


def test_bool_targets_are_in_range():
    x = np.array([2.0, -1.0, 0.5], np.float32)
    t = np.array([True, False, True])
    _close(focal_jax.sigmoid_focal_loss(x, t, reduction="none"),
           reference.sigmoid_focal_loss(x, t.astype(np.float64), reduction="none")[0])


# ----------------------------------------------------------------------------------------
# A4. Option arrays: concrete arrays are range-checked, traced ones by shape only.
# ----------------------------------------------------------------------------------------

X = np.zeros((4, 3), np.float32)
T = np.zeros((4, 3), np.float32)
Y = np.zeros((4,), np.int32)


def _spec_error(loss, kwargs, labels=None):
    fn = reference.sigmoid_focal_loss if loss == "sigmoid" else reference.softmax_focal_loss
    with pytest.raises(Exception) as info:
        fn(X, (T if loss == "sigmoid" else Y) if labels is None else labels, **kwargs)
    return info.value


def _raises_like_spec(expected, fn):
    with pytest.raises(type(expected), match="^" + re.escape(str(expected)) + r"($|\n)"):
        fn()


ARRAY_OPTIONS = [
    ("alpha-above-one", "sigmoid", {"alpha": [0.2, 1.2, 0.5]}),
    ("alpha-negative", "sigmoid", {"alpha": [0.2, -0.1, 0.5]}),
    ("alpha-0d", "sigmoid", {"alpha": 1.5}),
    ("gamma-negative", "sigmoid", {"gamma": [1.0, -2.0, 0.5]}),
    ("gamma-0d-nan", "softmax", {"gamma": np.nan}),
    ("gamma-per-class-negative", "softmax", {"gamma": [1.0, 2.0, -0.5]}),
    ("label-smoothing-0d", "softmax", {"label_smoothing": 1.5}),
    ("label-smoothing-0d-sigmoid", "sigmoid", {"label_smoothing": -0.5}),
]


@pytest.mark.parametrize("kind", ["numpy", "jax", "jax-closed-over-by-jit"])
@pytest.mark.parametrize("name,loss,kwargs", ARRAY_OPTIONS, ids=[r[0] for r in ARRAY_OPTIONS])
def test_concrete_option_arrays_out_of_range_raise_the_spec_error(name, loss, kwargs, kind):
    host = {k: np.asarray(v, np.float32) for k, v in kwargs.items()}
    expected = _spec_error(loss, host)  # the message shows the float32 value the backend holds
    assert type(expected) is ValueError
    kw = host if kind == "numpy" else {k: jnp.asarray(v) for k, v in host.items()}
    fn = focal_jax.sigmoid_focal_loss if loss == "sigmoid" else focal_jax.softmax_focal_loss
    labels = T if loss == "sigmoid" else Y
    if kind == "jax-closed-over-by-jit":
        _raises_like_spec(expected, lambda: jax.jit(lambda a, b: fn(a, b, **kw))(X, labels))
    else:
        _raises_like_spec(expected, lambda: fn(X, labels, **kw))


def test_traced_options_are_checked_by_shape_only():
    # a traced alpha of 1.5 cannot be read under jit: no error (documented), and a finite number
    out = jax.jit(lambda a: focal_jax.sigmoid_focal_loss(X, T, alpha=a))(jnp.full((3,), 1.5))
    assert np.isfinite(float(out))
    expected = _spec_error("sigmoid", {"alpha": np.full((2,), 0.5)})  # a shape error is still raised
    _raises_like_spec(expected, lambda: jax.jit(lambda a: focal_jax.sigmoid_focal_loss(X, T, alpha=a))(
        jnp.full((2,), 0.5)))
    expected = _spec_error("softmax", {"gamma": np.ones(2)})
    _raises_like_spec(expected, lambda: jax.jit(lambda g: focal_jax.softmax_focal_loss(X, Y, gamma=g))(
        jnp.ones(2)))
    expected = _spec_error("softmax", {"label_smoothing": np.array([0.1, 0.2])})
    _raises_like_spec(expected, lambda: jax.jit(lambda e: focal_jax.softmax_focal_loss(X, Y, label_smoothing=e))(
        jnp.array([0.1, 0.2])))


WRONG_TYPES = [
    ("gamma-none", "softmax", {"gamma": None}),
    ("gamma-none-sigmoid", "sigmoid", {"gamma": None}),
    ("gamma-string", "sigmoid", {"gamma": "2"}),
    ("alpha-string", "sigmoid", {"alpha": "1.5"}),
    ("label-smoothing-string", "softmax", {"label_smoothing": "0.1"}),
    ("label-smoothing-none", "sigmoid", {"label_smoothing": None}),
    ("reduction-none", "softmax", {"reduction": None}),
    ("ignore-index-string", "softmax", {"ignore_index": "255"}),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name,loss,kwargs", WRONG_TYPES, ids=[r[0] for r in WRONG_TYPES])
def test_wrong_option_types_raise_the_spec_error(name, loss, kwargs, jit):
    expected = _spec_error(loss, kwargs)
    fn = focal_jax.sigmoid_focal_loss if loss == "sigmoid" else focal_jax.softmax_focal_loss
    labels = T if loss == "sigmoid" else Y
    call = (lambda: jax.jit(lambda a, b: fn(a, b, **kwargs))(X, labels)) if jit else (lambda: fn(X, labels, **kwargs))
    _raises_like_spec(expected, call)


WHERE_NOT_BOOL = [
    ("float32", "sigmoid", np.full((4, 3), 0.3, np.float32)),
    ("int32", "softmax", np.ones((4,), np.int32)),
    ("float64", "softmax", [1.0, 0.0, 1.0, 1.0]),  # a list of floats is float64 data
    ("uint8", "normalizer", np.ones((4, 3), np.uint8)),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype,loss,where", WHERE_NOT_BOOL, ids=[f"{w[1]}-{w[0]}" for w in WHERE_NOT_BOOL])
def test_where_must_be_boolean(dtype, loss, where, jit):
    with pytest.raises(TypeError) as info:
        focal_spec.check_where_dtype(np.asarray(where).dtype)
    assert dtype in str(info.value)
    if loss == "normalizer":
        fn = lambda: focal_jax.positive_normalizer(T, where=where)  # noqa: E731
    elif loss == "sigmoid":
        fn = lambda: focal_jax.sigmoid_focal_loss(X, T, where=where)  # noqa: E731
    else:
        fn = lambda: focal_jax.softmax_focal_loss(X, Y, where=where)  # noqa: E731
    _raises_like_spec(info.value, jax.jit(fn) if jit else fn)


# ----------------------------------------------------------------------------------------
# A5. No classes (C = 0).
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_zero_classes_and_zero_positions_give_zero_with_right_shaped_gradients(reduction):
    x = jnp.zeros((0, 0))
    y = jnp.zeros((0,), jnp.int32)
    value, grad = jax.value_and_grad(lambda a: focal_jax.softmax_focal_loss(a, y, reduction=reduction))(x)
    assert float(value) == 0.0 and grad.shape == (0, 0)
    assert float(reference.softmax_focal_loss(np.zeros((0, 0)), np.zeros(0, np.int64), reduction=reduction)[0]) == 0
    w = jnp.zeros((0,))
    value, (gx, gw) = jax.value_and_grad(
        lambda a, b: focal_jax.softmax_focal_loss(a, y, weight=b, reduction=reduction), argnums=(0, 1))(x, w)
    assert float(value) == 0.0 and gx.shape == (0, 0) and gw.shape == (0,)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_zero_classes_with_positions(reduction):
    x = jnp.zeros((3, 0))
    ignored = jnp.full((3,), -100)
    value, grad = jax.value_and_grad(
        lambda a: jnp.sum(focal_jax.softmax_focal_loss(a, ignored, reduction=reduction)))(x)
    assert float(value) == 0.0 and grad.shape == (3, 0)
    probs = jnp.zeros((3, 0))
    assert float(jnp.sum(focal_jax.softmax_focal_loss(x, probs, reduction=reduction))) == 0.0
    # a counted label has no class to be: out of range, NaN (the reference raises)
    out = np.asarray(focal_jax.softmax_focal_loss(x, jnp.array([0, -100, 1]), reduction=reduction))
    assert np.isnan(out).any()
    if reduction == "none":
        np.testing.assert_array_equal(np.isnan(out), [True, False, True])
    with pytest.raises(ValueError):
        reference.softmax_focal_loss(np.zeros((3, 0)), np.array([0, -100, 1]), reduction=reduction)


# ----------------------------------------------------------------------------------------
# A6. The original modules' call checks.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("logits", [True, False])
def test_classification_module_rejects_another_class_count(logits):
    loss = focal_jax.ClassificationFocalLoss(3, logits=logits)
    pred = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError) as info:
        focal_spec.check_original_call((2, 4), "float32", (2,), None, 1, True, 3)
    _raises_like_spec(info.value, lambda: loss(pred, np.array([0, 1])))
    _raises_like_spec(info.value, lambda: jax.jit(lambda p, t: loss(p, t))(pred, np.array([0, 1])))


@pytest.mark.parametrize("dtype", ["int32", "int8"])
@pytest.mark.parametrize("value", [-1, -100, 3])
@pytest.mark.parametrize("logits", [True, False])
def test_classification_module_class_index_out_of_range(logits, value, dtype):
    loss = focal_jax.ClassificationFocalLoss(3, logits=logits)
    pred = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)
    teacher = np.array([0, value, 2]).astype(dtype)
    msg = focal_spec.label_out_of_range(value, 3, None)
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        loss(pred, jnp.asarray(teacher))
    assert np.isnan(float(jax.jit(lambda p, t: loss(p, t))(pred, teacher)))  # traced: NaN, never a number


def test_classification_module_uint8_indices():
    pred = np.random.default_rng(0).normal(size=(2, 300)).astype(np.float32)
    teacher = np.array([200, 7], np.uint8)
    for logits in (True, False):
        loss = focal_jax.ClassificationFocalLoss(300, logits=logits)
        expected, _ = reference.original_focal_loss(pred, teacher.astype(np.int64), logits=logits, n_classes=300)
        _close(loss(pred, teacher), expected)


# ----------------------------------------------------------------------------------------
# A7. pos_weight.
# ----------------------------------------------------------------------------------------

POS_WEIGHT_CASES = [
    {"gamma": 2.0},
    {"gamma": 0.5, "alpha": 0.25},
    {"gamma": 0.0, "label_smoothing": 0.1},
    {"gamma": 3.0, "alpha": "per_class", "weight": "per_class", "where": "mask"},
]


@pytest.mark.parametrize("pw_shape", ["per_class", "full", "scalar"])
@pytest.mark.parametrize("kw", POS_WEIGHT_CASES, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_pos_weight_matches_the_reference(kw, pw_shape):
    rng = np.random.default_rng(3)
    x = rng.normal(scale=3.0, size=(5, 3))
    t = (rng.uniform(size=(5, 3)) < 0.4).astype(np.float64)
    pw = {"per_class": rng.uniform(0.5, 4.0, size=3), "full": rng.uniform(0.5, 4.0, size=(5, 3)),
          "scalar": np.array(3.0)}[pw_shape]
    kw = dict(kw)
    for k in ("alpha", "weight"):
        if kw.get(k) == "per_class":
            kw[k] = rng.uniform(0.1, 0.9, size=3)
    if kw.get("where") == "mask":
        kw["where"] = rng.uniform(size=(5, 3)) < 0.7
    fn = lambda a: focal_jax.sigmoid_focal_loss(a, t, pos_weight=pw, reduction="none", **kw)  # noqa: E731
    x32 = x.astype(np.float32)
    # the reference on the inputs as held in float32; the contract's scales, with every term times
    # max(1, π) (π multiplies the positive terms only: an upper bound on their magnitudes)
    held = H.as_held(H.Inputs(x32.astype(np.float64), t, dict(kw, reduction="none"), "float32"))
    pw32 = H.round_to(pw, "float32")
    ref_v, ref_g = reference.sigmoid_focal_loss(held.logits, t, pos_weight=pw32, **held.kwargs)
    sv, sg = H.sigmoid_scales(held)
    big = np.maximum(1.0, pw32)
    H.assert_close(fn(x32), ref_v, "float32", "value", scale=sv * big)
    # elementwise: the sum's gradient is dℓ_i/dx_i
    H.assert_close(jax.grad(lambda a: jnp.sum(fn(a)))(x32), ref_g, "float32", "gradient", scale=sg * big)


def test_pos_weight_at_gamma_zero_is_weighted_bce():
    import optax

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(scale=4.0, size=(6, 3)), jnp.float32)
    t = jnp.asarray(rng.uniform(size=(6, 3)), jnp.float32)
    pw = jnp.asarray([0.5, 2.0, 5.0], jnp.float32)

    def weighted_bce(a):
        # F.binary_cross_entropy_with_logits(pos_weight=π): bce + (π - 1) t (-log σ(x))
        return jnp.mean(optax.sigmoid_binary_cross_entropy(a, t) - (pw - 1.0) * t * jax.nn.log_sigmoid(a))

    ours = jax.value_and_grad(lambda a: focal_jax.sigmoid_focal_loss(a, t, gamma=0.0, pos_weight=pw))(x)
    theirs = jax.value_and_grad(weighted_bce)(x)
    _close(ours[0], theirs[0])
    # the gradient (1-t)σ(x) - π t σ(-x) is a difference: relative to the magnitudes of the terms of
    # optax's form σ(x) - t - (π-1) t σ(-x), at the former rtol
    x64, t64, pw64 = (np.asarray(v, np.float64) for v in (x, t, pw))
    s, sn = 1 / (1 + np.exp(-x64)), 1 / (1 + np.exp(x64))
    terms = (s + t64 + np.abs(pw64 - 1.0) * t64 * sn) / x64.size
    H.assert_close(ours[1], theirs[1], "float32", "gradient", scale=1e1 * terms)


def test_pos_weight_follows_weight_in_the_signature():
    import inspect

    names = list(inspect.signature(focal_jax.sigmoid_focal_loss).parameters)
    assert names.index("pos_weight") == names.index("weight") + 1


# ----------------------------------------------------------------------------------------
# A8. What users pass: NumPy arrays, lists, numbers, 0-d and empty arrays, one class.
# ----------------------------------------------------------------------------------------


def test_numpy_lists_and_numbers():
    x, t = [[2.0, -1.0], [0.5, -3.0]], [[1.0, 0.0], [0.0, 1.0]]
    expected, _ = reference.sigmoid_focal_loss(np.array(x), np.array(t), alpha=0.25)
    for xx, tt in ((x, t), (np.array(x, np.float32), np.array(t, np.float32)), (x, np.array(t, np.uint8))):
        _close(focal_jax.sigmoid_focal_loss(xx, tt, alpha=0.25), expected)
    _close(focal_jax.sigmoid_focal_loss(2.0, 1.0, reduction="none"),
           reference.sigmoid_focal_loss(np.float64(2.0), np.float64(1.0), reduction="none")[0])
    logits, labels = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], [0, 1]
    _close(focal_jax.softmax_focal_loss(logits, labels, weight=[1.0, 2.0, 0.5]),
           reference.softmax_focal_loss(np.array(logits), np.array(labels), weight=np.array([1.0, 2.0, 0.5]))[0])
    _close(focal_jax.softmax_focal_loss(np.array(logits, np.float32), np.array(labels, np.int64), gamma=1),
           reference.softmax_focal_loss(np.array(logits), np.array(labels), gamma=1)[0])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_zero_dimensional_logits(reduction):
    x = jnp.asarray(1.5)
    for t in (jnp.asarray(0.0), jnp.asarray(True), 1):
        value, grad = jax.value_and_grad(
            lambda a, t=t: jnp.sum(focal_jax.sigmoid_focal_loss(a, t, reduction=reduction)))(x)
        ref_v, ref_g = reference.sigmoid_focal_loss(np.float64(1.5), np.float64(t), reduction=reduction)
        _close(value, ref_v)
        _close(grad, ref_g)
        assert grad.shape == ()


EMPTY = [
    ("sigmoid", (0,), (0,), (0,)),
    ("sigmoid", (0, 4), (4,), (0, 4)),
    ("softmax", (0, 4), (0,), (0,)),
    ("softmax", (0, 4), (0, 4), (0,)),
]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("loss,x_shape,y_shape,out_shape", EMPTY, ids=[f"{e[0]}-{e[1]}-{e[2]}" for e in EMPTY])
def test_empty_arrays(loss, x_shape, y_shape, out_shape, reduction):
    fn = focal_jax.sigmoid_focal_loss if loss == "sigmoid" else focal_jax.softmax_focal_loss
    x = jnp.zeros(x_shape)
    y = jnp.zeros(y_shape, jnp.int32 if loss == "softmax" and len(y_shape) == 1 else jnp.float32)
    out = fn(x, y, reduction=reduction)
    assert out.shape == (out_shape if reduction == "none" else ())
    value, grad = jax.value_and_grad(lambda a: jnp.sum(fn(a, y, reduction=reduction)))(x)
    assert float(value) == 0.0 and grad.shape == x.shape


@pytest.mark.parametrize("labels", ["index", "probs"])
def test_one_class_is_zero_loss_and_zero_gradient(labels):
    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 1)), jnp.float32)
    y = jnp.zeros((4,), jnp.int32) if labels == "index" else jnp.ones((4, 1))
    for gamma in (0.0, 2.0, 0.5, jnp.asarray(0.5)):
        value, grad = jax.value_and_grad(lambda a, g=gamma: focal_jax.softmax_focal_loss(a, y, gamma=g))(x)
        assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)


BF16_OPTIONS = {
    "sigmoid-alpha": (lambda o: focal_jax.sigmoid_focal_loss(_BX, _BT, alpha=o), [0.25, 0.5, 0.75]),
    "sigmoid-weight": (lambda o: focal_jax.sigmoid_focal_loss(_BX, _BT, weight=o), [1.0, 2.0, 0.5]),
    "sigmoid-pos_weight": (lambda o: focal_jax.sigmoid_focal_loss(_BX, _BT, pos_weight=o), [1.0, 3.0, 0.5]),
    "sigmoid-gamma": (lambda o: focal_jax.sigmoid_focal_loss(_BX, _BT, gamma=o), [2.0, 1.5, 0.0]),
    "softmax-weight": (lambda o: focal_jax.softmax_focal_loss(_BX, _BY, weight=o), [1.0, 2.0, 0.5]),
    "softmax-gamma": (lambda o: focal_jax.softmax_focal_loss(_BX, _BY, gamma=o), [2.0, 1.5, 0.0]),
    "asymmetric-weight": (lambda o: focal_jax.asymmetric_loss(_BX, _BT, weight=o), [1.0, 2.0, 0.5]),
}
_BX = np.random.default_rng(11).normal(size=(4, 3)).astype(np.float32) * 2
_BT = (np.random.default_rng(12).random((4, 3)) < 0.4).astype(np.float32)
_BY = np.array([0, 2, 1, 2])


@pytest.mark.parametrize("name", sorted(BF16_OPTIONS))
def test_bfloat16_and_float16_option_arrays_are_their_values(name):
    """An option array of a half dtype (bfloat16's NumPy kind is not "f") is checked and used as its values, as
    torch takes a half-precision tensor: the float32 array of the same values gives the same loss."""
    fn, values = BF16_OPTIONS[name]
    expected = np.asarray(fn(jnp.asarray(values, jnp.float32)))
    for dtype in (jnp.bfloat16, jnp.float16):
        option = jnp.asarray(values, dtype)
        np.testing.assert_array_equal(np.asarray(fn(option)), expected)
        np.testing.assert_array_equal(np.asarray(fn(np.asarray(option))), expected)  # as a NumPy array too
