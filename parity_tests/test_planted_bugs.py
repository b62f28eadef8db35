"""focal_torch's caches, the gradient of channels_last logits, and the plain path's label dtypes and layouts.

1. Caches keyed on static facts. The plain calls of both losses validate their options once per static facts
   (shapes, dtypes, device, option values) and cache the result; the general paths cache the spec's
   validation too. A key that leaves out a fact the result depends on serves a stale entry: a wrong loss, or
   an invalid call that no longer raises. Each test makes a first call, then a call with one fact changed,
   in both orders, and holds the second result to the float64 reference and to the same call computed with
   every cache empty (bit for bit); and an invalid call must still raise after a valid one was cached.
3. channels_last logits: the gradient of every path (the fused kernels, the large inputs' kernels, with a
   weight, with ignored positions or a mask, every reduction) holds the right values where they belong, and
   is laid out densely, as the input (channels_last) or contiguous.
5. The plain path (no weight, mask or ignored label) with every integer label dtype, every integer and
   boolean target dtype, and logits that are not contiguous (transposed, sliced with a step, channels_last).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import focal_spec
from parity_tests import _harness as H

torch = pytest.importorskip("torch")
import focal_torch  # noqa: E402
from focal_torch import _common, _distributed, _family, _sigmoid, _softmax  # noqa: E402

_CACHE_DICTS = ("_PLAIN", "_OPTIONS_CACHE")  # module-level dict caches (absent names are skipped)


def _clear_caches() -> None:
    """Empties every cache of focal_torch's loss modules: the named dict caches and every functools cache."""
    for mod in (_common, _distributed, _family, _sigmoid, _softmax):
        for name, obj in vars(mod).items():
            if callable(getattr(obj, "cache_clear", None)):
                obj.cache_clear()
            elif name in _CACHE_DICTS and isinstance(obj, dict):
                obj.clear()


def _tdtype(name: str):
    return getattr(torch, name)


# ----------------------------------------------------------------------------------------
# Calls described by their facts.
# ----------------------------------------------------------------------------------------

SOFTMAX_BASE = dict(shape=(6, 4), dtype="float32", label_dtype="int64", gamma=2.0, reduction="mean",
                    ignore_index=-100, label_smoothing=0.0, dim=1, requires_grad=True, weight=False, where=False,
                    ignored=False)
SIGMOID_BASE = dict(shape=(6, 4), dtype="float32", target_dtype="float32", target_shape="full", gamma=2.0,
                    alpha=0.25, label_smoothing=0.0, reduction="mean", requires_grad=True, weight=False,
                    where=False)


def _softmax_call(f: dict) -> tuple[torch.Tensor, torch.Tensor | None, H.Inputs]:
    """The loss of the facts ``f`` (class dim ``f["dim"]``), its gradient (of the sum, in the layout with class
    dim 1) and the reference's inputs (class dim 1)."""
    rng = np.random.default_rng(7)
    shape = f["shape"]
    c = shape[1]
    positions = shape[:1] + shape[2:]
    x = rng.normal(scale=3.0, size=shape)
    y = rng.integers(0, c, size=positions)
    if f["ignored"]:
        y.reshape(-1)[::3] = f["ignore_index"]
    kw: dict = {k: f[k] for k in ("gamma", "reduction", "ignore_index", "label_smoothing")}
    if f["weight"]:
        kw["weight"] = rng.uniform(0.5, 2.0, size=c)
    if f["where"]:
        kw["where"] = rng.uniform(size=positions) < 0.7
    inp = H.Inputs(x, y, kw, f["dtype"])
    tkw = {k: (torch.as_tensor(v, dtype=torch.float32) if k == "weight" else torch.as_tensor(v))
           if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    d = f["dim"]
    xt = torch.tensor(np.moveaxis(x, 1, d), dtype=_tdtype(f["dtype"]), requires_grad=f["requires_grad"])
    out = focal_torch.softmax_focal_loss(xt, torch.as_tensor(y.astype(f["label_dtype"])), dim=d, **tkw)
    grad = None
    if f["requires_grad"]:
        (grad,) = torch.autograd.grad(out.sum(), xt)
        grad = grad.movedim(d, 1)
    return out.detach(), grad, inp


def _sigmoid_call(f: dict) -> tuple[torch.Tensor, torch.Tensor | None, H.Inputs]:
    rng = np.random.default_rng(8)
    shape = f["shape"]
    x = rng.normal(scale=3.0, size=shape)
    t = (rng.uniform(size=shape) < 0.3).astype(np.float64)
    if f["target_shape"] == "row":  # one row broadcast to every row
        t = t[:1]
    kw: dict = {k: f[k] for k in ("gamma", "alpha", "label_smoothing", "reduction")}
    if f["weight"]:
        kw["weight"] = rng.uniform(0.5, 2.0, size=shape)
    if f["where"]:
        kw["where"] = rng.uniform(size=shape) < 0.7
    label_dtype = f["target_dtype"] if f["target_dtype"] in ("float64", "float16", "bfloat16") else None
    inp = H.Inputs(x, np.broadcast_to(t, shape).copy(), kw, f["dtype"], label_dtype=label_dtype)
    tkw = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    if "weight" in tkw:
        tkw["weight"] = tkw["weight"].float()
    tt = torch.as_tensor(t)
    tt = tt > 0.5 if f["target_dtype"] == "bool" else tt.to(_tdtype(f["target_dtype"]))
    xt = torch.tensor(x, dtype=_tdtype(f["dtype"]), requires_grad=f["requires_grad"])
    out = focal_torch.sigmoid_focal_loss(xt, tt, **tkw)
    grad = torch.autograd.grad(out.sum(), xt)[0] if f["requires_grad"] else None
    return out.detach(), grad, inp


CALLS = {"softmax": (_softmax_call, SOFTMAX_BASE), "sigmoid": (_sigmoid_call, SIGMOID_BASE)}


def _check_reference(loss: str, out: torch.Tensor, grad: torch.Tensor | None, inp: H.Inputs, what: str) -> None:
    exp = H.expected(loss, inp)
    value = out.double().numpy()
    if grad is None:
        H.assert_close(value, exp.value, inp.dtype, f"{what} value",
                       scale=exp.value_scale if inp.dtype not in H.HALF else None)
        return
    exp.check(value, grad.double().numpy(), inp.dtype, what)


# ----------------------------------------------------------------------------------------
# 1. Each fact changed alone.
# ----------------------------------------------------------------------------------------

SOFTMAX_CHANGES = {
    "logits-float64": dict(dtype="float64"),
    "logits-float16": dict(dtype="float16"),
    "labels-int32": dict(label_dtype="int32"),
    "labels-uint8": dict(label_dtype="uint8"),
    "batch": dict(shape=(9, 4)),
    "ndim": dict(shape=(6, 4, 3)),
    "classes": dict(shape=(6, 7)),
    "gamma-0": dict(gamma=0.0),
    "gamma-whole": dict(gamma=3.0),
    "gamma-fractional": dict(gamma=0.5),
    "gamma-int-2": dict(gamma=2),  # the same value as an int: the same loss
    "reduction-sum": dict(reduction="sum"),
    "reduction-none": dict(reduction="none"),
    "label-smoothing": dict(label_smoothing=0.1),
    "ignore-index-present": dict(ignore_index=1, ignored=True),
    "ignore-index-absent": dict(ignore_index=3),
    "dim-0": dict(shape=(5, 5), dim=0),
    "no-grad": dict(requires_grad=False),
    "weight": dict(weight=True),
    "where": dict(where=True),
}

SIGMOID_CHANGES = {
    "logits-float64": dict(dtype="float64"),
    "logits-bfloat16": dict(dtype="bfloat16"),
    "targets-bool": dict(target_dtype="bool"),
    "targets-uint8": dict(target_dtype="uint8"),
    "targets-float64": dict(target_dtype="float64"),
    "targets-broadcast": dict(target_shape="row"),
    "batch": dict(shape=(9, 4)),
    "ndim": dict(shape=(2, 4, 3)),
    "classes": dict(shape=(6, 7)),
    "gamma-0": dict(gamma=0.0),
    "gamma-whole": dict(gamma=3.0),
    "gamma-fractional": dict(gamma=0.5),
    "alpha-none": dict(alpha=None),
    "alpha-other": dict(alpha=0.75),
    "alpha-int-1": dict(alpha=1),
    "label-smoothing": dict(label_smoothing=0.1),
    "reduction-sum": dict(reduction="sum"),
    "reduction-none": dict(reduction="none"),
    "no-grad": dict(requires_grad=False),
    "weight": dict(weight=True),
    "where": dict(where=True),
}

FACT_CASES = [("softmax", k, v) for k, v in SOFTMAX_CHANGES.items()] + \
             [("sigmoid", k, v) for k, v in SIGMOID_CHANGES.items()]


@pytest.mark.parametrize("order", ["base-first", "changed-first"])
@pytest.mark.parametrize("loss,change,facts", FACT_CASES, ids=[f"{c[0]}-{c[1]}" for c in FACT_CASES])
def test_a_cached_call_with_one_fact_changed_equals_a_fresh_call(loss, change, facts, order):
    call, base = CALLS[loss]
    changed = {**base, **facts}
    first, second = (base, changed) if order == "base-first" else (changed, base)
    _clear_caches()
    call(first)
    out, grad, inp = call(second)
    _check_reference(loss, out, grad, inp, f"{loss} {change} {order}")
    _clear_caches()
    fresh_out, fresh_grad, _ = call(second)
    assert torch.equal(out, fresh_out), (out, fresh_out)
    assert (grad is None) == (fresh_grad is None)
    assert grad is None or torch.equal(grad, fresh_grad)


def test_softmax_meta_logits_after_a_cpu_call():
    """The device: a call on the meta device after the same facts on the CPU gives a meta result."""
    _clear_caches()
    x = torch.randn(6, 4, requires_grad=True)
    y = torch.randint(0, 4, (6,))
    focal_torch.softmax_focal_loss(x, y)
    focal_torch.sigmoid_focal_loss(x, torch.rand(6, 4))
    xm = torch.empty(6, 4, device="meta", requires_grad=True)
    for out in (focal_torch.softmax_focal_loss(xm, y.to("meta")),
                focal_torch.sigmoid_focal_loss(xm, torch.empty(6, 4, device="meta"))):
        assert out.device.type == "meta" and out.shape == () and out.dtype == torch.float32
        (g,) = torch.autograd.grad(out, xm)
        assert g.device.type == "meta" and g.shape == xm.shape


def _logits(shape: tuple, dtype: str) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.int64) if dtype == "int64" else torch.randn(shape, dtype=_tdtype(dtype))


def _softmax_args(**change) -> tuple[tuple, dict]:
    f = {**SOFTMAX_BASE, **change}
    shape = f["shape"]
    x = _logits(shape, f["dtype"])
    y = torch.arange(shape[0]).remainder(shape[1]).to(_tdtype(f["label_dtype"]))
    kw = {k: f[k] for k in ("gamma", "reduction", "ignore_index", "label_smoothing", "dim")}
    return (x, y), kw


def _sigmoid_args(**change) -> tuple[tuple, dict]:
    f = {**SIGMOID_BASE, **change}
    shape = f["shape"]
    x = _logits(shape, f["dtype"])
    t = torch.zeros(shape if f["target_shape"] == "full" else f["target_shape"], dtype=_tdtype(f["target_dtype"]))
    return (x, t), {k: f[k] for k in ("gamma", "alpha", "label_smoothing", "reduction")}


def _msg(text: str) -> str:
    return re.escape(text)


# (id, loss, the valid call's changes, the invalid call's changes, extra kwargs of the invalid call, error)
INVALID = [
    ("softmax-label-ge-classes", "softmax", dict(shape=(6, 5)), dict(shape=(6, 3), label_dtype="int64"), {},
     ValueError),
    ("softmax-bool-labels", "softmax", {}, dict(label_dtype="bool"), {}, TypeError),
    ("softmax-integer-logits", "softmax", {}, dict(dtype="int64"), {}, TypeError),
    ("softmax-negative-gamma", "softmax", {}, dict(gamma=-1.0), {}, ValueError),
    ("softmax-reduction", "softmax", {}, dict(reduction="avg"), {}, ValueError),
    ("softmax-label-smoothing", "softmax", {}, dict(label_smoothing=1.5), {}, ValueError),
    ("softmax-dim", "softmax", {}, dict(dim=2), {}, ValueError),
    ("softmax-label-shape", "softmax", dict(shape=(6, 4)), dict(shape=(6, 4)), dict(labels=5), ValueError),
    ("softmax-weight-shape", "softmax", {}, {}, dict(weight=5), ValueError),
    ("softmax-where-shape", "softmax", {}, {}, dict(where="shape"), ValueError),
    ("softmax-where-dtype", "softmax", {}, {}, dict(where="int"), TypeError),
    ("sigmoid-target-shape", "sigmoid", dict(target_shape=(4,)), dict(target_shape=(5,)), {}, ValueError),
    ("sigmoid-logits-shape", "sigmoid", {}, dict(shape=(6, 5), target_shape=(6, 4)), {}, ValueError),
    ("sigmoid-logits-smaller-than-targets", "sigmoid", {}, dict(shape=(1, 4), target_shape=(6, 4)), {},
     ValueError),
    ("sigmoid-complex-targets", "sigmoid", {}, dict(target_dtype="complex64"), {}, TypeError),
    ("sigmoid-integer-logits", "sigmoid", {}, dict(dtype="int64"), {}, TypeError),
    ("sigmoid-negative-gamma", "sigmoid", {}, dict(gamma=-1.0), {}, ValueError),
    ("sigmoid-alpha", "sigmoid", {}, dict(alpha=1.5), {}, ValueError),
    ("sigmoid-label-smoothing", "sigmoid", {}, dict(label_smoothing=2.0), {}, ValueError),
    ("sigmoid-reduction", "sigmoid", {}, dict(reduction="avg"), {}, ValueError),
    ("sigmoid-target-values", "sigmoid", {}, {}, dict(targets=2.0), ValueError),
    ("sigmoid-pos-weight-shape", "sigmoid", {}, {}, dict(pos_weight=5), ValueError),
    ("sigmoid-where-dtype", "sigmoid", {}, {}, dict(where="int"), TypeError),
]


def _invalid_call(loss: str, valid: dict, invalid: dict, extra: dict) -> tuple[object, object]:
    """(the valid call, the invalid call) as thunks."""
    args = _softmax_args if loss == "softmax" else _sigmoid_args
    fn = focal_torch.softmax_focal_loss if loss == "softmax" else focal_torch.sigmoid_focal_loss
    (x0, y0), kw0 = args(**valid)
    (x1, y1), kw1 = args(**invalid)
    if loss == "softmax" and "shape" in invalid and "shape" in valid and invalid["shape"][1] < valid["shape"][1]:
        y1 = torch.full_like(y1, valid["shape"][1] - 1)  # a class of the cached call, >= the new class count
    if "labels" in extra:
        y1 = y1[:extra["labels"]]
    if "targets" in extra:
        y1 = torch.full_like(y1, extra["targets"])
    positions = x1.shape[:1] + x1.shape[2:] if loss == "softmax" else x1.shape
    if "weight" in extra:
        kw0["weight"] = torch.ones(x0.shape[1])
        kw1["weight"] = torch.ones(extra["weight"])
    if "pos_weight" in extra:
        kw0["pos_weight"] = torch.ones(x0.shape[1])
        kw1["pos_weight"] = torch.ones(extra["pos_weight"])
    if "where" in extra:
        kw0["where"] = torch.ones(positions, dtype=torch.bool)
        kw1["where"] = torch.ones(positions[:-1] + (positions[-1] + 1,), dtype=torch.bool) \
            if extra["where"] == "shape" else torch.ones(positions, dtype=torch.int64)
    return (lambda: fn(x0, y0, **kw0)), (lambda: fn(x1, y1, **kw1))


@pytest.mark.parametrize("case", INVALID, ids=[c[0] for c in INVALID])
def test_an_invalid_call_raises_after_a_valid_one_was_cached(case):
    _, loss, valid, invalid, extra, error = case
    ok, bad = _invalid_call(loss, valid, invalid, extra)
    _clear_caches()
    with pytest.raises(error) as fresh:  # the message of a fresh call
        bad()
    _clear_caches()
    ok()
    with pytest.raises(error, match=_msg(str(fresh.value))):
        bad()
    ok()
    with pytest.raises(error, match=_msg(str(fresh.value))):  # and a second time: the failure is not cached
        bad()


# A bool option equals the int of its value as a cache key (True == 1, hash(True) == hash(1)).
BOOL_OPTIONS = [("gamma", 1, True), ("alpha", 1, True), ("label_smoothing", 0, False)]


@pytest.mark.parametrize("name,number,flag", BOOL_OPTIONS, ids=[b[0] for b in BOOL_OPTIONS])
def test_sigmoid_bool_option_raises_after_the_equal_int_was_cached(name, number, flag):
    x, t = torch.randn(4, 3), torch.rand(4, 3)
    _clear_caches()
    with pytest.raises(TypeError) as fresh:
        focal_torch.sigmoid_focal_loss(x, t, **{name: flag})
    _clear_caches()
    focal_torch.sigmoid_focal_loss(x, t, **{name: number})
    with pytest.raises(TypeError, match=_msg(str(fresh.value))):
        focal_torch.sigmoid_focal_loss(x, t, **{name: flag})


@pytest.mark.parametrize("name,number,flag", BOOL_OPTIONS, ids=[b[0] for b in BOOL_OPTIONS])
def test_softmax_bool_option_raises_after_the_equal_int_was_cached(name, number, flag):
    if name == "alpha":
        name, number, flag = "ignore_index", 1, True
    x, y = torch.randn(4, 3), torch.tensor([0, 2, 2, 0])
    _clear_caches()
    with pytest.raises(TypeError) as fresh:
        focal_torch.softmax_focal_loss(x, y, **{name: flag})
    _clear_caches()
    focal_torch.softmax_focal_loss(x, y, **{name: number})
    with pytest.raises(TypeError, match=_msg(str(fresh.value))):
        focal_torch.softmax_focal_loss(x, y, **{name: flag})


# ----------------------------------------------------------------------------------------
# 3. channels_last logits: the gradient of every path.
# ----------------------------------------------------------------------------------------

SMALL = (2, 5, 6, 7)  # fused: dℓ/dx computed with the loss
MID = (2, 8, 96, 48)  # softmax: at least 4096 positions (the label's entry cleared from a tensor); sigmoid's buffered
# pieces
LARGE = (8, 8, 24, 48)  # sigmoid's large path (FUSE_MAX lowered below it): the backward recomputes, in rows

CL_PATHS = {
    "softmax-fused": ("softmax", SMALL, dict(gamma=2.0)),
    "softmax-fused-fractional-gamma": ("softmax", SMALL, dict(gamma=0.5)),
    "softmax-fused-weight": ("softmax", SMALL, dict(gamma=2.0, weight=True)),
    "softmax-ignore": ("softmax", SMALL, dict(gamma=2.0, ignore=True)),
    "softmax-large": ("softmax", MID, dict(gamma=2.0)),
    "softmax-large-ignore-weight": ("softmax", MID, dict(gamma=1.5, ignore=True, weight=True)),
    "sigmoid-fused": ("sigmoid", SMALL, dict(gamma=2.0, alpha=0.25)),
    "sigmoid-fused-weight": ("sigmoid", SMALL, dict(gamma=0.5, weight=True)),
    "sigmoid-fused-where": ("sigmoid", SMALL, dict(gamma=2.0, where=True)),
    "sigmoid-buffered": ("sigmoid", MID, dict(gamma=2.0, alpha=0.25)),
    "sigmoid-large": ("sigmoid", LARGE, dict(gamma=2.0, alpha=0.25)),
}


def _cl_inputs(loss: str, shape: tuple, opts: dict) -> H.Inputs:
    rng = np.random.default_rng(H.seed_of(f"{loss}{shape}{sorted(opts)}"))
    x = rng.normal(scale=3.0, size=shape)
    c = shape[1]
    kw: dict = {k: opts[k] for k in ("gamma", "alpha") if k in opts}
    per_class: tuple = ()
    if loss == "softmax":
        positions = shape[:1] + shape[2:]
        y = rng.integers(0, c, size=positions)
        if opts.get("ignore"):
            y = np.where(rng.uniform(size=positions) < 0.25, -100, y)
    else:
        y = (rng.uniform(size=shape) < 0.3).astype(np.float64)
        if opts.get("where"):
            kw["where"] = rng.uniform(size=shape) < 0.7
    if opts.get("weight"):
        kw["weight"] = rng.uniform(0.5, 2.0, size=c)
        per_class = ("weight",) if loss == "sigmoid" else ()
    return H.Inputs(x, y, kw, "float32", per_class)


@pytest.mark.parametrize("reduction", H.REDUCTIONS)
@pytest.mark.parametrize("path", list(CL_PATHS))
def test_channels_last_gradient(path, reduction, monkeypatch):
    loss, shape, opts = CL_PATHS[path]
    if shape == LARGE:  # the path of inputs above 2^21 elements, at a size the reference affords
        monkeypatch.setattr(_sigmoid, "FUSE_MAX", 1 << 14)
        monkeypatch.setattr(_common, "CHUNK", 1 << 12)  # and several pieces
    inp = _cl_inputs(loss, shape, opts)
    inp = H.Inputs(inp.logits, inp.labels, {**inp.kwargs, "reduction": reduction}, inp.dtype, inp.per_class)
    kw = {k: torch.as_tensor(v, dtype=torch.bool if k == "where" else torch.float32) if isinstance(v, np.ndarray)
          else v for k, v in H._layout_kwargs(inp, "torch", 4).items()}
    x = torch.tensor(inp.logits, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    x.requires_grad_()
    y = torch.as_tensor(inp.labels) if loss == "softmax" else torch.tensor(inp.labels, dtype=torch.float32)
    fn = focal_torch.softmax_focal_loss if loss == "softmax" else focal_torch.sigmoid_focal_loss
    out = fn(x, y, **kw)
    # loss.backward() of a reduced loss hands its kept gradient over; "none" goes through a sum
    (g,) = torch.autograd.grad(out if reduction != "none" else out.sum(), x)
    assert g.shape == x.shape and g.dtype == x.dtype
    dense = g.is_contiguous() or g.is_contiguous(memory_format=torch.channels_last)
    assert dense, f"gradient strides {g.stride()} for input strides {x.stride()}"
    H.expected(loss, inp).check(out.detach().double().numpy(), g.double().numpy(), "float32", path)
    # and accumulated into .grad, which autograd lays out as the input
    x2 = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    (fn(x2, y, **kw) if reduction != "none" else fn(x2, y, **kw).sum()).backward()
    assert x2.grad.stride() == x.stride()
    assert torch.equal(x2.grad, g)


# ----------------------------------------------------------------------------------------
# 5. The plain path: integer label and target dtypes, non-contiguous logits.
# ----------------------------------------------------------------------------------------

LAYOUTS = ["contiguous", "transposed", "sliced", "channels_last"]


def _laid_out(x: np.ndarray, layout: str, dtype) -> torch.Tensor:
    """A tensor holding ``x``'s values in ``layout``."""
    if layout == "transposed":
        t = torch.tensor(np.swapaxes(x, 0, -1).copy(), dtype=dtype).transpose(0, -1)
    elif layout == "sliced":  # every other element of a tensor twice as wide along the last dim
        wide = np.repeat(x, 2, axis=-1)
        t = torch.tensor(wide, dtype=dtype)[..., ::2]
    elif layout == "channels_last":
        t = torch.tensor(x, dtype=dtype).contiguous(memory_format=torch.channels_last)
    else:
        t = torch.tensor(x, dtype=dtype)
    assert layout == "contiguous" or not t.is_contiguous()
    assert np.array_equal(t.double().numpy(), torch.tensor(x, dtype=dtype).double().numpy())
    return t.requires_grad_()


@pytest.fixture
def plain_calls(monkeypatch):
    """Counts the plain calls that took the plain path (where the loss module has one)."""
    taken = []
    for mod in (_softmax, _sigmoid):
        original = getattr(mod, "_plain_call", None)
        if original is None:
            continue

        def spy(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            taken.append(out is not None)
            return out

        monkeypatch.setattr(mod, "_plain_call", spy)
    return taken


INT_LABELS = ["uint8", "int8", "int16", "int32", "int64"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("label_dtype", INT_LABELS)
def test_softmax_plain_path_label_dtypes_and_layouts(label_dtype, layout, dtype, plain_calls):
    rng = np.random.default_rng(H.seed_of(f"plain-softmax-{layout}"))
    shape = (3, 5, 4, 6) if layout == "channels_last" else (12, 5)
    x = rng.normal(scale=3.0, size=shape)
    x.reshape(-1)[::7] *= 8.0  # some dominant classes (p_y near 1)
    y = rng.integers(0, shape[1], size=shape[:1] + shape[2:])
    for reduction in H.REDUCTIONS:
        xt = _laid_out(x, layout, _tdtype(dtype))
        out = focal_torch.softmax_focal_loss(xt, torch.as_tensor(y.astype(label_dtype)), gamma=2.0,
                                             reduction=reduction)
        (g,) = torch.autograd.grad(out.sum(), xt)
        inp = H.Inputs(x, y, dict(gamma=2.0, reduction=reduction), dtype)
        H.expected("softmax", inp).check(out.detach().double().numpy(), g.double().numpy(), dtype,
                                         f"{label_dtype} {layout} {reduction}")
    assert plain_calls == ([True] * 3 if hasattr(_softmax, "_plain_call") else [])


@pytest.mark.parametrize("label_dtype,classes,low", [("uint8", 256, 128), ("int16", 300, 256), ("int32", 300, 128)])
def test_softmax_plain_path_labels_beyond_a_narrower_dtype(label_dtype, classes, low, plain_calls):
    """Labels that a narrower (or signed) dtype would wrap: uint8 128-255, int16 above 255."""
    rng = np.random.default_rng(H.seed_of(f"wide-{label_dtype}"))
    x = rng.normal(scale=3.0, size=(6, classes))
    y = rng.integers(low, classes, size=6)
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    out = focal_torch.softmax_focal_loss(xt, torch.as_tensor(y.astype(label_dtype)), gamma=2.0, reduction="sum")
    (g,) = torch.autograd.grad(out, xt)
    H.expected("softmax", H.Inputs(x, y, dict(gamma=2.0, reduction="sum"), "float32")).check(
        out.detach().double().numpy(), g.double().numpy(), "float32", label_dtype)
    assert plain_calls == ([True] if hasattr(_softmax, "_plain_call") else [])


INT_TARGETS = ["bool", "uint8", "int8", "int16", "int32", "int64"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("target_dtype", INT_TARGETS)
def test_sigmoid_plain_path_target_dtypes_and_layouts(target_dtype, layout, plain_calls):
    rng = np.random.default_rng(H.seed_of(f"plain-sigmoid-{layout}"))
    shape = (3, 5, 4, 6) if layout == "channels_last" else (12, 5)
    x = rng.normal(scale=3.0, size=shape)
    t = (rng.uniform(size=shape) < 0.3).astype(np.float64)
    tt = torch.as_tensor(t)
    tt = tt > 0.5 if target_dtype == "bool" else tt.to(_tdtype(target_dtype))
    for reduction in H.REDUCTIONS:
        xt = _laid_out(x, layout, torch.float32)
        out = focal_torch.sigmoid_focal_loss(xt, tt, gamma=2.0, alpha=0.25, reduction=reduction)
        (g,) = torch.autograd.grad(out.sum(), xt)
        inp = H.Inputs(x, t, dict(gamma=2.0, alpha=0.25, reduction=reduction), "float32")
        H.expected("sigmoid", inp).check(out.detach().double().numpy(), g.double().numpy(), "float32",
                                         f"{target_dtype} {layout} {reduction}")
    assert plain_calls == ([True] * 3 if hasattr(_sigmoid, "_plain_call") else [])


WIDE_UNSIGNED = ["uint16", "uint32", "uint64"]


@pytest.mark.parametrize("label_dtype", WIDE_UNSIGNED)
def test_softmax_plain_path_wide_unsigned_labels(label_dtype):
    x = np.random.default_rng(3).normal(size=(6, 4))
    y = np.array([0, 1, 2, 3, 1, 2])
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    out = focal_torch.softmax_focal_loss(xt, torch.as_tensor(y.astype(label_dtype)), gamma=2.0)
    (g,) = torch.autograd.grad(out, xt)
    H.expected("softmax", H.Inputs(x, y, dict(gamma=2.0), "float32")).check(
        out.detach().double().numpy(), g.double().numpy(), "float32", label_dtype)


@pytest.mark.parametrize("target_dtype", WIDE_UNSIGNED)
def test_sigmoid_wide_unsigned_targets(target_dtype):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 4))
    t = (rng.uniform(size=(6, 4)) < 0.3).astype(np.float64)
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    out = focal_torch.sigmoid_focal_loss(xt, torch.as_tensor(t.astype(target_dtype)), gamma=2.0, alpha=0.25)
    (g,) = torch.autograd.grad(out, xt)
    H.expected("sigmoid", H.Inputs(x, t, dict(gamma=2.0, alpha=0.25), "float32")).check(
        out.detach().double().numpy(), g.double().numpy(), "float32", target_dtype)


def test_label_out_of_range_message_names_the_class_count():
    """The plain path's label check (one read per call) gives the spec's message for each dtype."""
    for dtype in INT_LABELS:
        y = torch.tensor([0, 4, 1], dtype=_tdtype(dtype))
        with pytest.raises(ValueError, match=_msg(focal_spec.label_out_of_range(4, 3, -100))):
            focal_torch.softmax_focal_loss(torch.randn(3, 3), y)
