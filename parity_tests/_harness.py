"""Shared inputs, the precision contract, covering grids, and adapters that run one case on each backend.

Inputs are generated once with NumPy, in the torch layout (class axis 1), from a seed
derived from the case id. The JAX adapter moves the class axis last (channels-last, as
``focal_jax`` expects) and moves results back, so every comparison happens in one layout.
Each adapter returns ``(value, grad)`` as float64 NumPy arrays: the loss after reduction
and the gradient of ``sum(value)`` with respect to the logits.

The precision contract
----------------------
Every value and every gradient element ``a`` of a backend is compared with the float64
reference ``e`` (``focal_spec.reference``), evaluated on the inputs exactly as the backend
holds them (logits rounded to their dtype; targets, probabilities, ``alpha`` and ``weight``
rounded to the compute dtype):

    |a - e| <= rtol[dtype] * K * S + REF_RTOL * S_ref + floor[dtype]

- ``S`` is the magnitude of the terms of a cancellation-free formula for the quantity, computed
  in float64. For a product or a sum of same-signed terms (every loss value; the sigmoid
  gradient for 0/1 targets, (1-t')σ(x) - t'σ(-x) with one term 0; the softmax gradient for
  class indices) ``S`` is ``|e|`` itself: the bound is purely relative, and a loss of 3e-7
  never compares equal to 0. Where the true value is a genuine difference (a soft-target
  sigmoid gradient crossing zero; the softmax gradient A_k(1-p_k) - p_k Σ_{c≠k} A_c for
  probabilities or smoothed labels), a relative bound is meaningless and ``S`` is the sum of
  the terms' magnitudes. With label smoothing the backend rounds t' = t(1-ε) + ε/2 to its
  compute dtype, so ``S`` also holds t'·|∂e/∂t'|, that rounding's effect.
- ``K`` is the condition number of the modulator (1-p)^γ in its base: 1 + γ, plus γ|log(1-p)|
  where γ is not a whole number up to 8 (the spec evaluates those as exp(γ log(1-p))).
- ``S_ref`` bounds the reference's own float64 rounding of the softmax gradient, which it forms
  as A_k (1-p_k) - p_k Σ_{c≠k} A_c: the magnitudes of those two terms, so that at a confident
  label the bound stays relative to A_k (1-p_k), not to A_k. ``REF_RTOL`` is a few hundred
  float64 ulps.
- ``floor`` is the dtype's underflow scale (its smallest normal number): below it a dtype has
  only subnormals, without relative precision.
- Half precision is computed in float32 and rounded once: ``rtol[half] * |e|`` for that
  rounding plus the float32 bound ``rtol[float32] * K * S``.
- A reduction is held to the same bound relative to the float64 reduction, with ``S`` summed
  over the elements (and divided by the mean's denominator).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import pathlib
import subprocess
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# One tolerance table, keyed by dtype name. rtol: float32 17 ulps (eps 1.19e-7); float64 1e-12, which also
# covers exp(γ log q) at any representable modulator; float16 and bfloat16 2 ulps of their own rounding.
# floor: the dtype's smallest normal number.
TOLERANCES: dict[str, dict[str, float]] = {
    "float64": {"rtol": 1e-12, "floor": float(np.finfo(np.float64).tiny)},
    "float32": {"rtol": 2e-6, "floor": float(np.finfo(np.float32).tiny)},
    "float16": {"rtol": 1e-3, "floor": float(np.finfo(np.float16).tiny)},
    "bfloat16": {"rtol": 8e-3, "floor": float(np.finfo(np.float32).tiny)},
}
HALF = ("float16", "bfloat16")
REF_RTOL = 1e-13
"""The reference's own rounding, relative to ``S_ref`` (float64, a few hundred ulps)."""

SLOW = os.environ.get("FOCAL_SLOW", "") not in ("", "0")
"""FOCAL_SLOW=1 runs the full Cartesian grids instead of the covering grids, and the slow tests."""

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
REDUCTIONS = ("none", "mean", "sum")


def compute_dtype(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


def assert_close(actual: Any, expected: Any, dtype: str, what: str = "", *, scale: Any = None,
                 scale_ref: Any = None, scale_compute: Any = None) -> None:
    """``|actual - expected| <= rtol * scale + REF_RTOL * scale_ref + rtol_c * scale_compute + floor``
    elementwise (see the module docstring), with ``rtol_c`` the rtol of the compute dtype (float32 for half
    precision). ``scale`` defaults to ``|expected|``: a purely relative comparison."""
    tol = TOLERANCES[dtype]
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    s = np.abs(e) if scale is None else np.broadcast_to(np.asarray(scale, np.float64), e.shape)
    bound = tol["rtol"] * s + tol["floor"]
    if scale_ref is not None:
        bound = bound + REF_RTOL * np.asarray(scale_ref, np.float64)
    if scale_compute is not None:
        bound = bound + TOLERANCES[compute_dtype(dtype)]["rtol"] * np.asarray(scale_compute, np.float64)
    with np.errstate(invalid="ignore"):
        err = np.abs(a - e)
        bad = ~(err <= bound) & ~(np.isnan(a) & np.isnan(e)) & ~((a == e) & np.isinf(e))
    if bad.any():
        idx = np.flatnonzero(bad.ravel())
        k = idx[np.argmax(np.nan_to_num(err.ravel()[idx] / bound.ravel()[idx], nan=np.inf))]
        raise AssertionError(
            f"{what}: {idx.size} of {e.size} elements outside rtol={tol['rtol']:g} x scale + floor={tol['floor']:g} "
            f"({dtype}). Worst at flat index {k}: actual={a.ravel()[k]!r}, expected={e.ravel()[k]!r}, "
            f"|error|={err.ravel()[k]:.3g}, scale={s.ravel()[k]:.3g}, bound={bound.ravel()[k]:.3g}")


def torch_value_and_grad(fn: Any, x: Any) -> tuple[Any, Any]:
    """``fn(x)`` (detached) and the gradient of its sum with respect to a fresh leaf copy of the tensor ``x``."""
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out.sum().backward()
    return out.detach(), x.grad


def seed_of(text: str) -> int:
    return zlib.crc32(text.encode())


# ----------------------------------------------------------------------------------------
# Covering grids.
# ----------------------------------------------------------------------------------------

Pair = tuple[tuple[str, int], tuple[str, int]]


def _pair(a: tuple[str, int], b: tuple[str, int], order: Sequence[str]) -> Pair:
    return (a, b) if order.index(a[0]) < order.index(b[0]) else (b, a)


def _index_of(values: tuple, v: Any) -> int:
    return next(i for i, u in enumerate(values) if repr(u) == repr(v))


def _forbidden_pairs(axes: Mapping[str, tuple], forbidden: Sequence[Mapping[str, Any]]) -> set[Pair]:
    names = list(axes)
    out = set()
    for f in forbidden:
        (a, va), (b, vb) = f.items()
        out.add(_pair((a, _index_of(axes[a], va)), (b, _index_of(axes[b], vb)), names))
    return out


def required_pairs(axes: Mapping[str, tuple], forbidden: Sequence[Mapping[str, Any]] = ()) -> set[Pair]:
    """Every pair of values of every two axes, but the forbidden ones."""
    names = list(axes)
    bad = _forbidden_pairs(axes, forbidden)
    return {((a, i), (b, j)) for a, b in itertools.combinations(names, 2)
            for i in range(len(axes[a])) for j in range(len(axes[b]))} - bad


def covered_pairs(axes: Mapping[str, tuple], cases: Sequence[Mapping[str, Any]]) -> set[Pair]:
    names = list(axes)
    out = set()
    for c in cases:
        idx = [(n, _index_of(axes[n], c[n])) for n in names]
        out.update(itertools.combinations(idx, 2))
    return out


def covering_array(axes: Mapping[str, tuple], full: tuple[str, ...] = (),
                   forbidden: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """Cases that hold the full product of the ``full`` axes and every allowed pair of values of any two
    axes (all-pairs), built greedily and deterministically; the full product of every axis with
    FOCAL_SLOW=1. ``forbidden`` lists pairs ``{axis: value, axis: value}`` that no case may hold."""
    names = list(axes)
    bad = _forbidden_pairs(axes, forbidden)

    def allowed(case: dict[str, int]) -> bool:
        items = list(case.items())
        return not any(_pair(p, q, names) in bad for p, q in itertools.combinations(items, 2))

    if SLOW:
        rows = [dict(zip(names, combo, strict=True))
                for combo in itertools.product(*(range(len(axes[n])) for n in names))]
        return [{n: axes[n][r[n]] for n in names} for r in rows if allowed(r)]
    todo = required_pairs(axes, forbidden)
    used = {n: [0] * len(axes[n]) for n in names}

    def fill(row: dict[str, int], order: list[str]) -> dict[str, int]:
        for n in order:
            best, best_key = None, None
            for i in range(len(axes[n])):
                trial = dict(row, **{n: i})
                if not allowed(trial):
                    continue
                gain = sum(_pair((n, i), (k, j), names) in todo for k, j in row.items())
                key = (gain, -used[n][i], -i)
                if best_key is None or key > best_key:
                    best, best_key = i, key
            assert best is not None, f"no allowed value for {n} in {row}"
            row[n] = best
        return row

    def commit(row: dict[str, int]) -> None:
        for n, i in row.items():
            used[n][i] += 1
        todo.difference_update(_pair(p, q, names) for p, q in itertools.combinations(row.items(), 2))

    rest = [n for n in names if n not in full]
    rows = []
    for combo in itertools.product(*(range(len(axes[n])) for n in full)):
        row = fill(dict(zip(full, combo, strict=True)), rest)
        commit(row)
        rows.append(row)
    while todo:  # pairs the product's rows could not hold: one more row each, filled greedily
        (a, i), (b, j) = min(todo)
        row = fill({a: i, b: j}, [n for n in names if n not in (a, b)])
        commit(row)
        rows.append(row)
    return [{n: axes[n][r[n]] for n in names} for r in rows]


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
SIGMOID_FULL = ("gamma", "reduction", "alpha", "dtype")
SIGMOID_CASES = covering_array(SIGMOID_AXES, SIGMOID_FULL)

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
SOFTMAX_FULL = ("gamma", "reduction", "labels", "dtype")
SOFTMAX_FORBIDDEN = ({"labels": "probs", "ignore": -100}, {"labels": "probs", "ignore": 255})
SOFTMAX_CASES = covering_array(SOFTMAX_AXES, SOFTMAX_FULL, SOFTMAX_FORBIDDEN)

ORIGINAL_AXES = {
    "module": ("segmentation", "classification-index", "classification-onehot"),
    "logits": (True, False),
    "gamma": GAMMAS,
    "weights": (None, "per_class"),
    "dtype": ("float64", "float32"),
    "teacher": ("hard", "soft"),
}
ORIGINAL_FULL = ("module", "logits", "gamma", "weights")
# soft teachers exist only for the logits=True segmentation module
ORIGINAL_FORBIDDEN = ({"teacher": "soft", "logits": False}, {"module": "classification-index", "teacher": "soft"},
                      {"module": "classification-onehot", "teacher": "soft"})
ORIGINAL_CASES = covering_array(ORIGINAL_AXES, ORIGINAL_FULL, ORIGINAL_FORBIDDEN)

GRIDS: dict[str, tuple[dict[str, tuple], tuple[str, ...], tuple, list[dict[str, Any]]]] = {
    "sigmoid": (SIGMOID_AXES, SIGMOID_FULL, (), SIGMOID_CASES),
    "softmax": (SOFTMAX_AXES, SOFTMAX_FULL, SOFTMAX_FORBIDDEN, SOFTMAX_CASES),
    "original": (ORIGINAL_AXES, ORIGINAL_FULL, ORIGINAL_FORBIDDEN, ORIGINAL_CASES),
}


@dataclasses.dataclass(frozen=True)
class Inputs:
    """NumPy inputs in the torch layout, and the keyword arguments of the call."""

    logits: np.ndarray
    labels: np.ndarray
    kwargs: dict[str, Any]
    dtype: str
    per_class: tuple[str, ...] = ()  # kwargs whose value is a per-class vector (laid out per backend)
    label_dtype: str | None = None  # floating targets/probabilities: the dtype handed to the backends


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
# The reference, on the inputs as the backends hold them, and the condition scales.
# ----------------------------------------------------------------------------------------


def round_to(a: Any, dtype: str) -> Any:
    """``a`` rounded to ``dtype`` and back to float64 (integers, booleans and None unchanged)."""
    if a is None or isinstance(a, (bool, np.bool_)):
        return a
    arr = np.asarray(a)
    if not np.issubdtype(arr.dtype, np.floating) and not isinstance(a, float):
        return a
    if dtype == "bfloat16":
        import ml_dtypes

        np_dtype: Any = ml_dtypes.bfloat16
    else:
        np_dtype = np.dtype(dtype)
    out = arr.astype(np.float64).astype(np_dtype).astype(np.float64)
    return float(out) if isinstance(a, float) else out


def as_held(inp: Inputs) -> Inputs:
    """The inputs as a backend holds them, in float64: logits rounded to their dtype, floating labels to
    ``label_dtype`` (when given) and to the compute dtype, ``alpha``/``weight`` to the compute dtype."""
    cdt = compute_dtype(inp.dtype)
    kw = dict(inp.kwargs)
    for k in ("alpha", "weight"):
        if k in kw:
            kw[k] = round_to(kw[k], cdt)
    labels = inp.labels
    if np.issubdtype(np.asarray(labels).dtype, np.floating):  # as handed over, then as computed with
        labels = round_to(round_to(labels, inp.label_dtype or cdt), cdt)
    return Inputs(round_to(inp.logits, inp.dtype), labels, kw, inp.dtype, inp.per_class, inp.label_dtype)


def run_reference(loss: str, inp: Inputs) -> tuple[np.ndarray, np.ndarray]:
    """The float64 reference on ``inp`` as given (see :func:`as_held` for the backends' view)."""
    from focal_spec import reference

    kw = _layout_kwargs(inp, "torch", inp.logits.ndim)
    if loss == "sigmoid":
        return reference.sigmoid_focal_loss(inp.logits, inp.labels, **kw)
    return reference.softmax_focal_loss(inp.logits, inp.labels, axis=1, **kw)


def _reduce_scale(sv: np.ndarray, sg: np.ndarray, reduction: str, denom: float) -> tuple[np.ndarray, np.ndarray]:
    if reduction == "none":
        return sv, sg
    if reduction == "sum":
        return np.asarray(sv.sum()), sg
    k = 1.0 / denom if denom else 0.0
    return np.asarray(sv.sum() * k), sg * k


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def modulator_condition(gamma: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """The factor by which the modulator m = (1-p)^γ multiplies relative rounding errors: 1 + γ (the
    condition number of q^γ in q), plus γ|log q| where γ is not a whole number up to 8, which the spec
    computes as exp(γ log q) (the condition number of exp at γ log q)."""
    gamma = np.asarray(gamma, np.float64)
    whole = (gamma == np.round(gamma)) & (gamma <= 8)
    with np.errstate(invalid="ignore"):
        return 1.0 + gamma + np.where(whole, 0.0, gamma * np.nan_to_num(np.abs(log_q), posinf=0.0))


def sigmoid_scales(inp: Inputs) -> tuple[np.ndarray, np.ndarray]:
    """Condition scales ``S`` of the value and of the gradient (see the module docstring), for ``inp`` as
    held (pass :func:`as_held`'s result)."""
    kw = _layout_kwargs(inp, "torch", inp.logits.ndim)
    x = np.asarray(inp.logits, np.float64)
    where = kw.get("where")
    mask = np.ones(x.shape, bool) if where is None else np.broadcast_to(np.asarray(where, bool), x.shape)
    x = np.where(mask, x, 0.0)
    t = np.where(mask, np.broadcast_to(np.asarray(inp.labels, np.float64), x.shape), 0.0)
    eps = float(kw.get("label_smoothing", 0.0))
    gamma = np.broadcast_to(np.asarray(kw.get("gamma", 2.0), np.float64), x.shape)
    tp = t * (1.0 - eps) + eps / 2.0
    lp, ln = _log_sigmoid(x), _log_sigmoid(-x)
    s, sn = np.exp(lp), np.exp(ln)
    ce = -(tp * lp + (1.0 - tp) * ln)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_q = np.logaddexp(np.log(tp) + ln, np.log1p(-tp) + lp)
        m = np.where(gamma == 0, 1.0, np.exp(gamma * log_q))
        r = np.exp(lp + ln - log_q)
    alpha = kw.get("alpha")
    at = 1.0 if alpha is None else np.abs(np.asarray(alpha, np.float64) * tp + (1.0 - np.asarray(alpha)) * (1.0 - tp))
    w = np.abs(np.asarray(kw.get("weight", 1.0), np.float64))
    a = np.where(mask, at * w, 0.0)
    k = modulator_condition(gamma, log_q)
    sv = a * m * ce * k
    sg = a * (gamma * m * np.abs(1.0 - 2.0 * tp) * r * ce + m * ((1.0 - tp) * s + tp * sn)) * k
    if eps:  # t' is rounded to the compute dtype inside the backend: add t' |d/dt'| of the value and gradient
        h = 1e-7
        pre = {k: v for k, v in kw.items() if k not in ("label_smoothing", "reduction")}
        from focal_spec import reference

        up = reference.sigmoid_focal_loss(x, tp * (1 + h), **pre, label_smoothing=0.0, reduction="none")
        dn = reference.sigmoid_focal_loss(x, tp * (1 - h), **pre, label_smoothing=0.0, reduction="none")
        sv = sv + np.abs(up[0] - dn[0]) / (2 * h)
        sg = sg + np.abs(up[1] - dn[1]) / (2 * h)
    return _reduce_scale(sv, sg, kw.get("reduction", "mean"), float(mask.sum()))


def softmax_setup(inp: Inputs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """The pieces every softmax condition scale starts from, for ``inp`` as held (class axis 1): the logits
    (classes last, 0 at positions not counted), the counted positions, |w| per class, the (smoothed) label
    distribution q, and the mean's denominator."""
    kw = dict(inp.kwargs)
    x = np.moveaxis(np.asarray(inp.logits, np.float64), 1, -1)
    c = x.shape[-1]
    positions = x.shape[:-1]
    where = kw.get("where")
    valid = np.ones(positions, bool) if where is None else np.broadcast_to(np.asarray(where, bool), positions).copy()
    eps = float(kw.get("label_smoothing", 0.0))
    w = np.abs(np.asarray(kw["weight"], np.float64)) if kw.get("weight") is not None else np.ones(c)
    labels = np.asarray(inp.labels)
    if np.issubdtype(labels.dtype, np.integer):
        valid &= labels != kw.get("ignore_index", -100)
        ys = np.where(valid, labels, 0)
        q = (1.0 - eps) * np.eye(c)[ys] + eps / c
        denom = float(np.where(valid, w[ys], 0.0).sum())
    else:
        q = np.moveaxis(labels.astype(np.float64), 1, -1) * (1.0 - eps) + eps / c
        denom = float(valid.sum())
    return np.where(valid[..., None], x, 0.0), valid, w, q, denom


def softmax_scales(inp: Inputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Condition scales ``S`` of the value and of the gradient, and ``S_ref`` of the reference's gradient
    formula, for ``inp`` as held (class axis 1)."""
    kw = dict(inp.kwargs)
    x, valid, w, q, denom = softmax_setup(inp)
    c = x.shape[-1]
    positions = x.shape[:-1]
    q = np.where(valid[..., None], np.abs(q), 0.0)
    lse = np.logaddexp.reduce(x, axis=-1, keepdims=True)
    others = np.stack([np.logaddexp.reduce(np.delete(x, k, axis=-1), axis=-1) if c > 1
                       else np.full(positions, -np.inf) for k in range(c)], axis=-1)
    log1mp = others - lse
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.where(log1mp < -np.log(2.0), np.log1p(-np.exp(log1mp)), x - lse)
        p, omp = np.exp(logp), np.exp(log1mp)
        gamma = np.broadcast_to(np.asarray(kw.get("gamma", 2.0), np.float64), x.shape)
        m = np.where(gamma == 0, 1.0, np.exp(gamma * log1mp))
        rho = np.where(omp > 0, logp / omp, -1.0)
    k = modulator_condition(gamma, log1mp)
    kappa = m * (gamma * p * np.abs(rho) + 1.0) * k  # |κ| bounded by its terms' magnitudes
    aa = w * q * kappa * valid[..., None]
    total = aa.sum(-1, keepdims=True)
    sv = (w * q * m * np.abs(logp) * k * valid[..., None]).sum(-1)
    # p_k = exp(x_k - M - log S): x_k - M is rounded in the compute dtype, a relative error of |log p_k| units
    # of roundoff in p_k that no float32 implementation avoids (F.cross_entropy included); in float32 that is
    # rtol * |log p_k| / 34, hence the factor.
    sg = aa * omp + p * (total - aa) * (1.0 + np.abs(logp) / 32.0)
    sg_ref = aa * omp + p * (total - aa)
    sv, sg = _reduce_scale(sv, sg, kw.get("reduction", "mean"), denom)
    k = 1.0 if kw.get("reduction", "mean") != "mean" else (1.0 / denom if denom else 0.0)
    return sv, np.moveaxis(sg, -1, 1), np.moveaxis(sg_ref * k, -1, 1)


def original_scales(inp: Inputs, ctor: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Condition scales of an original module's value and gradient (and ``S_ref`` for ``logits=False``),
    for ``inp`` as held (class axis 1)."""
    x = np.asarray(inp.logits, np.float64)
    teacher = np.asarray(inp.labels)
    c = x.shape[1]
    w = np.ones(c) if ctor.get("weights") is None else np.asarray(ctor["weights"], np.float64)
    gamma = float(ctor.get("gamma", 2.0))
    if not ctor.get("logits", True):
        y = teacher.astype(np.int64) if teacher.ndim < x.ndim else np.argmax(teacher, axis=1)
        held = Inputs(x, y, {"gamma": gamma, "weight": w, "reduction": "sum"}, inp.dtype)
        sv, sg, sg_ref = softmax_scales(held)
        return sv / y.size, sg / y.size, sg_ref / y.size
    if teacher.ndim < x.ndim:
        teacher = np.moveaxis(np.eye(c)[teacher.astype(np.int64)], -1, 1)
    t = teacher.astype(np.float64)
    lp, ln = _log_sigmoid(x), _log_sigmoid(-x)
    ce = -(t * lp + (1.0 - t) * ln)
    q = -np.expm1(-ce)
    m = q ** gamma
    with np.errstate(divide="ignore", invalid="ignore"):
        dm = np.where(q > 0, gamma * q ** (gamma - 1.0) * np.exp(-ce), 0.0) if gamma else 0.0
    wc = w.reshape((1, c) + (1,) * (x.ndim - 2))
    sv = wc * m * ce
    sg = wc * (dm * ce + m) * ((1.0 - t) * np.exp(lp) + t * np.exp(ln))
    return np.asarray(sv.sum() / x.size), sg / x.size, None


@dataclasses.dataclass(frozen=True)
class Expected:
    """The reference's value and gradient on the held inputs, with their condition scales."""

    value: np.ndarray
    grad: np.ndarray
    value_scale: np.ndarray
    grad_scale: np.ndarray
    grad_scale_ref: np.ndarray | None = None

    def check(self, value: Any, grad: Any, dtype: str, what: str = "", factor: float = 1.0) -> None:
        """Asserts the contract for a backend's ``(value, grad)``. ``factor`` 2 bounds the difference of two
        backends that each meet it."""
        assert np.shape(value) == self.value.shape, f"{what} value shape {np.shape(value)} != {self.value.shape}"
        assert np.shape(grad) == self.grad.shape, f"{what} gradient shape {np.shape(grad)} != {self.grad.shape}"
        ref = None if self.grad_scale_ref is None else factor * self.grad_scale_ref
        if dtype in HALF:  # computed in float32 (its contract), then rounded once to the half dtype
            assert_close(value, self.value, dtype, f"{what} value", scale=factor * np.abs(self.value),
                         scale_compute=factor * self.value_scale)
            assert_close(grad, self.grad, dtype, f"{what} gradient", scale=factor * np.abs(self.grad),
                         scale_ref=ref, scale_compute=factor * self.grad_scale)
            return
        assert_close(value, self.value, dtype, f"{what} value", scale=factor * self.value_scale)
        assert_close(grad, self.grad, dtype, f"{what} gradient", scale=factor * self.grad_scale, scale_ref=ref)


def expected(loss: str, inp: Inputs) -> Expected:
    """The float64 reference and the condition scales for ``inp`` as the backends hold it."""
    held = as_held(inp)
    v, g = run_reference(loss, held)
    if loss == "sigmoid":
        sv, sg = sigmoid_scales(held)
        return Expected(v, g, sv, sg)
    sv, sg, sg_ref = softmax_scales(held)
    return Expected(v, g, sv, sg, sg_ref)


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


def _jax_dtype(name: str):
    import jax.numpy as jnp

    return {"float64": jnp.float64, "float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}[name]


def _label_dtype_jax(inp: Inputs):
    import jax.numpy as jnp

    if np.issubdtype(inp.labels.dtype, np.integer):
        return jnp.int32
    return _jax_dtype(inp.label_dtype or compute_dtype(inp.dtype))


def run_jax(loss: str, inp: Inputs, transform: str = "eager") -> tuple[np.ndarray, np.ndarray]:
    import jax
    import jax.numpy as jnp

    import focal_jax

    nd = inp.logits.ndim
    x64 = "float64" in (inp.dtype, inp.label_dtype)
    with jax.enable_x64(x64):
        kw = _layout_kwargs(inp, "jax", nd)
        if loss == "sigmoid" and kw.get("where") is not None:
            kw["where"] = _to_jax_layout(np.asarray(kw["where"]), nd)
        real = jnp.float64 if inp.dtype == "float64" else jnp.float32
        for k in ("alpha", "weight"):
            if isinstance(kw.get(k), np.ndarray):
                kw[k] = jnp.asarray(kw[k], real)
        x = jnp.asarray(_to_jax_layout(inp.logits, nd), _jax_dtype(inp.dtype))
        y = jnp.asarray(_to_jax_layout(inp.labels, nd), _label_dtype_jax(inp))
        fn = focal_jax.sigmoid_focal_loss if loss == "sigmoid" else focal_jax.softmax_focal_loss

        def total(xx):
            out = fn(xx, y, **kw)
            return jnp.sum(out.astype(real)), out

        vg = jax.value_and_grad(total, has_aux=True)
        if transform == "jit":
            vg = jax.jit(vg)
        (_, out), g = vg(x)
        out64 = np.asarray(out.astype(real)).astype(np.float64)
        g64 = np.asarray(g.astype(real)).astype(np.float64)
        return _from_jax_layout(out64, nd), _from_jax_layout(g64, nd)


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
        y = torch.as_tensor(inp.labels, dtype=_torch_dtype(inp.label_dtype) if inp.label_dtype else real)
    fn = focal_torch.sigmoid_focal_loss if loss == "sigmoid" else focal_torch.softmax_focal_loss
    out = fn(x, y, **kw)
    out.to(real).sum().backward()
    return out.detach().to(torch.float64).numpy(), x.grad.to(torch.float64).numpy()


RUNNERS: dict[str, Callable[[str, Inputs], tuple[np.ndarray, np.ndarray]]] = {"jax": run_jax, "torch": run_torch}


def grid_inputs(loss: str, cid: str) -> Inputs:
    case = next(c for c in GRIDS[loss][3] if case_id(c) == cid)
    return (sigmoid_inputs if loss == "sigmoid" else softmax_inputs)(case)


@functools.cache
def cached(backend: str, loss: str, cid: str) -> Any:
    """Runs a grid case once per backend (``"expected"``: the reference and its scales), shared by the
    tests that compare it."""
    inp = grid_inputs(loss, cid)
    if backend == "expected":
        return expected(loss, inp)
    if backend == "reference":
        return run_reference(loss, as_held(inp))
    return RUNNERS[backend](loss, inp)


def run_original(backend: str, inp: Inputs, ctor: dict[str, Any], module: str,
                 jax_axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """An original module on one backend. ``jax_axis=-1`` feeds JAX channels-last inputs."""
    if backend == "reference":
        from focal_spec import reference

        held = as_held(inp)
        return reference.original_focal_loss(held.logits, held.labels, **ctor)
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


def run_on_host_devices(script: str, path: pathlib.Path, devices: int = 8) -> dict[str, Any]:
    """Runs the Python ``script`` (written to ``path``) in a subprocess whose JAX sees ``devices`` CPU devices, and
    returns the JSON object its last line of output prints (which must report ``"devices"``)."""
    path.write_text(script)
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == devices
    return out
