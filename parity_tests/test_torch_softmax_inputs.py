"""torch ``softmax_focal_loss`` on every kind of input: C = 0 and C = 1, signed weights in the weighted
mean, every integer label dtype, errors, memory layouts, and the accelerator branches (run on the CPU)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import focal_spec
from focal_spec import reference
from parity_tests import _harness as H

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _ft():
    import focal_torch

    return focal_torch


_value_and_grad = H.torch_value_and_grad


def _check_reference(fn, x: np.ndarray, y: np.ndarray, dtype: str = "float64", **kw):
    """``fn(logits, labels)`` (torch, class dim 1) against the float64 reference, value and gradient."""
    ref_v, ref_g = reference.softmax_focal_loss(x, y, axis=1, **kw)
    tx = torch.tensor(x, dtype=getattr(torch, dtype))
    v, g = _value_and_grad(lambda z: fn(z, torch.as_tensor(y)), tx)
    H.assert_close(v, ref_v, dtype, "value")
    H.assert_close(g, ref_g, dtype, "gradient")


# ----------------------------------------------------------------------------------------
# C = 0 and C = 1.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(0, 0), (3, 0), (2, 0, 4)], ids=lambda s: "x".join(map(str, s)))
def test_zero_classes_over_no_counted_position_is_zero(shape, reduction):
    ft = _ft()
    positions = shape[:1] + shape[2:]
    y = torch.full(positions, -100, dtype=torch.long)
    x = torch.zeros(shape, requires_grad=True)
    out = ft.softmax_focal_loss(x, y, reduction=reduction)
    assert out.shape == (positions if reduction == "none" else ())
    assert torch.equal(out.detach(), torch.zeros(out.shape))
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == shape


def test_zero_classes_with_a_counted_label_raises():
    ft = _ft()
    msg = focal_spec.label_out_of_range(0, 0, -100)
    with pytest.raises(ValueError, match=re.escape(msg)):
        ft.softmax_focal_loss(torch.zeros(2, 0), torch.tensor([0, -100]))


def test_zero_classes_zero_positions():
    ft = _ft()
    x = torch.zeros(0, 0, requires_grad=True)
    out = ft.softmax_focal_loss(x, torch.zeros(0, dtype=torch.long))
    assert out.item() == 0.0
    out.backward()
    assert x.grad.shape == (0, 0)


@pytest.mark.parametrize("labels", ["index", "probs"])
def test_one_class_is_zero_with_zero_gradient(labels):
    ft = _ft()
    x = torch.tensor([[3.0], [-50.0], [0.0]])
    y = torch.zeros(3, dtype=torch.long) if labels == "index" else torch.ones(3, 1)
    v, g = _value_and_grad(lambda z: ft.softmax_focal_loss(z, y, gamma=0.5, reduction="none"), x)
    assert torch.equal(v, torch.zeros(3)) and torch.equal(g, torch.zeros(3, 1))


# ----------------------------------------------------------------------------------------
# Weighted mean: divide by Σ w[y] whatever its sign; exactly 0 gives 0.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [[-1.0, -1.0, -1.0, -1.0], [0.5, -2.0, 1.0, -0.25]], ids=["minus-ones", "mixed"])
def test_weighted_mean_with_non_positive_denominator_equals_cross_entropy(weight):
    ft = _ft()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64) * 2
    y = torch.tensor([0, 1, 2, 3, 1, 1])
    w = torch.tensor(weight, dtype=torch.float64)
    assert float(w[y].sum()) <= 0
    ce_v, ce_g = _value_and_grad(lambda z: F.cross_entropy(z, y, weight=w), x)
    v, gr = _value_and_grad(lambda z: ft.softmax_focal_loss(z, y, gamma=0.0, weight=w), x)
    H.assert_close(v, ce_v.numpy(), "float64", "value")
    H.assert_close(gr, ce_g.numpy(), "float64", "gradient")
    _check_reference(lambda z, t: ft.softmax_focal_loss(z, t, gamma=2.0, weight=w), x.numpy(), y.numpy(),
                     gamma=2.0, weight=w.numpy())


@pytest.mark.parametrize("weight", [[-1.0, -1.0, -1.0, -1.0], [0.5, -2.0, 1.0, -0.25]], ids=["minus-ones", "mixed"])
def test_weighted_mean_with_non_positive_denominator_smooth_formula(weight):
    """The same mean when the weight takes a gradient (the differentiable formula)."""
    ft = _ft()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64) * 2
    y = torch.tensor([0, 1, 2, 3, 1, 1])
    w = torch.tensor(weight, dtype=torch.float64, requires_grad=True)
    ce_v, ce_g = _value_and_grad(lambda z: F.cross_entropy(z, y, weight=w.detach()), x)
    v, gr = _value_and_grad(lambda z: ft.softmax_focal_loss(z, y, gamma=0.0, weight=w), x)
    H.assert_close(v, ce_v.numpy(), "float64", "value")
    H.assert_close(gr, ce_g.numpy(), "float64", "gradient")


@pytest.mark.parametrize("path", ["kernel", "smooth"])
def test_weighted_mean_with_zero_denominator_is_zero(path):
    ft = _ft()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    w = torch.tensor([1.0, -1.0, 5.0], dtype=torch.float64, requires_grad=path == "smooth")
    xg = x.clone().requires_grad_()
    out = ft.softmax_focal_loss(xg, y, weight=w)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(xg.grad, torch.zeros_like(x))


# ----------------------------------------------------------------------------------------
# Integer label dtypes: no wrapping of ignore_index or of the labels.
# ----------------------------------------------------------------------------------------

INT_DTYPES = ["int8", "uint8", "int16", "int32", "int64"]


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_every_integer_label_dtype_equals_int64(dtype):
    ft = _ft()
    rng = np.random.default_rng(11)
    x = rng.normal(size=(7, 5, 3))
    y = rng.integers(0, 5, size=(7, 3))
    tdt = getattr(torch, dtype)
    _check_reference(lambda z, t: ft.softmax_focal_loss(z, t.to(tdt), gamma=2.0, ignore_index=4), x, y,
                     gamma=2.0, ignore_index=4)


@pytest.mark.parametrize("dtype,label,ignore_index", [
    ("uint8", 156, -100),  # -100 wraps to 156 in uint8: it must not match
    ("int8", -1, 255),  # 255 wraps to -1 in int8: it must not match
    ("uint8", 255, -1),  # -1 wraps to 255 in uint8: it must not match
], ids=["uint8-156-vs-minus100", "int8-minus1-vs-255", "uint8-255-vs-minus1"])
def test_ignore_index_does_not_wrap(dtype, label, ignore_index):
    ft = _ft()
    tdt = getattr(torch, dtype)
    if label < 0:  # a negative label is out of range: it raises, it is never taken for ignore_index
        msg = focal_spec.label_out_of_range(label, 4, ignore_index)
        with pytest.raises(ValueError, match=re.escape(msg)):
            ft.softmax_focal_loss(torch.zeros(2, 4), torch.tensor([label, 1], dtype=tdt), ignore_index=ignore_index)
        return
    c = 260
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, c))
    y = np.array([label, 3, label])
    _check_reference(lambda z, t: ft.softmax_focal_loss(z, t.to(tdt), ignore_index=ignore_index), x, y,
                     ignore_index=ignore_index)


@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("value", [5, -3], ids=["too-large", "negative"])
def test_out_of_range_label_names_the_value(dtype, value):
    ft = _ft()
    if value < 0 and dtype == "uint8":
        pytest.skip("uint8 holds no negative label")
    y = torch.tensor([0, value, 1], dtype=getattr(torch, dtype))
    msg = focal_spec.label_out_of_range(value, 5, 7)
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        ft.softmax_focal_loss(torch.zeros(3, 5), y, ignore_index=7)


def test_out_of_range_label_under_a_false_where_is_fine():
    ft = _ft()
    where = torch.tensor([True, False, True])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4))
    _check_reference(lambda z, t: ft.softmax_focal_loss(z, torch.tensor([0, 9, 1]), where=where), x,
                     np.array([0, 0, 1]), where=where.numpy())


# ----------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("logits", [np.zeros((2, 3), np.float32), [[0.0, 1.0, 2.0]]], ids=["numpy", "list"])
def test_non_tensor_logits_raise_type_error(logits):
    ft = _ft()
    msg = focal_spec.invalid_type("input", "a torch.Tensor", logits)
    with pytest.raises(TypeError, match="^" + re.escape(msg) + "$"):
        ft.softmax_focal_loss(logits, torch.zeros(len(logits), dtype=torch.long))


@pytest.mark.parametrize("arg", ["target", "weight", "where"])
def test_meta_tensor_with_cpu_logits_raises(arg):
    ft = _ft()
    kw = {"target": torch.zeros(2, dtype=torch.long), "weight": torch.ones(3), "where": torch.ones(2, dtype=torch.bool)}
    kw[arg] = kw[arg].to("meta")
    msg = focal_spec.invalid_device(arg, torch.device("cpu"), torch.device("meta"))
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        ft.softmax_focal_loss(torch.zeros(2, 3), kw.pop("target"), **kw)


@pytest.mark.parametrize("where", [torch.tensor([0.3, 1.0]), torch.tensor([0, 1])], ids=["float", "int"])
def test_non_boolean_where_raises(where):
    ft = _ft()
    msg = focal_spec.invalid_dtype("where", "bool (a boolean mask)", focal_spec.dtype_name(where.dtype))
    with pytest.raises(TypeError, match="^" + re.escape(msg) + "$"):
        ft.softmax_focal_loss(torch.zeros(2, 3), torch.tensor([0, 1]), where=where)


@pytest.mark.parametrize("kw,exc", [
    ({"gamma": None}, TypeError),
    ({"gamma": "2"}, TypeError),
    ({"gamma": -1.0}, ValueError),
    ({"gamma": torch.tensor([1.0, -1.0, 2.0])}, ValueError),
    ({"gamma": torch.ones(2)}, ValueError),
    ({"label_smoothing": "0.1"}, TypeError),
    ({"ignore_index": "x"}, TypeError),
    ({"reduction": "avg"}, ValueError),
    ({"dim": "1"}, TypeError),
], ids=["gamma=None", "gamma=str", "gamma<0", "gamma-tensor<0", "gamma-shape", "label_smoothing=str",
        "ignore_index=str", "reduction=avg", "dim=str"])
def test_bad_options_raise(kw, exc):
    ft = _ft()
    with pytest.raises(exc, match=r"^Invalid (value|shape) for argument `(\w+)`"):
        ft.softmax_focal_loss(torch.zeros(2, 3), torch.tensor([0, 1]), **kw)


# ----------------------------------------------------------------------------------------
# Layouts and shapes.
# ----------------------------------------------------------------------------------------


def _layout(x: np.ndarray, layout: str) -> torch.Tensor:
    t = torch.tensor(x)
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return t


@pytest.mark.parametrize("gamma", [2.0, 0.5], ids=lambda g: f"gamma={g}")
@pytest.mark.parametrize("layout,shape", [("contiguous", (6, 5)), ("transposed", (6, 5)),
                                          ("channels_last", (2, 5, 3, 4)), ("contiguous", (2, 5, 3, 4))],
                         ids=["contiguous-2d", "transposed", "channels_last", "contiguous-4d"])
def test_layouts_match_reference(layout, shape, gamma):
    ft = _ft()
    rng = np.random.default_rng(5)
    x = rng.normal(scale=4.0, size=shape)
    x.reshape(-1)[::5] *= 10  # some dominant classes
    y = rng.integers(0, shape[1], size=shape[:1] + shape[2:])
    y.reshape(-1)[::4] = -100
    ref_v, ref_g = reference.softmax_focal_loss(x, y, axis=1, gamma=gamma)
    tx = _layout(x, layout).requires_grad_()
    out = ft.softmax_focal_loss(tx, torch.as_tensor(y), gamma=gamma)
    out.backward()
    H.assert_close(out.detach(), ref_v, "float64", "value")
    H.assert_close(tx.grad, ref_g, "float64", "gradient")


def test_sliced_with_a_step_and_expanded_options():
    ft = _ft()
    rng = np.random.default_rng(8)
    big = rng.normal(scale=3.0, size=(10, 4, 6))
    yb = rng.integers(0, 4, size=(10, 6))
    x, y = big[::2, :, ::3], yb[::2, ::3]
    where = rng.uniform(size=(1, 2)) < 0.7
    w = np.full(4, 1.5)
    ref_v, ref_g = reference.softmax_focal_loss(x, y, axis=1, where=np.broadcast_to(where, y.shape), weight=w,
                                                reduction="sum")
    tb = torch.tensor(big, requires_grad=True)
    tx = tb[::2, :, ::3]
    out = ft.softmax_focal_loss(tx, torch.as_tensor(yb)[::2, ::3], where=torch.as_tensor(where).expand(5, 2),
                                weight=torch.tensor(1.5, dtype=torch.float64).expand(4), reduction="sum")
    out.backward()
    H.assert_close(out.detach(), ref_v, "float64", "value")
    H.assert_close(tb.grad[::2, :, ::3], ref_g, "float64", "gradient")
    assert torch.count_nonzero(tb.grad[1::2]) == 0


@pytest.mark.parametrize("gamma", [2.0, 0.5], ids=lambda g: f"gamma={g}")
def test_class_dim_last_equals_class_dim_one(gamma):
    ft = _ft()
    rng = np.random.default_rng(9)
    x = rng.normal(scale=3.0, size=(3, 5, 4))
    y = rng.integers(0, 5, size=(3, 4))
    ref_v, ref_g = reference.softmax_focal_loss(x, y, axis=1, gamma=gamma, reduction="none")
    tx = torch.tensor(np.moveaxis(x, 1, -1).copy(), requires_grad=True)
    out = ft.softmax_focal_loss(tx, torch.as_tensor(y), gamma=gamma, dim=-1, reduction="none")
    out.sum().backward()
    H.assert_close(out.detach(), ref_v, "float64", "value")
    H.assert_close(tx.grad, np.moveaxis(ref_g, 1, -1), "float64", "gradient")


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_one_position_logits_of_shape_c(reduction):
    ft = _ft()
    x = np.array([2.0, -1.0, 0.5])
    ref_v, ref_g = reference.softmax_focal_loss(x, np.array(0), axis=0, reduction=reduction)
    v, g = _value_and_grad(lambda z: ft.softmax_focal_loss(z, torch.tensor(0), dim=0, reduction=reduction),
                           torch.tensor(x))
    assert v.shape == ()
    H.assert_close(v, ref_v, "float64", "value")
    H.assert_close(g, ref_g, "float64", "gradient")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_empty_batch(reduction):
    ft = _ft()
    x = torch.zeros(0, 4, 3, requires_grad=True)
    out = ft.softmax_focal_loss(x, torch.zeros(0, 3, dtype=torch.long), reduction=reduction)
    assert out.shape == ((0, 3) if reduction == "none" else ())
    assert not torch.isnan(out).any()
    out.sum().backward()
    assert x.grad.shape == (0, 4, 3)


# ----------------------------------------------------------------------------------------
# Dominant classes: each way of forming -log p_y (the CPU's ratio for few positions, its
# vectorised form for many, forced here by moving the threshold, and the accelerator's,
# forced here too) against the float64 reference.
# ----------------------------------------------------------------------------------------


def _dominant_rows() -> tuple[np.ndarray, np.ndarray]:
    rows, labels = [], []
    for m in (0.0, 0.3, 1.0, 3.0, 10.0, 17.0, 20.0, 30.0, 50.0, 87.0, 100.0):
        rows += [[m, 0, 0, 0], [0, m, 0, 0], [m, m, 0, -m], [m, m / 2, -m / 2, 0]]
        labels += [0, 0, 0, 0]
    return np.array(rows), np.array(labels)


@pytest.mark.parametrize("branch", ["cpu-few-positions", "cpu-many-positions", "accelerator"])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 0.5, 3.0], ids=lambda g: f"gamma={g}")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dominant_classes_match_reference(monkeypatch, branch, gamma, dtype):
    """Margins from 0 to 100 (p_y from 1/4 to 1, and to below the smallest normal number), both label sides."""
    from focal_torch import _softmax

    if branch == "accelerator":
        monkeypatch.setattr(_softmax, "_host_select", lambda t: False)
    if branch == "cpu-many-positions":
        monkeypatch.setattr(_softmax, "SMALL_POSITIONS", 0)
    ft = _ft()
    x, y = _dominant_rows()
    x = np.asarray(H.round_to(x, dtype), np.float64)
    ref_v, ref_g = reference.softmax_focal_loss(x, y, axis=1, gamma=gamma, reduction="none")
    v, g = _value_and_grad(lambda z: ft.softmax_focal_loss(z, torch.as_tensor(y), gamma=gamma, reduction="none"),
                           torch.tensor(x, dtype=getattr(torch, dtype)))
    H.assert_close(v, ref_v, dtype, "value")
    H.assert_close(g, ref_g, dtype, "gradient")


@pytest.mark.parametrize("option", ["plain", "weight", "ignored"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 0.5], ids=lambda g: f"gamma={g}")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_underflowed_p_y_matches_reference(option, reduction, gamma, dtype):
    """p_y subnormal (margins 88 and 709: -log p_y from the ratio, which is finite) and beyond (margins 100, 720,
    745: the ratio overflows, p_y is 0 at the last, and -log p_y is recomputed from the logits; a reduced call of
    few positions finds out from its own non-finite value)."""
    ft = _ft()
    x, y = _dominant_rows()
    extra = [[0.0, 88.0, 0.0, 0.0], [0.0, 709.0, 0.0, 0.0], [0.0, 720.0, 0.0, 0.0], [0.0, 745.0, 1.0, 0.0]]
    x = np.concatenate([x, extra])
    y = np.concatenate([y, [0, 0, 0, 0]])
    if option == "ignored":
        y[1::3] = -100
    w = np.array([0.5, 2.0, 1.0, 1.5]) if option == "weight" else None
    x = np.asarray(H.round_to(x, dtype), np.float64)
    ref_v, ref_g = reference.softmax_focal_loss(x, y, axis=1, gamma=gamma, weight=w, reduction=reduction)
    tw = None if w is None else torch.tensor(w, dtype=getattr(torch, dtype))
    v, g = _value_and_grad(lambda z: ft.softmax_focal_loss(z, torch.as_tensor(y), gamma=gamma, weight=tw,
                                                           reduction=reduction),
                           torch.tensor(x, dtype=getattr(torch, dtype)))
    if option == "ignored":
        y = np.where(y < 0, 0, y)  # the reference's gradient is 0 on those rows
    H.assert_close(v, ref_v, dtype, "value")
    H.assert_close(g, ref_g, dtype, "gradient")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_underflowed_p_y_in_a_channels_last_map_matches_reference(reduction, dtype):
    """The reduced loss's own check and the recompute of the rows it finds, on (N, C, H, W) channels_last logits
    with uint8 labels: p_y underflows at one pixel of each image (margins 120 and 800)."""
    ft = _ft()
    rng = np.random.default_rng(21)
    x = rng.normal(size=(2, 4, 3, 3))
    x[0, :, 1, 1] = [0.0, 120.0, 0.0, 0.0]
    x[1, :, 2, 0] = [0.0, 0.0, 800.0, 0.0]
    y = rng.integers(0, 4, size=(2, 3, 3))
    y[0, 1, 1], y[1, 2, 0] = 0, 1
    x = np.asarray(H.round_to(x, dtype), np.float64)
    ref_v, ref_g = reference.softmax_focal_loss(x, y, axis=1, gamma=2.0, reduction=reduction)
    tx = torch.tensor(x, dtype=getattr(torch, dtype)).contiguous(memory_format=torch.channels_last)
    v, g = _value_and_grad(lambda z: ft.softmax_focal_loss(z, torch.tensor(y, dtype=torch.uint8), gamma=2.0,
                                                           reduction=reduction), tx)
    H.assert_close(v, ref_v, dtype, "value")
    H.assert_close(g, ref_g, dtype, "gradient")


@pytest.mark.parametrize("labels", ["index", "probs-onehot"])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 0.5], ids=lambda g: f"gamma={g}")
def test_dominant_classes_match_reference_smooth_formula(gamma, labels):
    """The differentiable formula (here under torch.func.grad, in float32) at the same dominant classes."""
    ft = _ft()
    x, y = _dominant_rows()
    ref_v, ref_g = reference.softmax_focal_loss(x, y, axis=1, gamma=gamma, reduction="none")
    tx = torch.tensor(x, dtype=torch.float32)
    t = torch.as_tensor(y) if labels == "index" else torch.eye(4)[y]
    g, v = torch.func.grad_and_value(lambda z: (lambda o: (o.sum(), o))(
        ft.softmax_focal_loss(z, t, gamma=gamma, reduction="none")), has_aux=True)(tx)
    H.assert_close(v[1], ref_v, "float32", "value")
    H.assert_close(g, ref_g, "float32", "gradient")


@pytest.mark.parametrize("branch", ["cpu", "accelerator"])
def test_ignored_rows_holding_nan_get_zero_gradient(monkeypatch, branch):
    from focal_torch import _softmax

    if branch == "accelerator":
        monkeypatch.setattr(_softmax, "_host_select", lambda t: False)
    ft = _ft()
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 3))
    y = np.array([0, 1, 2, 1, 0])
    ref_v, ref_g = reference.softmax_focal_loss(x, np.where([1, 0, 1, 0, 1], y, -100), axis=1)
    x[1] = np.nan
    x[3] = [np.inf, 0.0, -np.inf]
    yt = torch.as_tensor(np.where([1, 0, 1, 0, 1], y, -100))
    v, g = _value_and_grad(lambda z: ft.softmax_focal_loss(z, yt), torch.tensor(x))
    H.assert_close(v, ref_v, "float64", "value")
    H.assert_close(g, ref_g, "float64", "gradient")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_logits_are_computed_in_float32(dtype):
    ft = _ft()
    rng = np.random.default_rng(12)
    x = np.asarray(H.round_to(rng.normal(scale=3.0, size=(8, 5)), dtype), np.float64)
    y = rng.integers(0, 5, size=8)
    ref_v, ref_g = reference.softmax_focal_loss(x, y, axis=1, reduction="none")
    tx = torch.tensor(x, dtype=getattr(torch, dtype), requires_grad=True)
    out = ft.softmax_focal_loss(tx, torch.as_tensor(y), reduction="none")
    out.sum().backward()
    assert out.dtype == tx.dtype and tx.grad.dtype == tx.dtype
    H.assert_close(out.float().detach(), ref_v, dtype, "value")
    H.assert_close(tx.grad.float(), ref_g, dtype, "gradient", scale=np.abs(ref_g).max(1, keepdims=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float64])
def test_label_smoothing_tensor_that_requires_grad_is_its_value(x_dtype, dtype):
    """A 0-d ε tensor of another dtype that requires grad gives the loss of its value as a number (computed in
    the input's compute dtype, not in ε's), and its gradient in ε's dtype."""
    ft = _ft()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=g, dtype=x_dtype) * 2
    y = torch.randint(0, 4, (6,), generator=g)
    eps = torch.tensor(0.1, dtype=dtype, requires_grad=True)
    got = ft.softmax_focal_loss(x, y, label_smoothing=eps)
    expected = ft.softmax_focal_loss(x, y, label_smoothing=float(eps))
    torch.testing.assert_close(got.detach(), expected, rtol=0, atol=0)
    (d_eps,) = torch.autograd.grad(got, eps)
    assert d_eps.dtype == dtype and torch.isfinite(d_eps)
