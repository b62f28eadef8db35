"""What only the PyTorch backend has to prove: torch.compile, double backward, autocast, the eager
label check, the memory kept for backward, the chunked eager kernels, and the original blog modules'
defects, each fixed."""

from __future__ import annotations

import functools
import pathlib
import re
import warnings

import numpy as np
import pytest

import focal_spec
from focal_spec import reference
from parity_tests import _exact
from parity_tests import _harness as H

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _ft():
    import focal_torch

    return focal_torch


def _value_and_grad(fn, x, *args):
    x = x.detach().clone().requires_grad_()
    out = fn(x, *args)
    out.sum().backward()
    return out.detach(), x.grad


# ----------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) equals eager. Shapes stay small: each case is one inductor compile.
# ----------------------------------------------------------------------------------------


def _compile_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, generator=g) * 3
    t = (torch.rand(4, 3, 5, generator=g) < 0.3).float()
    mask = torch.rand(4, 3, 5, generator=g) < 0.8
    labels = torch.randint(0, 3, (4, 5), generator=g)
    labels[0, 0] = -100
    probs = torch.softmax(torch.randn(4, 3, 5, generator=g), 1)
    weight = torch.tensor([1.0, 2.0, 0.5])
    onehot = F.one_hot(torch.randint(0, 3, (4, 5), generator=g), 3).permute(0, 2, 1).float()
    ft = _ft()
    seg, cls = ft.SegmentationFocalLoss(weights=[1.0, 2.0, 0.5]), ft.ClassificationFocalLoss(3, logits=False)
    return {
        "sigmoid-gamma=2-alpha=0.25-where-smoothing-mean": (
            lambda a, b: ft.sigmoid_focal_loss(a, b, alpha=0.25, where=mask, label_smoothing=0.1), x, t),
        "sigmoid-gamma=0.5-weight-none": (
            lambda a, b: ft.sigmoid_focal_loss(a, b, gamma=0.5, weight=weight.view(3, 1), reduction="none"), x, t),
        "softmax-index-ignore-weight-none": (
            lambda a, b: ft.softmax_focal_loss(a, b, weight=weight, reduction="none"), x, labels),
        "softmax-probs-gamma=1.5-smoothing-mean": (
            lambda a, b: ft.softmax_focal_loss(a, b, gamma=1.5, label_smoothing=0.1), x, probs),
        "SegmentationFocalLoss-weights+ClassificationFocalLoss-logits=False": (
            lambda a, b: torch.stack([seg(a, b), cls(a[:, :, 0, 0], b.argmax(1)[:, 0, 0])]), x.unsqueeze(-1),
            onehot.unsqueeze(-1)),
    }


COMPILE_IDS = ["sigmoid-gamma=2-alpha=0.25-where-smoothing-mean", "sigmoid-gamma=0.5-weight-none",
               "softmax-index-ignore-weight-none", "softmax-probs-gamma=1.5-smoothing-mean",
               "SegmentationFocalLoss-weights+ClassificationFocalLoss-logits=False"]


@pytest.mark.parametrize("case", COMPILE_IDS)
def test_compile_fullgraph_equals_eager(case):
    fn, x, y = _compile_cases()[case]
    compiled = torch.compile(fn, fullgraph=True)
    ev, eg = _value_and_grad(fn, x, y)
    cv, cg = _value_and_grad(compiled, x, y)
    # compiled and eager kernels round differently: each is held to the contract on the row's scale (a
    # softmax gradient with probabilities is a difference of terms), so they are within twice of each other
    e_v, e_g = (np.asarray(torch.as_tensor(a).detach().double()) for a in (ev, eg))
    H.assert_close(cv, ev, "float32", "value", scale=2 * np.abs(e_v))
    g_scale = np.abs(e_g)
    if "probs" in case:  # a softmax gradient with probabilities is a difference of terms: its row's scale
        g_scale = np.maximum(g_scale, np.abs(e_g).max(axis=1, keepdims=True))
    H.assert_close(cg, eg, "float32", "gradient", scale=2 * g_scale)
    if case.startswith("softmax-index"):
        # Eager mode reads the labels and raises; a compiled graph cannot, so that position's loss is NaN.
        bad = y.clone()
        bad[2, 3] = 7
        with pytest.raises(ValueError, match=re.escape(focal_spec.label_out_of_range(7, 3, -100))):
            fn(x, bad)
        out = compiled(x, bad)
        assert torch.isnan(out[2, 3]) and torch.isnan(out).sum() == 1


# ----------------------------------------------------------------------------------------
# Double backward: the backward pass is itself differentiable.
# ----------------------------------------------------------------------------------------

GRADGRAD_SIGMOID = [
    dict(gamma=2.0, alpha=None, reduction="mean", label_smoothing=0.0, where=False),
    dict(gamma=0.5, alpha=0.25, reduction="none", label_smoothing=0.1, where=True),
    dict(gamma=1.5, alpha=None, reduction="sum", label_smoothing=0.0, where=True),
    dict(gamma=0.0, alpha=0.75, reduction="mean", label_smoothing=0.1, where=False),
    dict(gamma=5.0, alpha=None, reduction="none", label_smoothing=0.0, where=False),
]


@pytest.mark.parametrize("opts", GRADGRAD_SIGMOID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_sigmoid_gradcheck_and_gradgradcheck_float64(opts):
    ft = _ft()
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = torch.rand(3, 4, generator=g, dtype=torch.float64)
    where = (torch.rand(3, 4, generator=g) < 0.7) if opts["where"] else None
    kw = {k: v for k, v in opts.items() if k != "where"}

    def fn(z):
        return ft.sigmoid_focal_loss(z, t, where=where, **kw)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("labels", ["index", "probs"])
def test_softmax_gradgradcheck_float64(labels):
    ft = _ft()
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 4, 2, generator=g, dtype=torch.float64) * 2).requires_grad_()
    if labels == "index":
        y = torch.randint(0, 4, (3, 2), generator=g)
        y[0, 0] = -100
    else:
        y = torch.softmax(torch.randn(3, 4, 2, generator=g, dtype=torch.float64), 1)
    w = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)

    def fn(z):
        return ft.softmax_focal_loss(z, y, gamma=1.5, weight=w)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


HESSIAN_X = np.tile([100.0, -100.0, 75.0, -75.0, 50.0, -50.0], 4)
HESSIAN_T = np.repeat([0.0, 1.0, 0.5, 0.9], 6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0, 1.5], ids=lambda g: f"gamma={g}")
def test_sigmoid_hessian_is_finite_at_extreme_logits(gamma, dtype):
    ft = _ft()
    dt = getattr(torch, dtype)
    t = torch.tensor(HESSIAN_T, dtype=dt)
    hess = torch.autograd.functional.hessian(
        lambda z: ft.sigmoid_focal_loss(z, t, gamma=gamma, reduction="sum"), torch.tensor(HESSIAN_X, dtype=dt))
    assert torch.isfinite(hess).all()
    diag = torch.diag(hess)
    assert torch.equal(hess, torch.diag(diag))  # elementwise loss: no cross terms
    # every value here is below 1e-20: held to the exact second derivative, relative (a finite difference of the
    # float64 gradient cannot resolve them); the full grid is in test_second_derivatives.py
    exact = np.array([_exact.sigmoid_second_derivative(a, b, gamma) for a, b in zip(HESSIAN_X, HESSIAN_T, strict=True)])
    _exact.assert_close(diag.double().numpy(), exact[:, 0], exact[:, 1],
                        H.modulator_condition(np.full(HESSIAN_X.shape, gamma), exact[:, 2]), dtype,
                        H.TOLERANCES[dtype]["rtol"], "d²ℓ/dx²")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_gamma0_gradient_equals_bce(reduction):
    """γ = 0 is F.binary_cross_entropy_with_logits: equal in float64 (where F.bce's own σ(x) - t is exact to
    rounding), and in float32 within the precision contract of the float64 reference (F.bce itself forms
    σ(x) - t, which cancels at saturated logits: ours does not)."""
    ft = _ft()
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(300, generator=g) * 5).double()
    t = torch.rand(300, generator=g).double()
    v, ours = _value_and_grad(lambda z: ft.sigmoid_focal_loss(z, t, gamma=0.0, reduction=reduction), x)
    bv, bce = _value_and_grad(lambda z: F.binary_cross_entropy_with_logits(z, t, reduction=reduction), x)
    torch.testing.assert_close(v, bv, rtol=1e-13, atol=0)
    torch.testing.assert_close(ours, bce, rtol=1e-12, atol=1e-15)
    v32, g32 = _value_and_grad(lambda z: ft.sigmoid_focal_loss(z, t.float(), gamma=0.0, reduction=reduction),
                               x.float())
    ref_v, ref_g = reference.sigmoid_focal_loss(x.float().double().numpy(), t.float().double().numpy(), gamma=0.0,
                                                reduction=reduction)
    np.testing.assert_allclose(v32.double().numpy(), ref_v, rtol=2e-6)
    scale = np.abs(ref_g) + np.abs(torch.sigmoid(x.float().double()).numpy()) * (1 if reduction != "mean" else 1 / 300)
    assert np.all(np.abs(g32.double().numpy() - ref_g) <= 2e-6 * scale)


# ----------------------------------------------------------------------------------------
# Autocast: the losses compute in float32 whatever autocast would pick.
# ----------------------------------------------------------------------------------------


def _autocast_case(loss):
    ft = _ft()
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(64, 16, generator=g)
    torch.manual_seed(5)
    head = torch.nn.Linear(16, 5)
    if loss == "sigmoid":
        t = (torch.rand(64, 5, generator=g) < 0.3).float() * 0.9 + 0.05
        return head, feats, lambda z: ft.sigmoid_focal_loss(z, t, gamma=2.0, alpha=0.25)
    y = torch.randint(0, 5, (64,), generator=g)
    return head, feats, lambda z: ft.softmax_focal_loss(z, y, gamma=2.0)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_autocast_bfloat16_matches_float32(loss):
    head, feats, fn = _autocast_case(loss)
    plain = fn(head(feats))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(feats)
        assert logits.dtype == torch.bfloat16
        mixed = fn(logits)
    assert mixed.dtype == torch.bfloat16
    H.assert_close(mixed.detach().float(), plain.detach(), "bfloat16")


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_autocast_leaves_float32_logits_bit_identical(loss):
    head, feats, fn = _autocast_case(loss)
    logits = head(feats).detach()
    plain = fn(logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fn(logits)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, plain)


# ----------------------------------------------------------------------------------------
# Labels out of range: a ValueError in eager mode, with the spec's message.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [3, -1, 255])
def test_out_of_range_label_raises_the_spec_message(value):
    ft = _ft()
    y = torch.tensor([[0, 1], [value, 2]])
    msg = focal_spec.label_out_of_range(value, 3, -100)
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        ft.softmax_focal_loss(torch.zeros(2, 3, 2), y)


@pytest.mark.parametrize("how", ["ignore_index=255", "where=False"])
def test_label_255_is_harmless_where_it_does_not_count(how):
    ft = _ft()
    x = torch.randn(2, 3, 2)
    x[1, :, 0] = float("inf")
    y = torch.tensor([[0, 1], [255, 2]])
    kw = {"ignore_index": 255} if how == "ignore_index=255" else {"where": torch.tensor([[True, True], [False, True]])}
    value, grad = _value_and_grad(lambda z: ft.softmax_focal_loss(z, y, **kw), x)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert torch.equal(grad[1, :, 0], torch.zeros(3))


# ----------------------------------------------------------------------------------------
# Memory: what the autograd graph keeps, counted once per storage.
# ----------------------------------------------------------------------------------------


def _saved_bytes(fn, *args) -> int:
    seen: dict[tuple[int, int], int] = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    kept = getattr(out.grad_fn, "kept", None)  # dℓ/dx kept on the node for the backward (focal_torch._common.keep)
    if isinstance(kept, torch.Tensor):
        pack(kept)
    return sum(seen.values())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 0.5], ids=lambda g: f"gamma={g}")
def test_sigmoid_saves_at_most_two_input_sized_arrays(gamma, reduction, monkeypatch):
    """Above FUSE_MAX elements (made small here) only the inputs are saved, as for F.bce; at or below it the
    gradient computed with the loss takes the logits' place (the targets and it: two arrays of the input's
    size)."""
    ft = _ft()
    from focal_torch import _sigmoid

    x = torch.randn(64, 32, requires_grad=True)
    t = torch.rand(64, 32)
    size = x.numel() * x.element_size()
    small = _saved_bytes(lambda: ft.sigmoid_focal_loss(x, t, gamma=gamma, alpha=0.25, reduction=reduction))
    assert 2 * size <= small <= 2 * size + 64
    monkeypatch.setattr(_sigmoid, "FUSE_MAX", x.numel() - 1)
    ours = _saved_bytes(lambda: ft.sigmoid_focal_loss(x, t, gamma=gamma, alpha=0.25, reduction=reduction))
    assert ours <= 2 * size + 64
    assert ours <= _saved_bytes(lambda: F.binary_cross_entropy_with_logits(x, t, reduction=reduction)) + 64


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", [(64, 10), (2, 21, 8, 8)], ids=lambda s: "x".join(map(str, s)))
def test_softmax_index_labels_save_no_more_than_cross_entropy(shape, reduction):
    ft = _ft()
    x = torch.randn(shape, requires_grad=True)
    y = torch.randint(0, shape[1], shape[:1] + shape[2:])
    y.view(-1)[::7] = -100
    ours = _saved_bytes(lambda: ft.softmax_focal_loss(x, y, reduction=reduction))
    theirs = _saved_bytes(lambda: F.cross_entropy(x, y, reduction=reduction))
    assert ours <= theirs


# ----------------------------------------------------------------------------------------
# The eager kernels work on pieces of large inputs: force tiny pieces and check the reference.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["flat", "rows"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_pieces_match_reference(monkeypatch, layout, reduction):
    from focal_torch import _common

    monkeypatch.setattr(_common, "CHUNK", 7)
    ft = _ft()
    rng = np.random.default_rng(6)
    x = rng.normal(scale=3.0, size=(6, 3, 5))
    t = rng.uniform(size=(6, 3, 5))
    kw = {"gamma": 1.5, "reduction": reduction, "label_smoothing": 0.1}
    if layout == "rows":  # per-class alpha and a mask: operands that broadcast, so pieces are rows
        kw["alpha"] = rng.uniform(0.2, 0.8, size=(3, 1))
        kw["where"] = rng.uniform(size=(6, 1, 5)) < 0.7
        x = np.where(kw["where"], x, np.nan)
    ref_v, ref_g = reference.sigmoid_focal_loss(x, t, **kw)
    tkw = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    v, g = _value_and_grad(lambda z: ft.sigmoid_focal_loss(z, torch.tensor(t), **tkw), torch.tensor(x))
    H.assert_close(v, ref_v, "float64", "value")
    H.assert_close(g, ref_g, "float64", "gradient")


# ----------------------------------------------------------------------------------------
# Empty and degenerate inputs.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["sigmoid-empty", "sigmoid-all-masked", "softmax-empty", "softmax-all-ignored",
                                  "softmax-C=1"])
def test_empty_and_degenerate_mean_is_zero_with_zero_gradients(case):
    ft = _ft()
    if case == "sigmoid-empty":
        x, fn = torch.zeros(0, 3), lambda z: ft.sigmoid_focal_loss(z, torch.zeros(0, 3))
    elif case == "sigmoid-all-masked":
        x = torch.full((4, 3), float("nan"))
        fn = lambda z: ft.sigmoid_focal_loss(z, torch.ones(4, 3), where=torch.zeros(4, 3, dtype=torch.bool))
    elif case == "softmax-empty":
        x, fn = torch.zeros(0, 3, 2), lambda z: ft.softmax_focal_loss(z, torch.zeros(0, 2, dtype=torch.long))
    elif case == "softmax-all-ignored":
        x = torch.full((4, 3), float("inf"))
        fn = lambda z: ft.softmax_focal_loss(z, torch.full((4,), 255), ignore_index=255)
    else:
        x, fn = torch.randn(4, 1) * 10, lambda z: ft.softmax_focal_loss(z, torch.zeros(4, dtype=torch.long))
    value, grad = _value_and_grad(fn, x)
    assert value.item() == 0.0
    assert grad.shape == x.shape and torch.equal(grad, torch.zeros_like(x))


# ----------------------------------------------------------------------------------------
# The original blog modules: their numbers where they ran, and each defect fixed.
# ----------------------------------------------------------------------------------------


def _original_inputs():
    torch.manual_seed(0)
    pred = torch.randn(2, 3, 4, 4)
    teacher = F.one_hot(torch.randint(0, 3, (2, 4, 4)), 3).permute(0, 3, 1, 2).float()
    p = torch.randn(5, 3)
    y = torch.randint(0, 3, (5,))
    return pred, teacher, p, y


BLOG_VALUES = {  # original-modules.md: torch 2.13, CPU, on the inputs of _original_inputs()
    "SegmentationFocalLoss()": (lambda ft: ft.SegmentationFocalLoss(), 0.4572),
    "SegmentationFocalLoss(logits=False)": (lambda ft: ft.SegmentationFocalLoss(logits=False), 1.2666),
    "ClassificationFocalLoss(3)": (lambda ft: ft.ClassificationFocalLoss(3), 0.4027),
    "ClassificationFocalLoss(3, logits=False)": (lambda ft: ft.ClassificationFocalLoss(3, logits=False), 0.9486),
}


@pytest.mark.parametrize("case", list(BLOG_VALUES))
def test_original_modules_reproduce_the_blog_values(case):
    make, expected = BLOG_VALUES[case]
    module = make(_ft())
    pred, teacher, p, y = _original_inputs()
    value = module(pred, teacher) if case.startswith("Segmentation") else module(p, y)
    assert round(value.item(), 4) == expected


@pytest.mark.parametrize("logits", [True, False], ids=["logits=True", "logits=False"])
@pytest.mark.parametrize("module", ["SegmentationFocalLoss", "ClassificationFocalLoss"])
def test_original_weights_work_and_match_the_reference(module, logits):
    """The original crashed on any weights with more than one class ("Boolean value of Tensor ...")."""
    ft = _ft()
    pred, teacher, p, y = _original_inputs()
    weights = [0.5, 1.0, 2.0]
    args = () if module == "SegmentationFocalLoss" else (3,)
    x, tt = (pred, teacher) if module == "SegmentationFocalLoss" else (p, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loss = getattr(ft, module)(*args, weights=weights, logits=logits)
    value, grad = _value_and_grad(loss, x.double(), tt if tt.dtype == torch.long else tt.double())
    ref_v, ref_g = reference.original_focal_loss(x.double().numpy(), tt.numpy(), weights=weights, logits=logits,
                                                 n_classes=None if not args else 3)
    H.assert_close(value, ref_v, "float64", "value")
    H.assert_close(grad, ref_g, "float64", "gradient")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("module", ["SegmentationFocalLoss", "ClassificationFocalLoss"])
def test_original_half_precision_mean_of_many_positions(module, dtype):
    """``logits=False``: the mean of 2^15 positions whose sum (about 3e4 per unit of loss) exceeds float16's
    largest number (65504). It is summed in float32 and rounded once, as in the other backend."""
    import jax.numpy as jnp

    import focal_jax

    rng = np.random.default_rng(3)
    c = 4
    x = rng.normal(size=(2, c, 128, 128)) * 3 if module == "SegmentationFocalLoss" else rng.normal(size=(2**15, c)) * 3
    y = rng.integers(0, c, size=(x.shape[0],) + x.shape[2:])
    args = () if module == "SegmentationFocalLoss" else (c,)
    if not args:  # the segmentation module's teacher has pred's shape (one-hot here)
        y = np.moveaxis(np.eye(c)[y], -1, 1).astype(np.float32)
    x = x.astype(np.float32)  # the float64 values the half inputs hold, once rounded through float32
    xt = torch.tensor(x).to(getattr(torch, dtype))
    held = xt.double().numpy()
    ref_v, _ = reference.original_focal_loss(held, y, logits=False, n_classes=None if not args else c)
    assert ref_v * x.size / c > 65504  # the sum itself would not fit
    tv = getattr(_ft(), module)(*args, logits=False)(xt, torch.tensor(y))
    jv = getattr(focal_jax, module)(*args, logits=False)(jnp.asarray(held, getattr(jnp, dtype)), jnp.asarray(y))
    assert tv.dtype == getattr(torch, dtype) and jv.dtype == getattr(jnp, dtype)
    H.assert_close(tv.float().numpy(), ref_v, dtype, f"torch {module}")
    H.assert_close(np.asarray(jv, np.float32), ref_v, dtype, f"jax {module}")


@pytest.mark.parametrize("logits", [True, False], ids=["logits=True", "logits=False"])
@pytest.mark.parametrize("gamma", [3.0, 2.5, 0.0])
def test_original_modules_honour_a_changed_gamma(gamma, logits):
    """``loss.gamma = ...`` after construction gives the loss of a module built with it, and an invalid value
    raises at the call (as the constructor would), for both paths."""
    ft = _ft()
    _, _, p, y = _original_inputs()
    changed = ft.ClassificationFocalLoss(3, gamma=2.0, logits=logits)
    changed.gamma = gamma
    fresh = ft.ClassificationFocalLoss(3, gamma=gamma, logits=logits)
    torch.testing.assert_close(changed(p, y), fresh(p, y), rtol=0, atol=0)
    changed.gamma = -1.0
    with pytest.raises(ValueError, match="gamma"):
        changed(p, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("module", ["SegmentationFocalLoss", "ClassificationFocalLoss"])
def test_original_weights_have_one_source(module, dtype):
    """The ``class_weight`` buffer is the weights: loaded from another module's state_dict it gives that module's
    loss for every pred dtype, and the repr shows it."""
    ft = _ft()
    pred, teacher, p, y = _original_inputs()
    args, (x, t) = ((), (pred, teacher)) if module == "SegmentationFocalLoss" else ((3,), (p, y))
    a = getattr(ft, module)(*args, weights=[1.0, 2.0, 3.0])
    b = getattr(ft, module)(*args, weights=[3.0, 0.5, 1.0])
    a.load_state_dict(b.state_dict())
    assert "weights=[3.0, 0.5, 1.0]" in repr(a)
    torch.testing.assert_close(a(x.to(dtype), t), b(x.to(dtype), t), rtol=0, atol=0)
    ref_v, _ = reference.original_focal_loss(x.double().numpy(), t.numpy(), weights=[3.0, 0.5, 1.0],
                                             n_classes=None if not args else 3)
    H.assert_close(a(x.to(dtype), t).detach().numpy(), ref_v, str(dtype).split(".")[1], "loaded weights")


def test_original_modules_follow_the_input_device():
    """Nothing is moved to CUDA: the class weights and the one-hot go where pred and teacher are."""
    ft = _ft()
    seg = ft.SegmentationFocalLoss(weights=[1.0, 2.0, 0.5])
    cls = ft.ClassificationFocalLoss(3, weights=[1.0, 2.0, 0.5])
    assert seg.class_weight.device.type == "cpu"
    meta = torch.device("meta")
    out_seg = seg(torch.empty(2, 3, 4, 4, device=meta), torch.empty(2, 3, 4, 4, device=meta))
    out_cls = cls(torch.empty(5, 3, device=meta), torch.zeros(5, dtype=torch.long, device=meta))
    assert out_seg.device == meta and out_cls.device == meta
    assert seg.to(torch.float64).class_weight.dtype == torch.float64  # a buffer: it follows the module
    source = "".join(p.read_text() for p in pathlib.Path(ft.__file__).parent.glob("*.py"))
    assert ".cuda(" not in source


def test_original_modules_emit_no_warning():
    """No deprecated ``reduce=`` (the original warned on every call)."""
    ft = _ft()
    pred, teacher, p, y = _original_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for logits in (True, False):
            ft.SegmentationFocalLoss(logits=logits)(pred, teacher)
            ft.ClassificationFocalLoss(3, logits=logits)(p, y)
            ft.ClassificationFocalLoss(3, logits=logits)(p, F.one_hot(y, 3).float())
    assert [str(w.message) for w in caught] == []


def test_original_weights_length_mismatch_raises_value_error():
    ft = _ft()
    pred, teacher, p, y = _original_inputs()
    msg = focal_spec.invalid_value("weights", "3 weights, one per class of pred.shape=(2, 3, 4, 4)", (1.0, 2.0))
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        ft.SegmentationFocalLoss(weights=[1.0, 2.0])(pred, teacher)
    msg = focal_spec.invalid_value("weights", "3 weights, one per class (n_classes=3)", (1.0, 2.0))
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        ft.ClassificationFocalLoss(3, weights=[1.0, 2.0])


@pytest.mark.parametrize("module", ["SegmentationFocalLoss", "ClassificationFocalLoss"])
def test_original_logits_false_with_weights_warns_once(module):
    """The original built a RuntimeWarning and never raised it; now it is emitted, once per construction."""
    ft = _ft()
    pred, teacher, p, y = _original_inputs()
    args = () if module == "SegmentationFocalLoss" else (3,)
    with pytest.warns(RuntimeWarning, match=re.escape(focal_spec.original_logits_false_weights())) as caught:
        loss = getattr(ft, module)(*args, weights=[1.0, 2.0, 0.5], logits=False)
        loss(pred, teacher) if module == "SegmentationFocalLoss" else loss(p, y)
    assert len([w for w in caught if w.category is RuntimeWarning]) == 1


def test_classification_index_teacher_out_of_range_raises():
    ft = _ft()
    msg = focal_spec.label_out_of_range(3, 3, None)  # the original modules have no ignore_index
    for logits in (True, False):
        with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
            ft.ClassificationFocalLoss(3, logits=logits)(torch.zeros(2, 3), torch.tensor([0, 3]))
    msg = focal_spec.label_out_of_range(-100, 3, None)  # -100 is a class index like any other here
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        ft.ClassificationFocalLoss(3, logits=False)(torch.zeros(2, 3), torch.tensor([0, -100]))
    with pytest.raises(ValueError, match="n_classes=3"):
        ft.ClassificationFocalLoss(3)(torch.zeros(2, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "softmax"])
def test_classification_index_out_of_range_where_unchecked_is_nan(logits):
    """Where the index check cannot run (labels batched by vmap, torch.compile), an out-of-range index gives a
    NaN loss, never the loss of a clamped class; plain labels inside a transform are checked as in eager."""
    ft = _ft()
    loss = ft.ClassificationFocalLoss(3, logits=logits)
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0))
    ys = torch.tensor([[0, 1], [2, 3], [1, -1], [0, 2]])
    out = torch.func.vmap(loss)(x, ys)
    assert torch.isnan(out[[1, 2]]).all() and torch.isfinite(out[[0, 3]]).all()
    for i in (0, 3):  # the counted rows equal eager calls
        torch.testing.assert_close(out[i], loss(x[i], ys[i]), rtol=1e-6, atol=0.0)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    assert torch.isnan(compiled(x[1], ys[1])) and torch.isfinite(compiled(x[0], ys[0]))
    y1 = ys[1]  # taken outside the transform: plain
    with pytest.raises(ValueError, match=re.escape(focal_spec.label_out_of_range(3, 3, None))):
        torch.func.grad(lambda z: loss(z, y1))(x[1])


@pytest.mark.parametrize("labels", ["index", "index-none", "probs"])
def test_softmax_pieces_match_reference(monkeypatch, labels):
    from focal_torch import _common

    monkeypatch.setattr(_common, "SOFTMAX_CHUNK", 20)
    ft = _ft()
    rng = np.random.default_rng(7)
    x = rng.normal(scale=3.0, size=(6, 4, 5))
    kw = {"gamma": 0.5, "reduction": "none" if labels == "index-none" else "mean", "weight": rng.uniform(0.5, 2, 4)}
    if labels == "probs":
        y = np.moveaxis(rng.dirichlet(np.ones(4), size=(6, 5)), -1, 1)
        kw["where"] = rng.uniform(size=(6, 5)) < 0.7
        x = np.where(kw["where"][:, None], x, np.nan)
    else:
        y = rng.integers(0, 4, size=(6, 5))
        y[1, 2] = y[4, 0] = -100
        x[1, :, 2] = np.inf
    ref_v, ref_g = reference.softmax_focal_loss(x, y, axis=1, **kw)
    tkw = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    v, g = _value_and_grad(lambda z: ft.softmax_focal_loss(z, torch.as_tensor(y), **tkw), torch.tensor(x))
    H.assert_close(v, ref_v, "float64", "value")
    H.assert_close(g, ref_g, "float64", "gradient")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_original_geometric_one_minus_p_is_exact(dtype, compiled):
    """The original modules' 1 - p_t = 1 - e^-ce keeps its digits for small ce, also under torch.compile
    (whose CPU expm1 is exp(x) - 1): within a few ulps of the float64 expm1 from 1e-30 to 80."""
    from focal_torch._original import _one_minus_exp_neg

    c64 = torch.cat([torch.logspace(-30, np.log10(80.0), 2001, dtype=torch.float64),
                     torch.linspace(0.005, 0.3, 2001, dtype=torch.float64)])  # both sides of each threshold
    c = c64.to(getattr(torch, dtype))
    fn = torch.compile(_one_minus_exp_neg) if compiled else _one_minus_exp_neg
    got = fn(c).double()
    want = -torch.expm1(-c.double())
    rtol = 4e-7 if dtype == "float32" else 3e-14  # float32: 3.4 ulps; float64: 1 - e^-c above 0.01 loses < 7 bits
    assert torch.all((got - want).abs() <= rtol * want.abs()), float(((got - want).abs() / want.abs()).max())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["sigmoid", "softmax", "softmax-ignored", "softmax-weighted"])
def test_retained_graph_gradients_stay_independent(loss, reduction):
    """``loss.backward()`` hands the kept gradient over when the graph is freed; with ``retain_graph`` it must not,
    or a gradient changed in place (or accumulated into) would change the next backward's. The later backwards
    recompute it, with the labels, ignored positions and class weights of the call."""
    ft = _ft()
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(6, 5, generator=g) * 2).requires_grad_()
    if loss == "sigmoid":
        t = (torch.rand(6, 5, generator=g) < 0.4).float()
        fn = ft.sigmoid_focal_loss
    else:
        t = torch.randint(0, 5, (6,), generator=g)
        fn = ft.softmax_focal_loss
        if loss == "softmax-ignored":
            t[1] = -100
        if loss == "softmax-weighted":
            fn = functools.partial(ft.softmax_focal_loss, weight=torch.tensor([0.5, 2.0, 1.0, 0.25, 3.0]))
    out = fn(x, t, reduction=reduction)
    (grad,) = torch.autograd.grad(out, x, retain_graph=True)
    expected = grad.clone()
    grad.mul_(5.0)  # the caller owns what it was given
    for _ in range(2):
        out.backward(retain_graph=True)
    out.backward()
    torch.testing.assert_close(x.grad, 3.0 * expected, rtol=1e-6, atol=0.0)
    x.grad = None
    fn(x, t, reduction=reduction).backward()  # the graph is freed: the gradient handed over
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=0.0)
