"""Shared inputs, the tolerance table, and adapters that run one case on each backend.

Inputs are generated once with NumPy, in the torch layout (class axis 1), from a seed
derived from the case id. The JAX adapter moves the class axis last (channels-last, as
``focal_jax`` expects) and moves results back, so every comparison happens in one layout.
Each adapter returns ``(value, grad)`` as float64 NumPy arrays: the loss after reduction
and the gradient of ``sum(value)`` with respect to the logits.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import zlib
from typing import Any

import numpy as np

# One tolerance table, keyed by dtype name.
TOLERANCES: dict[str, dict[str, float]] = {
    "float64": {"rtol": 1e-10, "atol": 1e-12},
    "float32": {"rtol": 1e-5, "atol": 1e-6},
    "float16": {"rtol": 2e-3, "atol": 2e-4},
    "bfloat16": {"rtol": 1e-2, "atol": 1e-3},
}

SLOW = os.environ.get("FOCAL_SLOW", "") not in ("", "0")
"""FOCAL_SLOW=1 runs the full Cartesian grids instead of the covering grids."""

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
REDUCTIONS = ("none", "mean", "sum")


def assert_close(actual: Any, expected: Any, dtype: str, what: str = "", scale_atol: float = 1.0) -> None:
    tol = TOLERANCES[dtype]
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=tol["rtol"], atol=tol["atol"] * scale_atol, err_msg=what, equal_nan=False)


def seed_of(text: str) -> int:
    return zlib.crc32(text.encode())


def _grid(axes: dict[str, tuple], full: tuple[str, ...]) -> list[dict[str, Any]]:
    """The full product over the ``full`` axes; every other axis is cycled through so that each of
    its values appears, spread over the product (all axes in full product when FOCAL_SLOW=1)."""
    names = list(axes)
    if SLOW:
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes.values())]
    base = [dict(zip(full, combo, strict=True)) for combo in itertools.product(*(axes[n] for n in full))]
    rest = [n for n in names if n not in full]
    out = []
    for i, case in enumerate(base):
        for k, n in enumerate(rest):
            vals = axes[n]
            # a different stride per axis, so the cycled axes do not move in lockstep
            case[n] = vals[(i * (k + 1) + i // len(vals)) % len(vals)]
        out.append(case)
    return out


def case_id(case: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


# ----------------------------------------------------------------------------------------
# Cases.
# ----------------------------------------------------------------------------------------

SIGMOID_AXES = {
    "gamma": GAMMAS,
    "reduction": REDUCTIONS,
    "alpha": (None, 0.25, "per_class"),
    "dtype": ("float64", "float32"),
    "shape": ((7,), (4, 3), (2, 3, 4, 5)),
    "weight": (None, "per_class"),
    "label_smoothing": (0.0, 0.1),
    "targets": ("hard", "soft"),
    "where": (None, "mask"),
}
SIGMOID_CASES = _grid(SIGMOID_AXES, ("gamma", "reduction", "alpha", "dtype"))

SOFTMAX_AXES = {
    "gamma": GAMMAS,
    "reduction": REDUCTIONS,
    "labels": ("index", "probs"),
    "dtype": ("float64", "float32"),
    "shape": ((6, 4), (2, 3, 4, 5)),
    "weight": (None, "per_class"),
    "label_smoothing": (0.0, 0.1),
    "ignore": (None, -100, 255),
    "where": (None, "mask"),
}
SOFTMAX_CASES = _grid(SOFTMAX_AXES, ("gamma", "reduction", "labels", "dtype"))

ORIGINAL_AXES = {
    "module": ("segmentation", "classification-index", "classification-onehot"),
    "logits": (True, False),
    "gamma": GAMMAS,
    "weights": (None, "per_class"),
    "dtype": ("float64", "float32"),
    "teacher": ("hard", "soft"),
}
ORIGINAL_CASES = [
    c for c in _grid(ORIGINAL_AXES, ("module", "logits", "gamma", "weights"))
    if not (c["teacher"] == "soft" and (not c["logits"] or c["module"] != "segmentation"))
]


@dataclasses.dataclass(frozen=True)
class Inputs:
    """NumPy inputs in the torch layout, and the keyword arguments of the call."""

    logits: np.ndarray
    labels: np.ndarray
    kwargs: dict[str, Any]
    dtype: str
    per_class: tuple[str, ...] = ()  # kwargs whose value is a per-class vector (laid out per backend)


def _per_class_shape(ndim: int, c: int, layout: str) -> tuple[int, ...]:
    if ndim <= 2 or layout == "jax":
        return (c,)
    return (c,) + (1,) * (ndim - 2)


def sigmoid_inputs(case: dict[str, Any]) -> Inputs:
    rng = np.random.default_rng(seed_of("sigmoid" + case_id(case)))
    shape = case["shape"]
    x = rng.normal(scale=3.0, size=shape)
    if case["targets"] == "hard":
        t = (rng.uniform(size=shape) < 0.3).astype(np.float64)
    else:
        t = rng.uniform(size=shape)
    kw: dict[str, Any] = {"gamma": case["gamma"], "reduction": case["reduction"],
                          "label_smoothing": case["label_smoothing"]}
    per_class = []
    c = shape[1] if len(shape) > 1 else shape[0]
    if case["alpha"] == "per_class":
        kw["alpha"] = rng.uniform(0.1, 0.9, size=c)
        per_class.append("alpha")
    else:
        kw["alpha"] = case["alpha"]
    if case["weight"] == "per_class":
        kw["weight"] = rng.uniform(0.5, 2.0, size=c)
        per_class.append("weight")
    if case["where"] == "mask":
        mask = rng.uniform(size=shape) < 0.8
        x = np.where(mask, x, np.nan)  # garbage at excluded positions must not matter
        kw["where"] = mask
    return Inputs(x, t, kw, case["dtype"], tuple(per_class))


def softmax_inputs(case: dict[str, Any]) -> Inputs:
    rng = np.random.default_rng(seed_of("softmax" + case_id(case)))
    shape = case["shape"]
    c = shape[1]
    positions = shape[:1] + shape[2:]
    x = rng.normal(scale=3.0, size=shape)
    kw: dict[str, Any] = {"gamma": case["gamma"], "reduction": case["reduction"],
                          "label_smoothing": case["label_smoothing"]}
    if case["labels"] == "index":
        y = rng.integers(0, c, size=positions)
        if case["ignore"] is not None:
            drop = rng.uniform(size=positions) < 0.25
            y = np.where(drop, case["ignore"], y)
            kw["ignore_index"] = case["ignore"]
            x = np.where(np.expand_dims(drop, 1), np.inf, x)  # garbage at ignored positions
    else:
        y = np.moveaxis(rng.dirichlet(np.ones(c), size=positions), -1, 1)
    if case["weight"] == "per_class":
        kw["weight"] = rng.uniform(0.5, 2.0, size=c)  # (C,) in both layouts
    if case["where"] == "mask":
        mask = rng.uniform(size=positions) < 0.8
        x = np.where(np.expand_dims(mask, 1), x, np.nan)
        kw["where"] = mask
    return Inputs(x, y, kw, case["dtype"])


def original_inputs(case: dict[str, Any]) -> tuple[Inputs, dict[str, Any]]:
    """Inputs for an original module, and its constructor arguments."""
    rng = np.random.default_rng(seed_of("original" + case_id(case)))
    c = 3
    shape = (2, c, 4, 5) if case["module"] == "segmentation" else (6, c)
    x = rng.normal(scale=2.0, size=shape)
    y = rng.integers(0, c, size=shape[:1] + shape[2:])
    if case["module"] == "classification-index":
        teacher = y
    else:
        teacher = np.moveaxis(np.eye(c)[y], -1, 1)
        if case["teacher"] == "soft":
            teacher = 0.8 * teacher + 0.2 * rng.uniform(size=shape)
    ctor: dict[str, Any] = {"gamma": case["gamma"], "logits": case["logits"]}
    if case["weights"] == "per_class":
        ctor["weights"] = [0.5, 1.0, 2.0]
    if case["module"] != "segmentation":
        ctor["n_classes"] = c
    return Inputs(x, teacher, {}, case["dtype"]), ctor


# ----------------------------------------------------------------------------------------
# Backend adapters.
# ----------------------------------------------------------------------------------------


def _to_jax_layout(a: np.ndarray, ndim: int) -> np.ndarray:
    return np.moveaxis(a, 1, -1) if a.ndim == ndim and ndim >= 3 else a


def _from_jax_layout(a: np.ndarray, ndim: int) -> np.ndarray:
    return np.moveaxis(a, -1, 1) if a.ndim == ndim and ndim >= 3 else a


def _layout_kwargs(inp: Inputs, layout: str, ndim: int) -> dict[str, Any]:
    """Per-class vectors shaped to broadcast in ``layout``. Softmax position masks need no change:
    dropping the class axis leaves the same positions shape in both layouts."""
    kw = dict(inp.kwargs)
    for k in inp.per_class:
        kw[k] = np.asarray(kw[k]).reshape(_per_class_shape(ndim, np.size(kw[k]), layout))
    return kw


def run_reference(loss: str, inp: Inputs) -> tuple[np.ndarray, np.ndarray]:
    from focal_spec import reference

    kw = _layout_kwargs(inp, "torch", inp.logits.ndim)
    if loss == "sigmoid":
        return reference.sigmoid_focal_loss(inp.logits, inp.labels, **kw)
    return reference.softmax_focal_loss(inp.logits, inp.labels, axis=1, **kw)


def _jax_dtype(name: str):
    import jax.numpy as jnp

    return {"float64": jnp.float64, "float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}[name]


def _label_dtype_jax(labels: np.ndarray, dtype: str):
    import jax.numpy as jnp

    if np.issubdtype(labels.dtype, np.integer):
        return jnp.int32
    return jnp.float64 if dtype == "float64" else jnp.float32


def run_jax(loss: str, inp: Inputs, transform: str = "eager") -> tuple[np.ndarray, np.ndarray]:
    import jax
    import jax.numpy as jnp

    import focal_jax

    nd = inp.logits.ndim
    with jax.enable_x64(inp.dtype == "float64"):
        kw = _layout_kwargs(inp, "jax", nd)
        if loss == "sigmoid" and kw.get("where") is not None:
            kw["where"] = _to_jax_layout(np.asarray(kw["where"]), nd)
        real = jnp.float64 if inp.dtype == "float64" else jnp.float32
        for k in ("alpha", "weight"):
            if isinstance(kw.get(k), np.ndarray):
                kw[k] = jnp.asarray(kw[k], real)
        x = jnp.asarray(_to_jax_layout(inp.logits, nd), _jax_dtype(inp.dtype))
        y = jnp.asarray(_to_jax_layout(inp.labels, nd), _label_dtype_jax(inp.labels, inp.dtype))
        fn = focal_jax.sigmoid_focal_loss if loss == "sigmoid" else focal_jax.softmax_focal_loss

        def total(xx):
            out = fn(xx, y, **kw)
            return jnp.sum(out.astype(real)), out

        vg = jax.value_and_grad(total, has_aux=True)
        if transform == "jit":
            vg = jax.jit(vg)
        (_, out), g = vg(x)
        return _from_jax_layout(np.asarray(out.astype(real)), nd), _from_jax_layout(np.asarray(g.astype(real)), nd)


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def run_torch(loss: str, inp: Inputs) -> tuple[np.ndarray, np.ndarray]:
    import torch

    import focal_torch

    real = torch.float64 if inp.dtype == "float64" else torch.float32
    kw = _layout_kwargs(inp, "torch", inp.logits.ndim)
    for k in ("alpha", "weight", "where"):
        if isinstance(kw.get(k), np.ndarray):
            kw[k] = torch.as_tensor(kw[k], dtype=torch.bool if k == "where" else real)
    x = torch.tensor(inp.logits, dtype=_torch_dtype(inp.dtype), requires_grad=True)
    if np.issubdtype(inp.labels.dtype, np.integer):
        y = torch.as_tensor(inp.labels, dtype=torch.int64)
    else:
        y = torch.as_tensor(inp.labels, dtype=real)
    fn = focal_torch.sigmoid_focal_loss if loss == "sigmoid" else focal_torch.softmax_focal_loss
    out = fn(x, y, **kw)
    out.to(real).sum().backward()
    return out.detach().to(real).numpy(), x.grad.to(real).numpy()


@functools.cache
def cached(backend: str, loss: str, cid: str) -> tuple[np.ndarray, np.ndarray]:
    """Runs a grid case once per backend, shared by the tests that compare it."""
    cases = {"sigmoid": SIGMOID_CASES, "softmax": SOFTMAX_CASES}[loss]
    case = next(c for c in cases if case_id(c) == cid)
    inp = (sigmoid_inputs if loss == "sigmoid" else softmax_inputs)(case)
    return {"reference": run_reference, "jax": run_jax, "torch": run_torch}[backend](loss, inp)


def run_original(backend: str, inp: Inputs, ctor: dict[str, Any], module: str,
                 jax_axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """An original module on one backend. ``jax_axis=-1`` feeds JAX channels-last inputs."""
    if backend == "reference":
        from focal_spec import reference

        return reference.original_focal_loss(inp.logits, inp.labels, **ctor)
    cls_name = "SegmentationFocalLoss" if module == "segmentation" else "ClassificationFocalLoss"
    if backend == "torch":
        import torch

        import focal_torch

        real = torch.float64 if inp.dtype == "float64" else torch.float32
        loss = getattr(focal_torch, cls_name)(**ctor)
        x = torch.tensor(inp.logits, dtype=real, requires_grad=True)
        y = torch.as_tensor(inp.labels, dtype=torch.int64 if inp.labels.dtype.kind == "i" else real)
        out = loss(x, y)
        out.backward()
        return out.detach().numpy().astype(np.float64), x.grad.numpy().astype(np.float64)
    import jax
    import jax.numpy as jnp

    import focal_jax

    with jax.enable_x64(inp.dtype == "float64"):
        real = jnp.float64 if inp.dtype == "float64" else jnp.float32
        nd = inp.logits.ndim
        move = jax_axis == -1 and nd >= 3
        loss = getattr(focal_jax, cls_name)(**ctor, axis=jax_axis)
        x = jnp.asarray(np.moveaxis(inp.logits, 1, -1) if move else inp.logits, real)
        lab = np.moveaxis(inp.labels, 1, -1) if move and inp.labels.ndim == nd else inp.labels
        y = jnp.asarray(lab, jnp.int32 if lab.dtype.kind == "i" else real)
        v, g = jax.value_and_grad(lambda xx: loss(xx, y))(x)
        g = np.asarray(g, np.float64)
        return np.asarray(v, np.float64), np.moveaxis(g, -1, 1) if move else g
