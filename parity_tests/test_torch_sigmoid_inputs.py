"""torch ``sigmoid_focal_loss`` on the inputs users pass: memory layouts, confident predictions, large
reductions, out-of-range targets and options, bad arguments, gradients to every input, ``pos_weight``,
and every target dtype. Every number is compared with the float64 reference of ``focal_spec``."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

import focal_spec
from focal_spec import reference
from parity_tests import _harness as H

torch = pytest.importorskip("torch")
F = torch.nn.functional

F32_EPS = float(np.finfo(np.float32).eps)
F32_TINY = float(np.finfo(np.float32).tiny)


def _ft():
    import focal_torch

    return focal_torch


_value_and_grad = H.torch_value_and_grad


def assert_ulps(actual, expected, ulps: float, what: str, scale=None, eps: float = F32_EPS,
                floor: float = F32_TINY) -> None:
    """|actual - expected| <= ulps * eps * scale + floor, with scale = |expected| unless given (the sum of the
    magnitudes of the terms where the true value is a genuine difference). ``floor`` is the dtype's smallest
    normal number: below it only subnormals remain."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    s = np.abs(e) if scale is None else np.asarray(scale, np.float64)
    bound = ulps * eps * s + floor
    err = np.abs(a - e)
    bad = ~(err <= bound)
    if bad.any():
        k = np.flatnonzero(bad.ravel())[np.argmax((err / bound)[bad])]
        raise AssertionError(f"{what}: {bad.sum()} of {e.size} elements beyond {ulps} ulps; worst at {k}: "
                             f"actual={a.ravel()[k]!r} expected={e.ravel()[k]!r} bound={bound.ravel()[k]:.3g}")


# ----------------------------------------------------------------------------------------
# A.1 Memory layouts: every layout, every reduction, values and gradients.
# ----------------------------------------------------------------------------------------

LAYOUTS = ["contiguous", "transposed", "channels_last", "sliced-step", "expanded-target-weight"]


def _layout_inputs(layout: str, dtype):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 4, 6, generator=g, dtype=dtype) * 3
    t = (torch.rand(2, 3, 4, 6, generator=g) < 0.4).to(dtype)
    w = torch.rand(2, 3, 4, 6, generator=g, dtype=dtype)
    if layout == "transposed":
        x, t, w = x.transpose(1, 3), t.transpose(1, 3), w.transpose(1, 3)
    elif layout == "channels_last":
        x, t, w = (v.contiguous(memory_format=torch.channels_last) for v in (x, t, w))
    elif layout == "sliced-step":
        x, t, w = x[:, :, ::2, ::3], t[:, :, ::2, ::3], w[:, :, ::2, ::3]
    elif layout == "expanded-target-weight":
        t = t[:, :1].expand(2, 3, 4, 6)
        w = w[:1, :, :1].expand(2, 3, 4, 6)
    return x, t, w


@pytest.mark.parametrize("reduction", H.REDUCTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gamma", [2.0, 0.5], ids=lambda g: f"gamma={g}")
def test_layouts_match_reference(layout, reduction, gamma):
    ft = _ft()
    x, t, w = _layout_inputs(layout, torch.float64)
    assert layout == "contiguous" or layout.startswith("expanded") or not x.is_contiguous()
    ref_v, ref_g = reference.sigmoid_focal_loss(x.numpy(), t.numpy(), gamma=gamma, alpha=0.25, weight=w.numpy(),
                                                reduction=reduction)
    v, grad = _value_and_grad(lambda z: ft.sigmoid_focal_loss(z, t, gamma=gamma, alpha=0.25, weight=w,
                                                              reduction=reduction), x)
    assert_ulps(v, ref_v, 64, "value", eps=2.0**-52, floor=1e-300)
    assert_ulps(grad, ref_g, 64, "gradient", eps=2.0**-52, floor=1e-300)


@pytest.mark.parametrize("reduction", H.REDUCTIONS)
@pytest.mark.parametrize("case", ["channels_last", "transposed"])
def test_non_contiguous_float32_does_not_crash(case, reduction):
    ft = _ft()
    if case == "channels_last":
        x = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
        t = torch.ones(2, 3, 4, 4)
    else:
        x, t = torch.randn(3, 5).t(), torch.zeros(5, 3)
    v, g = _value_and_grad(lambda z: ft.sigmoid_focal_loss(z, t, reduction=reduction), x)
    ref_v, ref_g = reference.sigmoid_focal_loss(x.double().numpy(), t.numpy(), reduction=reduction)
    assert_ulps(v, ref_v, 16, "value")
    assert_ulps(g, ref_g, 16, "gradient")


# ----------------------------------------------------------------------------------------
# A.2 float32 precision: within a few ulps of the float64 reference at any logit.
# ----------------------------------------------------------------------------------------

PREC_X = np.float32(np.concatenate([np.linspace(-100, 100, 801), [10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 87.0]]))


def _terms_scale(x, t, gamma, pos_weight=None):
    """Sum of the magnitudes of the terms of dℓ/dx (the condition scale of a difference), float64."""
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    pw = 1.0 if pos_weight is None else pos_weight
    s, sn = 1 / (1 + np.exp(-x)), 1 / (1 + np.exp(x))
    sp, spn = np.logaddexp(0, x), np.logaddexp(0, -x)
    ce = (1 - t) * sp + pw * t * spn
    q = (1 - t) * s + t * sn
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        m = np.where(gamma == 0, 1.0, q ** gamma)
        mq = np.where(gamma == 0, 0.0, np.exp((gamma - 1) * np.log(np.maximum(q, 1e-300))))
    return gamma * mq * np.abs(1 - 2 * t) * s * sn * ce + m * ((1 - t) * s + pw * t * sn)


def _paths():
    # eager: small inputs (loss and gradient in one pass); eager-pieces: the chunked kernels of large inputs
    return ["eager", "eager-pieces", "tensor-gamma", "accelerator"]


def _run_path(path, monkeypatch, x, t, gamma, **kw):
    ft = _ft()
    from focal_torch import _common

    if path == "accelerator":
        monkeypatch.setattr(_common, "ACCELERATOR_PATHS", True)
    g = torch.tensor(gamma, requires_grad=True) if path == "tensor-gamma" else gamma
    if path == "eager-pieces":  # 48 copies: more than one piece, and pieces past the serial size
        monkeypatch.setattr(_common, "CHUNK", 1 << 14)
        v, grad = _value_and_grad(lambda z: ft.sigmoid_focal_loss(z, t.repeat(48), gamma=g, reduction="none", **kw),
                                  x.repeat(48))
        return v.view(48, -1), grad.view(48, -1)
    return _value_and_grad(lambda z: ft.sigmoid_focal_loss(z, t, gamma=g, reduction="none", **kw), x)


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("target", [0.0, 1.0, 0.95, 0.3])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 1.5], ids=lambda g: f"gamma={g}")
def test_float32_precision_at_any_logit(gamma, target, path, monkeypatch):
    x = torch.tensor(PREC_X)
    t = torch.full_like(x, target)
    v, g = _run_path(path, monkeypatch, x, t, gamma)
    ref_v, ref_g = reference.sigmoid_focal_loss(x.double().numpy(), t.double().numpy(), gamma=gamma,
                                                reduction="none")
    assert_ulps(v, ref_v, 8, "value")
    scale = None if target in (0.0, 1.0) else _terms_scale(x.double().numpy(), t.double().numpy(), gamma)
    assert_ulps(g, ref_g, 8, "gradient", scale=scale)


@pytest.mark.parametrize("layout", ["flat", "rows"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("gamma", [1.0, 2.0, 3.0], ids=lambda g: f"gamma={g}")
def test_pieces_of_unequal_size(layout, reduction, gamma, monkeypatch):
    """The chunked kernels reuse one set of temporaries across pieces. A last piece of another shape (35007 is odd;
    7 rows in pieces of 3) gets temporaries of its own shape: no output of ``out=`` is resized (which torch warns
    about) and every element matches the reference, with a mask, a weight and ``pos_weight`` too."""
    from focal_torch import _common

    rows, cols = 7, 5001
    monkeypatch.setattr(_common, "CHUNK", -(-3 * cols // max(1, torch.get_num_threads())))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 4
    t = (torch.rand(rows, cols, generator=g, dtype=torch.float64) < 0.3).double()
    w = torch.rand(rows, cols, generator=g, dtype=torch.float64) + 0.5
    where = torch.rand(rows, cols, generator=g) < 0.8
    xt = x.float() if layout == "flat" else x.float().t().contiguous().t()  # rows: not flattenable
    assert xt.is_contiguous() == (layout == "flat")
    kw = dict(gamma=gamma, alpha=0.25, pos_weight=1.5, where=where)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v, grad = _value_and_grad(lambda z: _ft().sigmoid_focal_loss(z, t.float(), weight=w.float(),
                                                                      reduction=reduction, **kw), xt)
    xs, ts = x.float().double().numpy(), t.numpy()
    ref_v, ref_g = reference.sigmoid_focal_loss(xs, ts, weight=w.float().double().numpy(), reduction=reduction,
                                                **{**kw, "where": where.numpy()})
    assert_ulps(v, ref_v, 8, "value")
    assert_ulps(grad, ref_g, 8, "gradient")


@pytest.mark.parametrize("kw", [{"pos_weight": 1.5}, {"pos_weight": "0-d"}, {"weight": "(1,)"}, {"alpha": "0-d"}],
                         ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_large_inputs_keep_one_element_options(kw):
    """Inputs past one piece (2^19 elements at the default piece size) with a one-element ``pos_weight``,
    ``weight`` or ``alpha``: each piece applies it, as the reference does."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(512, 1024, generator=g, dtype=torch.float64) * 3
    t = (torch.rand(512, 1024, generator=g, dtype=torch.float64) < 0.3).double()
    values = {"0-d": 0.3, "(1,)": 2.5}
    tk = {k: (torch.tensor([values[v]]) if v == "(1,)" else torch.tensor(values[v])) if isinstance(v, str) else v
          for k, v in kw.items()}
    rk = {k: v.double().numpy() if isinstance(v, torch.Tensor) else v for k, v in tk.items()}
    v, grad = _value_and_grad(lambda z: _ft().sigmoid_focal_loss(z, t.float(), gamma=2.0, **tk), x.float())
    ref_v, ref_g = reference.sigmoid_focal_loss(x.float().double().numpy(), t.numpy(), gamma=2.0, **rk)
    assert_ulps(v, ref_v, 8, "value")
    assert_ulps(grad, ref_g, 8, "gradient")


@pytest.mark.parametrize("path", _paths())
def test_confident_predictions_keep_their_loss(path, monkeypatch):
    x = torch.tensor([10.0, 15.0, 20.0, 30.0])
    t = torch.ones(4)
    v, g = _run_path(path, monkeypatch, x, t, 0.0)
    expected = np.log1p(np.exp(-x.double().numpy()))  # 4.5399e-05, 3.06e-07, 2.06e-09, 9.36e-14
    assert (v > 0).all() and (g < 0).all()
    assert_ulps(v, expected, 4, "value")
    assert_ulps(g, -1 / (1 + np.exp(x.double().numpy())), 4, "gradient")


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0], ids=lambda g: f"gamma={g}")
def test_focal_loss_never_exceeds_cross_entropy(gamma):
    ft = _ft()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, generator=g) * 10
    t = torch.rand(1000, generator=g)
    fl = ft.sigmoid_focal_loss(x, t, gamma=gamma, reduction="none")
    ce = ft.sigmoid_focal_loss(x, t, gamma=0.0, reduction="none")
    assert (fl <= ce).all()
    assert (fl >= 0).all()


# ----------------------------------------------------------------------------------------
# A.3 Large reductions: float32 sums stay within ~1e-6 of the float64 sum.
# ----------------------------------------------------------------------------------------


def _large_reduction(n: int):
    ft = _ft()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, generator=g) * 2
    t = (torch.rand(n, generator=g) < 0.3).float()
    ref = reference.sigmoid_focal_loss(x.double().numpy(), t.double().numpy(), alpha=0.25, reduction="none")[0]
    for reduction in ("mean", "sum"):
        got = float(ft.sigmoid_focal_loss(x, t, alpha=0.25, reduction=reduction))
        want = float(ref.sum() / (n if reduction == "mean" else 1))
        assert abs(got - want) <= 1e-6 * abs(want), (reduction, got, want)


def test_large_reduction_2_22():
    _large_reduction(1 << 22)


@pytest.mark.slow
@pytest.mark.skipif(not H.SLOW, reason="FOCAL_SLOW=1 runs the 2^26-element reduction")
def test_large_reduction_2_26():
    _large_reduction(1 << 26)


# ----------------------------------------------------------------------------------------
# A.4 / A.5 Targets and alpha out of range.
# ----------------------------------------------------------------------------------------

BAD_TARGETS = {
    "uint8-255": (torch.tensor([[0, 1], [255, 1]], dtype=torch.uint8), 255.0),
    "float-1.5": (torch.tensor([[0.0, 1.0], [1.5, 0.5]]), 1.5),
    "float-negative": (torch.tensor([[0.0, -0.5], [1.0, 0.5]]), -0.5),
    "int64-2": (torch.tensor([[0, 2], [1, 0]]), 2.0),
    "int8-minus-1": (torch.tensor([[0, 1], [-1, 0]], dtype=torch.int8), -1.0),
}


@pytest.mark.parametrize("case", list(BAD_TARGETS))
def test_targets_out_of_range_raise_in_eager(case):
    ft = _ft()
    t, value = BAD_TARGETS[case]
    msg = focal_spec.targets_out_of_range(value)
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        ft.sigmoid_focal_loss(torch.zeros(2, 2), t)


def test_nan_target_raises_in_eager():
    ft = _ft()
    with pytest.raises(ValueError, match=re.escape("Expected values in [0, 1]")):
        ft.sigmoid_focal_loss(torch.zeros(3), torch.tensor([0.0, float("nan"), 1.0]))


def test_masked_out_of_range_targets_are_harmless():
    ft = _ft()
    t = torch.tensor([[0, 1], [255, 1]], dtype=torch.uint8)
    where = t != 255
    x = torch.randn(2, 2)
    v, g = _value_and_grad(lambda z: ft.sigmoid_focal_loss(z, t, where=where, reduction="sum"), x)
    ref_v, ref_g = reference.sigmoid_focal_loss(x.double().numpy(), t.numpy(), where=where.numpy(), reduction="sum")
    assert_ulps(v, ref_v, 8, "value")
    assert_ulps(g, ref_g, 8, "gradient")
    assert g[1, 0] == 0


@pytest.mark.parametrize("transform", ["compile", "vmap", "grad", "meta"])
def test_out_of_range_target_gives_nan_where_it_cannot_be_checked(transform):
    ft = _ft()
    x = torch.randn(2, 3)
    t = torch.tensor([[0.0, 1.0, 0.0], [3.0, 1.0, 0.0]])
    if transform == "compile":
        out = torch.compile(lambda a, b: ft.sigmoid_focal_loss(a, b, reduction="none"), fullgraph=True,
                            backend="aot_eager")(x, t)
    elif transform == "vmap":
        out = torch.func.vmap(lambda a, b: ft.sigmoid_focal_loss(a, b, reduction="none"))(x, t)
    elif transform == "grad":
        out = torch.func.grad(lambda b: ft.sigmoid_focal_loss(x, b, reduction="none").sum())(t)
    else:
        out = ft.sigmoid_focal_loss(x.to("meta"), t.to("meta"), reduction="none")
        assert out.shape == (2, 3) and out.device.type == "meta"
        return
    assert torch.isnan(out[1, 0])
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, 1:]).all()


@pytest.mark.parametrize("alpha", [[0.2, 1.2, 0.5], [0.2, -0.1, 0.5]])
def test_alpha_tensor_out_of_range_raises(alpha):
    ft = _ft()
    bad = next(a for a in alpha if not 0 <= a <= 1)
    msg = focal_spec.invalid_value("alpha", "values in [0, 1]", bad)  # shown as float32 prints it: 1.2
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        ft.sigmoid_focal_loss(torch.zeros(4, 3), torch.zeros(4, 3), alpha=torch.tensor(alpha))


# ----------------------------------------------------------------------------------------
# A.6 Bad arguments.
# ----------------------------------------------------------------------------------------


def test_string_alpha_is_a_type_error():
    ft = _ft()
    msg = focal_spec.invalid_value("alpha", focal_spec._validate.ALPHA_EXPECTED, "1.5")
    with pytest.raises(TypeError, match="^" + re.escape(msg) + "$"):
        ft.sigmoid_focal_loss(torch.zeros(2), torch.zeros(2), alpha="1.5")


def test_gamma_none_is_a_type_error():
    ft = _ft()
    msg = focal_spec.invalid_value("gamma", focal_spec._validate.GAMMA_EXPECTED, None)
    with pytest.raises(TypeError, match="^" + re.escape(msg) + "$"):
        ft.sigmoid_focal_loss(torch.zeros(2), torch.zeros(2), gamma=None)


@pytest.mark.parametrize("logits", [np.zeros((2, 3), np.float32), [[0.0, 1.0]]], ids=["numpy", "list"])
def test_logits_must_be_a_tensor(logits):
    ft = _ft()
    msg = focal_spec.invalid_type("input", "a torch.Tensor", logits)
    with pytest.raises(TypeError, match="^" + re.escape(msg) + "$"):
        ft.sigmoid_focal_loss(logits, np.zeros(np.shape(logits), np.float32))


@pytest.mark.parametrize("target", [np.array([[0.0, 1.0, 0.5]]), [[0.0, 1.0, 0.5]], np.array([[0, 1, 1]], np.uint8)],
                         ids=["numpy-float64", "list", "numpy-uint8"])
def test_numpy_and_list_targets_are_converted(target):
    ft = _ft()
    x = torch.tensor([[0.3, -1.0, 2.0]])
    v = ft.sigmoid_focal_loss(x, target, reduction="none")
    ref = reference.sigmoid_focal_loss(x.double().numpy(), np.asarray(target, np.float64), reduction="none")[0]
    assert_ulps(v, ref, 8, "value")


@pytest.mark.parametrize("arg", ["target", "weight", "pos_weight", "where"])
def test_meta_device_option_with_cpu_logits_raises(arg):
    ft = _ft()
    x = torch.zeros(2, 3)
    kw = {"target": torch.zeros(2, 3)}
    kw[arg] = torch.zeros(2, 3, dtype=torch.bool if arg == "where" else torch.float32, device="meta")
    msg = focal_spec.invalid_device(arg, x.device, torch.device("meta"))
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        ft.sigmoid_focal_loss(x, kw.pop("target"), **kw)


@pytest.mark.parametrize("where", [torch.ones(2, 3), torch.ones(2, 3, dtype=torch.int64)], ids=["float", "int"])
def test_non_boolean_where_is_a_type_error(where):
    ft = _ft()
    msg = focal_spec.invalid_dtype("where", "bool (a boolean mask)", focal_spec.dtype_name(where.dtype))
    with pytest.raises(TypeError, match="^" + re.escape(msg) + "$"):
        ft.sigmoid_focal_loss(torch.zeros(2, 3), torch.zeros(2, 3), where=where)


# ----------------------------------------------------------------------------------------
# A.7 Gradients to every floating input: equal to central differences of the float64 reference.
# ----------------------------------------------------------------------------------------


def _fd(fn, arr, h=1e-6):
    arr = np.array(arr, np.float64)
    out = np.zeros_like(arr)
    for i in np.ndindex(arr.shape):
        step = h * max(1.0, abs(arr[i]))
        up, down = arr.copy(), arr.copy()
        up[i] += step
        down[i] -= step
        out[i] = (float(fn(up)) - float(fn(down))) / (2 * step)
    return out


@pytest.mark.parametrize("reduction", H.REDUCTIONS)
@pytest.mark.parametrize("arg", ["target", "alpha", "weight", "pos_weight", "gamma"])
def test_gradient_of_every_input_matches_reference_differences(arg, reduction):
    ft = _ft()
    rng = np.random.default_rng(7)
    base = {
        "logits": rng.normal(scale=2.0, size=(4, 3)),
        "target": rng.uniform(0.05, 0.95, size=(4, 3)),
        "alpha": rng.uniform(0.2, 0.8, size=(3,)),
        "weight": rng.uniform(0.5, 2.0, size=(4, 1)),
        "pos_weight": rng.uniform(0.5, 3.0, size=(3,)),
        "gamma": rng.uniform(0.5, 3.0, size=(3,)),
    }

    def ref_total(value, name=arg):
        kw = {k: v for k, v in base.items() if k not in ("logits", "target")}
        kw[name] = value if name != "target" else kw.get(name)
        targets = value if name == "target" else base["target"]
        kw.pop("target", None)
        out = reference.sigmoid_focal_loss(base["logits"], targets, label_smoothing=0.1, reduction=reduction, **kw)[0]
        return np.sum(out)

    expected = _fd(ref_total, base[arg])
    tensors = {k: torch.tensor(v, requires_grad=(k == arg)) for k, v in base.items()}
    out = ft.sigmoid_focal_loss(tensors["logits"], tensors["target"], alpha=tensors["alpha"], weight=tensors["weight"],
                                pos_weight=tensors["pos_weight"], gamma=tensors["gamma"], label_smoothing=0.1,
                                reduction=reduction)
    (grad,) = torch.autograd.grad(out.sum(), tensors[arg])
    assert grad is not None and grad.shape == tensors[arg].shape
    assert (grad != 0).any()
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("reduction", H.REDUCTIONS)
def test_gradcheck_every_differentiable_input(reduction):
    ft = _ft()
    g = torch.Generator().manual_seed(8)
    d = torch.float64
    x = (torch.randn(3, 4, generator=g, dtype=d) * 2).requires_grad_()
    t = torch.rand(3, 4, generator=g, dtype=d).requires_grad_()
    a = torch.rand(4, generator=g, dtype=d).mul(0.6).add(0.2).requires_grad_()
    w = torch.rand(3, 1, generator=g, dtype=d).add(0.5).requires_grad_()
    pw = torch.rand(4, generator=g, dtype=d).add(0.5).requires_grad_()
    gam = torch.tensor([1.5, 0.5, 2.5, 3.0], dtype=d, requires_grad=True)

    def fn(x, t, a, w, pw, gam):
        return ft.sigmoid_focal_loss(x, t, alpha=a, weight=w, pos_weight=pw, gamma=gam, label_smoothing=0.1,
                                     reduction=reduction)

    assert torch.autograd.gradcheck(fn, (x, t, a, w, pw, gam))
    assert torch.autograd.gradcheck(fn, (x, t, a, w, pw, gam), check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


# ----------------------------------------------------------------------------------------
# A.8 pos_weight: F.binary_cross_entropy_with_logits' meaning.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", H.REDUCTIONS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_pos_weight_at_gamma0_equals_bce(reduction, dtype):
    ft = _ft()
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(16, 5, generator=g, dtype=dt) * 3
    t = (torch.rand(16, 5, generator=g) < 0.3).to(dt)
    pw = torch.tensor([0.5, 1.0, 2.0, 3.0, 10.0], dtype=dt)
    w = torch.rand(16, 1, generator=g, dtype=dt)
    ours_v, ours_g = _value_and_grad(
        lambda z: ft.sigmoid_focal_loss(z, t, gamma=0.0, weight=w, pos_weight=pw, reduction=reduction), x)
    bce_v, bce_g = _value_and_grad(
        lambda z: F.binary_cross_entropy_with_logits(z, t, weight=w, pos_weight=pw, reduction=reduction), x)
    # F.bce forms (1-t)x - log σ(x), which cancels for confident logits: its own error is a few ulps of |x|.
    eps = float(torch.finfo(dt).eps)
    scale = float(x.abs().max() * pw.max())
    torch.testing.assert_close(ours_v, bce_v, rtol=16 * eps, atol=16 * eps * scale * (1 if reduction == "none" else 80))
    torch.testing.assert_close(ours_g, bce_g, rtol=16 * eps, atol=16 * eps * float(pw.max()))
    ref_v, ref_g = reference.sigmoid_focal_loss(x.double().numpy(), t.double().numpy(), gamma=0.0,
                                                weight=w.double().numpy(), pos_weight=pw.double().numpy(),
                                                reduction=reduction)
    assert_ulps(ours_v, ref_v, 16, "value", eps=float(torch.finfo(dt).eps))
    assert_ulps(ours_g, ref_g, 16, "gradient", eps=float(torch.finfo(dt).eps))


@pytest.mark.parametrize("gamma", [2.0, 0.5], ids=lambda g: f"gamma={g}")
def test_pos_weight_with_focusing_matches_reference(gamma):
    ft = _ft()
    rng = np.random.default_rng(10)
    x = rng.normal(scale=3.0, size=(8, 4))
    t = rng.uniform(size=(8, 4))
    pw = np.array([0.5, 2.0, 4.0, 1.0])
    ref_v, ref_g = reference.sigmoid_focal_loss(x, t, gamma=gamma, alpha=0.25, pos_weight=pw, reduction="none")
    v, g = _value_and_grad(lambda z: ft.sigmoid_focal_loss(z, torch.tensor(t), gamma=gamma, alpha=0.25,
                                                           pos_weight=torch.tensor(pw), reduction="none"),
                           torch.tensor(x))
    assert_ulps(v, ref_v, 64, "value", eps=2.0**-52, floor=1e-300)
    assert_ulps(g, ref_g, 64, "gradient", eps=2.0**-52, floor=1e-300,
                scale=_terms_scale(x, t, gamma, pw) * 0.75 + np.abs(ref_g))


# ----------------------------------------------------------------------------------------
# A.9 Target dtypes, 0-d, empty.
# ----------------------------------------------------------------------------------------

TARGET_DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64"]


@pytest.mark.parametrize("dtype", TARGET_DTYPES)
def test_every_target_dtype(dtype):
    ft = _ft()
    g = torch.Generator().manual_seed(12)
    x = torch.randn(6, 4, generator=g) * 3
    t = (torch.rand(6, 4, generator=g) < 0.5).to(getattr(torch, dtype))
    v, grad = _value_and_grad(lambda z: ft.sigmoid_focal_loss(z, t, alpha=0.25), x)
    ref_v, ref_g = reference.sigmoid_focal_loss(x.double().numpy(), t.double().numpy(), alpha=0.25)
    assert_ulps(v, ref_v, 8, "value")
    assert_ulps(grad, ref_g, 8, "gradient")


@pytest.mark.parametrize("reduction", H.REDUCTIONS)
def test_zero_dimensional_input(reduction):
    ft = _ft()
    x = torch.tensor(-2.5)
    v, g = _value_and_grad(lambda z: ft.sigmoid_focal_loss(z, torch.tensor(1.0), reduction=reduction), x)
    ref_v, ref_g = reference.sigmoid_focal_loss(-2.5, 1.0, reduction=reduction)
    assert v.shape == () and g.shape == ()
    assert_ulps(v, ref_v, 4, "value")
    assert_ulps(g, ref_g, 4, "gradient")


@pytest.mark.parametrize("reduction", H.REDUCTIONS)
def test_empty_input(reduction):
    ft = _ft()
    v, g = _value_and_grad(lambda z: ft.sigmoid_focal_loss(z, torch.zeros(0, 3), reduction=reduction),
                           torch.zeros(0, 3))
    assert g.shape == (0, 3)
    if reduction == "none":
        assert v.shape == (0, 3)
    else:
        assert v.item() == 0.0


def test_large_batch_of_pieces_matches_reference():
    ft = _ft()
    g = torch.Generator().manual_seed(13)
    x = torch.randn(600, 1000, generator=g, dtype=torch.float64) * 4
    t = torch.rand(600, 1000, generator=g, dtype=torch.float64)
    a = torch.rand(1000, generator=g, dtype=torch.float64)
    v, grad = _value_and_grad(lambda z: ft.sigmoid_focal_loss(z, t, gamma=1.5, alpha=a), x)
    ref_v, ref_g = reference.sigmoid_focal_loss(x.numpy(), t.numpy(), gamma=1.5, alpha=a.numpy())
    assert_ulps(v, ref_v, 64, "value", eps=2.0**-52, floor=1e-300)
    assert_ulps(grad, ref_g, 64, "gradient", eps=2.0**-52, floor=1e-300,
                scale=_terms_scale(x.numpy(), t.numpy(), 1.5) / x.numel() + np.abs(ref_g))


@pytest.mark.parametrize("target", [0.0, 1.0, 0.3])
def test_gamma_gradient_keeps_float32_precision(target):
    """dℓ/dγ = ℓ log(1-p_t): log(1-p_t) is formed as log1p(-p_t) where 1-p_t is near 1."""
    ft = _ft()
    x = torch.tensor(np.float32(np.linspace(-30, 30, 121)))
    t = torch.full_like(x, target)
    gamma = torch.full_like(x, 1.5).requires_grad_()  # one gamma per element: the gradient is elementwise
    out = ft.sigmoid_focal_loss(x, t, gamma=gamma, reduction="sum")
    (grad,) = torch.autograd.grad(out, gamma)
    xd, td = x.double().numpy(), t.double().numpy()
    loss = reference.sigmoid_focal_loss(xd, td, gamma=1.5, reduction="none")[0]
    with np.errstate(divide="ignore"):  # log 0 = -inf for hard targets: that term drops out
        log_q = np.logaddexp(np.log(td) - np.logaddexp(0, xd), np.log1p(-td) - np.logaddexp(0, -xd))
    assert_ulps(grad, loss * log_q, 16, "dloss/dgamma")
