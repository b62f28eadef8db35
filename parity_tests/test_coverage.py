"""Value checks for what the option grids do not reach: other class axes (torch ``dim``, JAX ``axis``),
the Modules' stored options, every whole γ up to 8 with every reduction, half-precision logits with
float64 targets, and the compute dtype of half precision. Each backend against the float64 reference,
under the precision contract of ``_harness``."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from parity_tests import _harness as H

BACKENDS = ("jax", "torch")


# ----------------------------------------------------------------------------------------
# The class axis: torch dim=-1 / dim=0, JAX axis=1 (NCHW) / axis=0.
# ----------------------------------------------------------------------------------------

AXIS_CASES = [
    dict(labels="index", weight=None, ignore=None, where=None, label_smoothing=0.0, reduction="none"),
    dict(labels="index", weight="per_class", ignore=255, where="mask", label_smoothing=0.0, reduction="mean"),
    dict(labels="index", weight="per_class", ignore=-100, where=None, label_smoothing=0.1, reduction="mean"),
    dict(labels="probs", weight=None, ignore=None, where="mask", label_smoothing=0.1, reduction="sum"),
    dict(labels="probs", weight="per_class", ignore=None, where=None, label_smoothing=0.0, reduction="none"),
]


def _axis_inputs(case: dict, dtype: str) -> H.Inputs:
    full = dict(gamma=2.0, dtype=dtype, shape=(2, 3, 4, 5), **case)
    return H.softmax_inputs(full)


def _moved(a: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A torch-layout array (class axis 1) with its class axis at ``axis``; position arrays unchanged."""
    return np.moveaxis(a, 1, axis) if a.ndim == ndim else a


def _run_softmax_on_axis(backend: str, inp: H.Inputs, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The softmax loss with the class axis at ``axis`` (torch ``dim``, JAX ``axis``), results in the
    torch layout."""
    nd = inp.logits.ndim
    x = _moved(inp.logits, axis, nd)
    y = _moved(inp.labels, axis, nd)
    kw = dict(inp.kwargs)
    real = "float64" if inp.dtype == "float64" else "float32"
    if backend == "torch":
        import torch

        import focal_torch

        for k in ("weight", "where"):
            if kw.get(k) is not None:
                kw[k] = torch.as_tensor(kw[k], dtype=torch.bool if k == "where" else getattr(torch, real))
        xt = torch.tensor(x, dtype=getattr(torch, inp.dtype), requires_grad=True)
        yt = torch.as_tensor(y, dtype=torch.int64 if y.dtype.kind == "i" else getattr(torch, real))
        out = focal_torch.softmax_focal_loss(xt, yt, dim=axis, **kw)
        out.sum().backward()
        v, g = out.detach().double().numpy(), xt.grad.double().numpy()
    else:
        import jax
        import jax.numpy as jnp

        import focal_jax

        with jax.enable_x64(inp.dtype == "float64"):
            for k in ("weight", "where"):
                if kw.get(k) is not None:
                    kw[k] = jnp.asarray(kw[k], bool if k == "where" else real)
            yj = jnp.asarray(y, jnp.int32 if y.dtype.kind == "i" else real)
            fn = lambda z: focal_jax.softmax_focal_loss(z, yj, axis=axis, **kw)  # noqa: E731
            out, vjp = jax.vjp(fn, jnp.asarray(x, inp.dtype))
            (g,) = vjp(jnp.ones_like(out))
            v, g = np.asarray(out, np.float64), np.asarray(g, np.float64)
    return v, np.moveaxis(g, axis, 1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", AXIS_CASES, ids=H.case_id)
@pytest.mark.parametrize("backend,axis", [("torch", -1), ("torch", 0), ("torch", 2), ("jax", 1), ("jax", 0)],
                         ids=["torch-dim=-1", "torch-dim=0", "torch-dim=2", "jax-axis=1", "jax-axis=0"])
def test_softmax_class_axis(backend, axis, case, dtype):
    inp = _axis_inputs(case, dtype)
    v, g = _run_softmax_on_axis(backend, inp, axis)
    H.expected("softmax", inp).check(v, g, dtype, f"{backend} axis={axis}")


# ----------------------------------------------------------------------------------------
# The torch Modules use the options they store (dim, where, weight, alpha...).
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_module_uses_its_stored_dim_and_where(dtype):
    import torch

    import focal_torch

    case = dict(labels="index", weight="per_class", ignore=255, where="mask", label_smoothing=0.1,
                reduction="mean", gamma=3.0, dtype=dtype, shape=(2, 3, 4, 5))
    inp = H.softmax_inputs(case)
    real = getattr(torch, dtype)
    kw = inp.kwargs
    module = focal_torch.SoftmaxFocalLoss(gamma=3.0, weight=torch.as_tensor(kw["weight"], dtype=real),
                                          ignore_index=255, label_smoothing=0.1, dim=-1,
                                          where=torch.as_tensor(kw["where"]), reduction="mean")
    x = torch.tensor(np.moveaxis(inp.logits, 1, -1), dtype=real, requires_grad=True)
    out = module(x, torch.as_tensor(inp.labels))
    out.backward()
    H.expected("softmax", inp).check(out.detach().double().numpy(), np.moveaxis(x.grad.double().numpy(), -1, 1),
                                     dtype, "SoftmaxFocalLoss(dim=-1, where=...)")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sigmoid_module_uses_its_stored_options(dtype):
    import torch

    import focal_torch

    case = dict(gamma=4.0, reduction="mean", alpha="per_class", dtype=dtype, shape=(2, 3, 4, 5),
                weight="per_class", label_smoothing=0.1, targets="soft", where="mask")
    inp = H.sigmoid_inputs(case)
    real = getattr(torch, dtype)
    kw = H._layout_kwargs(inp, "torch", 4)
    module = focal_torch.SigmoidFocalLoss(gamma=4.0, alpha=torch.as_tensor(kw["alpha"], dtype=real),
                                          weight=torch.as_tensor(kw["weight"], dtype=real), label_smoothing=0.1,
                                          where=torch.as_tensor(kw["where"]), reduction="mean")
    x = torch.tensor(inp.logits, dtype=real, requires_grad=True)
    out = module(x, torch.as_tensor(inp.labels, dtype=real))
    out.backward()
    H.expected("sigmoid", inp).check(out.detach().double().numpy(), x.grad.double().numpy(), dtype,
                                     "SigmoidFocalLoss(where=..., alpha=..., weight=...)")


# ----------------------------------------------------------------------------------------
# Whole γ (multiplication-only paths) with every reduction; one input larger than torch's pieces.
# ----------------------------------------------------------------------------------------

WHOLE_GAMMAS = (3.0, 4.0, 6.0, 7.0, 8.0)
WHOLE_CASES = [
    ("sigmoid", dict(alpha=0.25, shape=(4, 3), weight=None, label_smoothing=0.0, targets="hard", where=None)),
    ("sigmoid", dict(alpha="per_class", shape=(2, 3, 4, 5), weight="per_class", label_smoothing=0.1,
                     targets="soft", where="mask")),
    ("softmax", dict(labels="index", shape=(6, 4), weight="per_class", label_smoothing=0.0, ignore=-100,
                     where=None)),
    ("softmax", dict(labels="index", shape=(2, 3, 4, 5), weight=None, label_smoothing=0.1, ignore=None,
                     where="mask")),
    ("softmax", dict(labels="probs", shape=(2, 3, 4, 5), weight="per_class", label_smoothing=0.0, ignore=None,
                     where=None)),
]


# every γ with every reduction and every case; dtypes paired with both (all-pairs)
WHOLE_GRID = H.covering_array({"gamma": WHOLE_GAMMAS, "case": tuple(range(len(WHOLE_CASES))),
                               "reduction": H.REDUCTIONS, "dtype": ("float32", "float64")},
                              full=("gamma", "case"))
WHOLE_PARAMS = [pytest.param(WHOLE_CASES[c["case"]][0], dict(WHOLE_CASES[c["case"]][1], gamma=c["gamma"],
                                                              reduction=c["reduction"], dtype=c["dtype"]),
                             id=f"{WHOLE_CASES[c['case']][0]}-{c['case']}-gamma={c['gamma']}-{c['reduction']}-"
                                f"{c['dtype']}") for c in WHOLE_GRID]


@pytest.mark.parametrize("loss,case", WHOLE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_gamma(backend, loss, case):
    inp = (H.sigmoid_inputs if loss == "sigmoid" else H.softmax_inputs)(case)
    v, g = H.RUNNERS[backend](loss, inp)
    H.expected(loss, inp).check(v, g, case["dtype"], backend)


def test_whole_gamma_grid_pairs_every_gamma_with_every_reduction():
    pairs = {(c["gamma"], c["reduction"]) for c in WHOLE_GRID}
    assert pairs == {(g, r) for g in WHOLE_GAMMAS for r in H.REDUCTIONS}


@functools.cache
def _large(loss: str, gamma: float, reduction: str) -> tuple[H.Inputs, H.Expected]:
    if loss == "sigmoid":
        case = dict(gamma=gamma, reduction=reduction, alpha=0.25, dtype="float32", shape=(1 << 20,),
                    weight=None, label_smoothing=0.0, targets="hard", where=None)
        inp = H.sigmoid_inputs(case)
    else:
        case = dict(gamma=gamma, reduction=reduction, labels="index", dtype="float32", shape=(1 << 18, 4),
                    weight=None, label_smoothing=0.0, ignore=None, where=None)
        inp = H.softmax_inputs(case)
    return inp, H.expected(loss, inp)


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("gamma", (3.0, 6.0), ids=lambda g: f"gamma={g}")
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_gamma_large_input(backend, loss, gamma, reduction):
    """2^20 logits: torch runs its chunked eager kernels over many pieces here."""
    inp, exp = _large(loss, gamma, reduction)
    v, g = H.RUNNERS[backend](loss, inp)
    exp.check(v, g, "float32", backend)


# ----------------------------------------------------------------------------------------
# Half precision: float64 targets, and the compute dtype.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_logits_with_float64_targets(backend, loss, dtype):
    """Targets handed over in float64 are used at the compute dtype (float32), not at the logits' dtype."""
    if loss == "sigmoid":
        case = dict(gamma=2.0, reduction="none", alpha=0.25, dtype=dtype, shape=(4, 3), weight="per_class",
                    label_smoothing=0.1, targets="soft", where=None)
        inp = H.sigmoid_inputs(case)
    else:
        case = dict(gamma=2.0, reduction="none", labels="probs", dtype=dtype, shape=(2, 3, 4, 5), weight=None,
                    label_smoothing=0.1, ignore=None, where="mask")
        inp = H.softmax_inputs(case)
    inp = H.Inputs(inp.logits, inp.labels, inp.kwargs, dtype, inp.per_class, label_dtype="float64")
    v, g = H.RUNNERS[backend](loss, inp)
    H.expected(loss, inp).check(v, g, dtype, backend)


def _compute_dtype_inputs(loss: str, dtype: str) -> H.Inputs:
    """Logits near 0 and γ = 5: each element's loss is a normal number of the half dtype, and the modulator
    (1-p)^5 multiplies the relative rounding error of 1-p by 5. Computed in float32 and rounded once to the
    half dtype, the error is at most half an ulp of that dtype; with every intermediate rounded to it
    (1-p, the logarithms, the products), it reaches several ulps on some of these elements."""
    x = np.linspace(-1.5, 1.5, 241)
    if loss == "sigmoid":
        t = np.tile([0.0, 1.0], 121)[:241]
        return H.Inputs(x, t, {"gamma": 5.0, "reduction": "none"}, dtype)
    logits = np.stack([x, -0.5 * x, np.zeros_like(x)], axis=1)
    return H.Inputs(logits, np.arange(241) % 3, {"gamma": 5.0, "reduction": "none"}, dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_is_computed_in_float32(backend, loss, dtype):
    inp = _compute_dtype_inputs(loss, dtype)
    v, g = H.RUNNERS[backend](loss, inp)
    H.expected(loss, inp).check(v, g, dtype, backend)


# ----------------------------------------------------------------------------------------
# torch: logits that are not contiguous (channels_last, a transposed view).
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_torch_non_contiguous_logits(loss, layout, reduction):
    import torch

    import focal_torch

    if loss == "sigmoid":
        case = dict(gamma=3.0, reduction=reduction, alpha="per_class", dtype="float32", shape=(2, 3, 4, 5),
                    weight="per_class", label_smoothing=0.1, targets="soft", where="mask")
        inp = H.sigmoid_inputs(case)
        kw = H._layout_kwargs(inp, "torch", 4)
    else:
        case = dict(gamma=3.0, reduction=reduction, labels="index", dtype="float32", shape=(2, 3, 4, 5),
                    weight="per_class", label_smoothing=0.0, ignore=255, where="mask")
        inp = H.softmax_inputs(case)
        kw = dict(inp.kwargs)
    kw = {k: torch.as_tensor(v, dtype=torch.bool if k == "where" else torch.float32) if isinstance(v, np.ndarray)
          else v for k, v in kw.items()}
    if layout == "channels_last":
        x = torch.tensor(inp.logits, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    else:  # the same values, held as the transpose of a (.., W, H) tensor
        x = torch.tensor(np.swapaxes(inp.logits, -1, -2).copy(), dtype=torch.float32).transpose(-1, -2)
    assert not x.is_contiguous() and np.array_equal(x.numpy(), inp.logits.astype(np.float32), equal_nan=True)
    x.requires_grad_()
    y = torch.as_tensor(inp.labels, dtype=torch.int64 if inp.labels.dtype.kind == "i" else torch.float32)
    fn = focal_torch.sigmoid_focal_loss if loss == "sigmoid" else focal_torch.softmax_focal_loss
    out = fn(x, y, **kw)
    out.sum().backward()
    H.expected(loss, inp).check(out.detach().double().numpy(), x.grad.double().numpy(), "float32", layout)
