"""torch losses called inside a ``torch.func`` transform that wraps none of their tensors.

``vmap(lambda z: z * loss(x, y))(zs)`` or ``grad(lambda s: s * loss(x, y))(s0)``: the loss's own tensors stay
plain, yet the eager kernels (``autograd.Function`` with ``forward(ctx, ...)``) refuse to run while a transform is
active, and under ``grad`` even ``detach()`` of a plain tensor returns a wrapped one. The library finds this
through public behaviour only (``torch.func.debug_unwrap`` and the refusal itself, see
``focal_torch._common.functions_refused``). Every loss must then give the value it gives outside the transform:
held here to the float64 reference with the precision contract's relative bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import focal_spec
from parity_tests import _harness as H

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _ft():
    import focal_torch

    return focal_torch


def _logits(shape, dtype, seed: int, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _labels(n: int, c: int, seed: int, dtype=torch.int64, low: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, c, (n,), generator=g).to(dtype)


def _probs(shape, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64)


def _np(t):
    return t.detach().double().numpy()


Case = tuple[Callable[[], Any], np.ndarray, str]


def _softmax_fast(dtype) -> Case:
    """Integer labels, number γ: the fast path (labels checked by the kernel's gather on the CPU)."""
    x, y = _logits((6, 5), dtype, 1), _labels(6, 5, 2)
    ref = focal_spec.reference.softmax_focal_loss(_np(x), y.numpy(), gamma=2.0, axis=-1, reduction="mean")[0]
    return (lambda: _ft().softmax_focal_loss(x, y, gamma=2.0)), ref, "float32" if dtype == torch.float32 else "float64"


def _softmax_checked() -> Case:
    """An ignore_index inside [0, C) that no label takes: the fast path with its labels read first."""
    x, y = _logits((6, 5), torch.float32, 3), _labels(6, 4, 4, dtype=torch.int32)
    ref = focal_spec.reference.softmax_focal_loss(_np(x), y.numpy(), gamma=0.5, ignore_index=4, axis=-1,
                                                  reduction="sum")[0]
    return (lambda: _ft().softmax_focal_loss(x, y, gamma=0.5, ignore_index=4, reduction="sum")), ref, "float32"


def _softmax_general() -> Case:
    """A class weight, an ignored label and a per-class tensor γ (plain tensors): the general path's kernel."""
    x, y = _logits((7, 5), torch.float32, 5), _labels(7, 5, 6)
    y[3] = -100
    w = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.25])
    gamma = torch.linspace(0.0, 3.0, 5)
    ref = focal_spec.reference.softmax_focal_loss(_np(x), y.numpy(), gamma=gamma.double().numpy(),
                                                  weight=w.double().numpy(), axis=-1, reduction="mean")[0]
    return (lambda: _ft().softmax_focal_loss(x, y, gamma=gamma, weight=w)), ref, "float32"


def _softmax_map() -> Case:
    """A (N, C, H, W) map with uint8 labels, reduction "none"."""
    x, y = _logits((2, 4, 3, 3), torch.float32, 7), _labels(18, 4, 8, dtype=torch.uint8).reshape(2, 3, 3)
    ref = focal_spec.reference.softmax_focal_loss(_np(x), y.numpy(), gamma=2.0, axis=1, reduction="none")[0]
    return (lambda: _ft().softmax_focal_loss(x, y, gamma=2.0, reduction="none")), ref, "float32"


def _softmax_map_channels_last() -> Case:
    """channels_last (N, C, H, W) logits with int32 labels, an ignored pixel, reduction "sum"."""
    x = _logits((2, 4, 3, 3), torch.float32, 19).contiguous(memory_format=torch.channels_last)
    y = _labels(18, 4, 20, dtype=torch.int32).reshape(2, 3, 3)
    y[1, 2, 0] = -100
    ref = focal_spec.reference.softmax_focal_loss(_np(x), y.numpy(), gamma=0.5, axis=1, reduction="sum")[0]
    return (lambda: _ft().softmax_focal_loss(x, y, gamma=0.5, reduction="sum")), ref, "float32"


def _sigmoid_fast() -> Case:
    x, t = _logits((4, 6), torch.float32, 9), (_probs((4, 6), 10) > 0.5).double()
    ref = focal_spec.reference.sigmoid_focal_loss(_np(x), t.numpy(), gamma=2.0, alpha=0.25, reduction="mean")[0]
    tt = t.float()
    return (lambda: _ft().sigmoid_focal_loss(x, tt, gamma=2.0, alpha=0.25)), ref, "float32"


def _sigmoid_general() -> Case:
    x, t = _logits((4, 6), torch.float32, 11), _probs((4, 6), 12)
    w = torch.linspace(0.5, 2.0, 6)
    ref = focal_spec.reference.sigmoid_focal_loss(_np(x), t.numpy(), gamma=1.5, weight=w.double().numpy(),
                                                  reduction="none")[0]
    tt = t.float()
    return (lambda: _ft().sigmoid_focal_loss(x, tt, gamma=1.5, weight=w, reduction="none")), ref, "float32"


def _family(name: str) -> Case:
    x, t = _logits((5, 6), torch.float32, 13), _probs((5, 6), 14)
    if name == "asymmetric_loss":
        t = (t > 0.5).double()
    ref = getattr(focal_spec.variants, name)(_np(x), t.numpy(), reduction="sum")[0]
    tt = t.float()
    return (lambda: getattr(_ft(), name)(x, tt, reduction="sum")), ref, "float32"


def _linear() -> Case:
    x, w, b = _logits((6, 8), torch.float32, 15, 1.0), _logits((5, 8), torch.float32, 16, 1.0), _logits(
        (5,), torch.float32, 17, 1.0)
    y = _labels(6, 5, 18)
    z = _np(x) @ _np(w).T + _np(b)
    ref = focal_spec.reference.softmax_focal_loss(z, y.numpy(), gamma=2.0, axis=-1, reduction="mean")[0]
    return (lambda: _ft().linear_softmax_focal_loss(x, w, y, bias=b, gamma=2.0)), ref, "float32"


CASES: dict[str, Callable[[], Case]] = {
    "softmax-fast-float32": lambda: _softmax_fast(torch.float32),
    "softmax-fast-float64": lambda: _softmax_fast(torch.float64),
    "softmax-checked-labels": _softmax_checked,
    "softmax-general": _softmax_general,
    "softmax-map-none": _softmax_map,
    "softmax-map-channels-last": _softmax_map_channels_last,
    "sigmoid-fast": _sigmoid_fast,
    "sigmoid-general-none": _sigmoid_general,
    "asymmetric_loss": lambda: _family("asymmetric_loss"),
    "quality_focal_loss": lambda: _family("quality_focal_loss"),
    "varifocal_loss": lambda: _family("varifocal_loss"),
    "linear": _linear,
}


def _run(transform: str, loss: Callable[[], Any], dtype: str) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """The transform applied to a function of ``z`` (of the loss's dtype) in which the loss is a constant factor;
    returns the result and how it follows from the loss's value."""
    func = torch.func
    zs = torch.tensor([1.0, -2.0, 0.5], dtype=getattr(torch, dtype))
    if transform == "vmap":
        out = func.vmap(lambda z: z * loss())(zs)
        return _np(out), lambda v: zs.double().numpy().reshape((3,) + (1,) * v.ndim) * v
    if transform == "grad":
        out = func.grad(lambda s: (s * loss()).sum())(torch.tensor(2.0, dtype=zs.dtype))
        return _np(out), lambda v: np.asarray(v.sum())
    if transform == "jacfwd":
        out = func.jacfwd(lambda s: s * loss())(torch.tensor(2.0, dtype=zs.dtype))
        return _np(out), lambda v: v
    if transform == "vmap-grad":
        out = func.vmap(func.grad(lambda s: (s * loss()).sum()))(zs)
        return _np(out), lambda v: np.full(3, v.sum())
    raise AssertionError(transform)


@pytest.mark.parametrize("transform", ["vmap", "grad", "jacfwd", "vmap-grad"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_under_a_transform_that_wraps_none_of_its_tensors(case, transform):
    loss, ref, dtype = CASES[case]()
    plain = loss()  # outside the transform: the eager kernels
    H.assert_close(_np(plain), ref, dtype, f"{case} outside the transform")
    out, expected_from = _run(transform, loss, dtype)
    H.assert_close(out, expected_from(np.asarray(ref, np.float64)), dtype, f"{case} under {transform}")


def test_functions_refused_tells_a_transform_apart():
    from focal_torch import _common as C

    assert not C.functions_refused()
    seen = []

    def f(z):
        seen.append(C.functions_refused())
        return z * 2.0

    torch.func.vmap(f)(torch.ones(3))
    torch.func.grad(lambda z: f(z).sum())(torch.ones(3))
    torch.func.jacfwd(f)(torch.ones(3))
    assert seen == [True, True, True]
    assert not C.functions_refused()


def test_is_transformed_sees_wrapped_tensors_only():
    from focal_torch import _common as C

    plain = torch.ones(3)
    seen = []

    def f(z):
        seen.append((C.is_transformed(z), C.is_transformed(plain), C.plain_eager(plain), C.plain_eager(plain, z)))
        return z.sum()

    torch.func.grad(f)(torch.ones(3))
    torch.func.vmap(f)(torch.ones(2, 3))
    assert seen == [(True, False, True, False)] * 2
    assert not C.is_transformed(plain) and C.plain_eager(plain)


def test_an_error_inside_the_kernel_is_not_taken_for_a_transform(monkeypatch):
    """Outside a transform, a RuntimeError of an eager kernel reaches the user (it is not served by the smooth
    formula instead)."""
    from focal_torch import _sigmoid, _softmax

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failure")

    ft = _ft()
    from focal_torch import _linear

    monkeypatch.setattr(_linear._LinearFocal, "apply", broken)  # first: its fallback would run the softmax
    with pytest.raises(RuntimeError, match="kernel failure"):
        ft.linear_softmax_focal_loss(torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 4]))
    x = torch.randn(4, 5)
    monkeypatch.setattr(_softmax, "_apply_plain", broken)
    monkeypatch.setattr(_softmax._IndexFocal, "apply", broken)
    with pytest.raises(RuntimeError, match="kernel failure"):
        ft.softmax_focal_loss(x, torch.tensor([0, 1, 2, 3]), gamma=2.0, ignore_index=4)
    with pytest.raises(RuntimeError, match="kernel failure"):  # the general path's kernel
        ft.softmax_focal_loss(x, torch.tensor([0, 1, 2, 3]), gamma=2.0, weight=torch.ones(5))
    monkeypatch.setattr(_sigmoid, "_apply_plain", broken)
    monkeypatch.setattr(_sigmoid._SigmoidFocal, "apply", broken)
    with pytest.raises(RuntimeError, match="kernel failure"):
        ft.sigmoid_focal_loss(x, torch.rand(4, 5), gamma=2.0)
    with pytest.raises(RuntimeError, match="kernel failure"):
        ft.sigmoid_focal_loss(x, torch.rand(4, 5), gamma=2.0, weight=torch.ones(5))
    from focal_torch import _family

    monkeypatch.setattr(_family._FamilyKernel, "apply", broken)
    with pytest.raises(RuntimeError, match="kernel failure"):
        ft.asymmetric_loss(x, (torch.rand(4, 5) > 0.5).float())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_vmap_over_labels_with_plain_logits(reduction):
    """Only the labels (or targets) are batched: the logits stay plain, and the loss must not read the labels'
    values (a batched tensor's values cannot drive Python control flow)."""
    ft = _ft()
    x = _logits((6, 5), torch.float32, 21)
    ys = torch.stack([_labels(6, 5, 22 + i) for i in range(3)])
    out = torch.func.vmap(lambda y: ft.softmax_focal_loss(x, y, gamma=2.0, reduction=reduction))(ys)
    ref = np.stack([focal_spec.reference.softmax_focal_loss(_np(x), y.numpy(), gamma=2.0, axis=-1,
                                                            reduction=reduction)[0] for y in ys])
    H.assert_close(_np(out), ref, "float32", f"softmax, vmap over labels, {reduction}")

    ts = torch.stack([_probs((6, 5), 30 + i) for i in range(3)])
    out = torch.func.vmap(lambda t: ft.sigmoid_focal_loss(x, t, gamma=2.0, reduction=reduction))(ts.float())
    ref = np.stack([focal_spec.reference.sigmoid_focal_loss(_np(x), t.numpy(), gamma=2.0,
                                                            reduction=reduction)[0] for t in ts])
    H.assert_close(_np(out), ref, "float32", f"sigmoid, vmap over targets, {reduction}")


@pytest.mark.parametrize("loss", ["sigmoid_focal_loss", "asymmetric_loss", "quality_focal_loss", "varifocal_loss",
                                  "softmax_focal_loss"])
def test_bad_targets_inside_a_transform(loss):
    """Plain targets inside a transform are checked as in eager mode (ValueError); targets the transform batches
    cannot be read, and a bad one gives NaN for its sample only."""
    fn = getattr(_ft(), loss)
    x = _logits((4, 3), torch.float32, 40)
    if loss == "softmax_focal_loss":
        good, bad = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 3, 2, 1])
    else:
        good = (_probs((4, 3), 41) > 0.5).float()
        bad = good.clone()
        bad[1, 1] = 1.5 if loss != "asymmetric_loss" else 2.0
    for run in (lambda y: torch.func.grad(lambda s: s * fn(x, y))(torch.tensor(1.0)),
                lambda y: torch.func.vmap(lambda s: s * fn(x, y))(torch.ones(2))):
        run(good)
        with pytest.raises(ValueError, match="Invalid value"):
            run(bad)
    out = torch.func.vmap(lambda y: fn(x, y))(torch.stack([good, bad]))
    assert torch.isfinite(out[0]) and torch.isnan(out[1])
    torch.testing.assert_close(out[0], fn(x, good), rtol=1e-6, atol=0.0)
    # a batched ``where`` leaves the targets plain, but what is read of them is masked by it
    masks = torch.tensor([[True, False, True, True], [False, True, True, True]])
    if loss != "softmax_focal_loss":
        masks = masks[:, :, None].expand(2, 4, 3)
    out = torch.func.vmap(lambda w: fn(x, bad, where=w))(masks)
    assert torch.isfinite(out[0]) and torch.isnan(out[1])
    torch.testing.assert_close(out[0], fn(x, bad, where=masks[0]), rtol=1e-6, atol=0.0)
