"""The focal loss's own variants in PyTorch: ``poly1``, ``normalized``, ``reduced_threshold`` and a
:class:`focal_spec.GammaSchedule` ``gamma`` (FLSD-53) of ``sigmoid_focal_loss``, and ``poly1`` of
``softmax_focal_loss``, with their Modules.

Values and gradients are held to the precision contract of :mod:`parity_tests._harness` against the float64
references of :mod:`focal_spec.reference`, evaluated on the inputs as torch holds them. The condition scale
``S`` of each quantity is the sum of its terms' magnitudes, each times the condition of its power (the
harness' ``modulator_condition``: 1 + γ, plus γ|log u| for an exponent computed as exp(γ log u)); the
normalized loss adds the rounding of its normalizer Σm. For hard targets it is a relative bound.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import focal_spec
import focal_torch
from focal_spec import reference, variants
from focal_torch import _sigmoid
from parity_tests import _harness as H

SATURATED = np.array([80.0, -80.0, 30.0, -30.0, 17.3, -17.3, 9.0, -9.0])

# ----------------------------------------------------------------------------------------
# Sigmoid: the grid.
# ----------------------------------------------------------------------------------------

SIGMOID_OPTIONS: dict[str, dict[str, Any]] = {
    "poly1": {"gamma": 2.0, "alpha": 0.25, "poly1": 1.0},
    "poly1-frac": {"gamma": 0.5, "poly1": -0.7},
    "poly1-pos_weight": {"gamma": 3.0, "poly1": 2.0, "pos_weight": "per_class"},
    "normalized": {"gamma": 2.0, "normalized": True},
    "normalized-frac": {"gamma": 1.5, "alpha": "per_class", "normalized": True},
    "reduced": {"gamma": 2.0, "reduced_threshold": 0.5},
    "reduced-frac": {"gamma": 1.5, "reduced_threshold": 0.3},
    "flsd53": {"gamma": variants.FLSD_53},
    "all": {"gamma": variants.FLSD_53, "alpha": 0.25, "poly1": 0.3, "normalized": True, "reduced_threshold": 0.5},
}
SIGMOID_AXES = {
    "option": tuple(SIGMOID_OPTIONS),
    "reduction": H.REDUCTIONS,
    "dtype": ("float64", "float32"),
    "targets": ("hard", "soft"),
    "weight": (None, "per_class"),
    "where": (None, "mask"),
    "label_smoothing": (0.0, 0.1),
}
SIGMOID_CASES = {H.case_id(c): c for c in H.covering_array(SIGMOID_AXES, ("option", "reduction", "dtype"))}


def _sigmoid_inputs(cid: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any], str]:
    """Logits (normal, scale 4, with saturated values up to |x| = 80), targets and keywords, as torch holds
    them (logits in their dtype; targets, alpha, weights in the compute dtype)."""
    case = SIGMOID_CASES[cid]
    rng = np.random.default_rng(H.seed_of("options-sigmoid" + cid))
    shape, dtype = (6, 5), case["dtype"]
    cdt = H.compute_dtype(dtype)
    x = rng.normal(scale=4.0, size=shape)
    x.reshape(-1)[rng.choice(x.size, SATURATED.size, replace=False)] = SATURATED
    t = (rng.uniform(size=shape) < 0.3).astype(np.float64) if case["targets"] == "hard" else rng.uniform(size=shape)
    kw: dict[str, Any] = {"reduction": case["reduction"], "label_smoothing": case["label_smoothing"]}
    for k, v in SIGMOID_OPTIONS[case["option"]].items():
        kw[k] = rng.uniform(0.2, 3.0 if k == "pos_weight" else 0.9, size=shape[1]) if v == "per_class" else v
    if case["weight"] == "per_class":
        kw["weight"] = rng.uniform(0.5, 2.0, size=shape[1])
    if case["where"] == "mask":
        kw["where"] = rng.uniform(size=shape) < 0.8
        x = np.where(kw["where"], x, np.nan)  # garbage at excluded positions must not matter
        t = np.where(kw["where"], t, 255.0)
    kw = {k: H.round_to(v, cdt) if k in ("alpha", "weight", "pos_weight") and not np.isscalar(v) else v
          for k, v in kw.items()}
    return H.round_to(x, dtype), H.round_to(t, cdt), kw, dtype


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _sigmoid_scales(x: np.ndarray, t: np.ndarray, kw: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Condition scales of the value and of the gradient (see the module docstring), reduced as the loss."""
    where = kw.get("where")
    mask = np.ones(x.shape, bool) if where is None else np.asarray(where, bool)
    x, t = np.where(mask, x, 0.0), np.where(mask, t, 0.0)
    eps = kw.get("label_smoothing", 0.0)
    tp = t * (1.0 - eps) + eps / 2.0
    lp, ln = _log_sigmoid(x), _log_sigmoid(-x)
    s, sn = np.exp(lp), np.exp(ln)
    pw = np.broadcast_to(np.asarray(kw.get("pos_weight", 1.0), np.float64), x.shape)
    ce = -(pw * tp * lp + (1.0 - tp) * ln)
    dce = (1.0 - tp) * s + pw * tp * sn
    with np.errstate(divide="ignore"):
        log_q = np.logaddexp(np.log(tp) + ln, np.log1p(-tp) + lp)
    q = np.exp(log_q)  # 1 - p_t
    gamma = kw.get("gamma", 2.0)
    g = gamma.gamma_of_q(q) if isinstance(gamma, variants.GammaSchedule) else np.broadcast_to(gamma, x.shape)
    r = np.exp(lp + ln - log_q)
    th = kw.get("reduced_threshold")
    if th is None:
        m, on, k = np.where(g == 0, 1.0, np.exp(g * log_q)), 1.0, H.modulator_condition(g, log_q)
    else:
        on = (q <= 1.0 - th).astype(np.float64)
        m = np.where(on > 0, np.exp(g * (log_q - math.log(th))), 1.0)
        k = H.modulator_condition(g, log_q) + g * abs(math.log(th))
    eps1 = abs(kw.get("poly1", 0.0))
    poly, k1 = np.exp((g + 1.0) * log_q), H.modulator_condition(g + 1.0, log_q)
    alpha = kw.get("alpha")
    at = 1.0 if alpha is None else np.asarray(alpha) * tp + (1.0 - np.asarray(alpha)) * (1.0 - tp)
    a = np.where(mask, at * np.asarray(kw.get("weight", 1.0)), 0.0)
    dm = on * g * m * np.abs(1.0 - 2.0 * tp) * r
    sv = a * (k * m * ce + eps1 * k1 * poly)
    sg = a * (k * (dm * ce + m * dce) + eps1 * k1 * (g + 1.0) * np.exp(g * log_q) * np.abs(1.0 - 2.0 * tp) * s * sn)
    if eps:  # t' is rounded to the compute dtype in the backend: t' |∂/∂t'| of the unnormalized value, gradient
        h = 1e-7
        pre = {k: v for k, v in kw.items() if k not in ("label_smoothing", "reduction", "normalized", "where")}
        up = reference.sigmoid_focal_loss(x, tp * (1 + h), **pre, reduction="none")
        dn = reference.sigmoid_focal_loss(x, tp * (1 - h), **pre, reduction="none")
        sv = sv + np.where(mask, np.abs(up[0] - dn[0]) / (2 * h), 0.0)
        sg = sg + np.where(mask, np.abs(up[1] - dn[1]) / (2 * h), 0.0)
    if kw.get("normalized"):  # ℓ/z and (g z - L dz)/z², z = Σm rounded by up to Σ m k
        z, zs = (m * mask).sum(), (m * k * mask).sum()
        loss = a * (m * ce + kw.get("poly1", 0.0) * poly)
        grad = a * (on * g * m * (1.0 - 2.0 * tp) * r * ce - m * ((1.0 - tp) * s - pw * tp * sn))
        total, tv, dz = loss.sum(), sv.sum(), np.where(mask, dm, 0.0)
        sv = sv / z + np.abs(loss) * zs / z**2
        sg = (sg / z + np.abs(grad) * zs / z**2 + (tv * dz + abs(total) * dz * k) / z**2
              + 2.0 * abs(total) * dz * zs / z**3)
    red = kw["reduction"]
    if red == "none":
        return sv, sg
    n = 1.0 / mask.sum() if red == "mean" else 1.0
    return np.asarray(sv.sum() * n), sg * n


@functools.cache
def _sigmoid_expected(cid: str) -> tuple[np.ndarray, ...]:
    x, t, kw, _ = _sigmoid_inputs(cid)
    value, grad = reference.sigmoid_focal_loss(x, t, **kw)
    return (value, grad, *_sigmoid_scales(x, t, kw))


def _torch_kwargs(kw: dict[str, Any], real: torch.dtype) -> dict[str, Any]:
    return {k: torch.as_tensor(v) if k == "where" else
            torch.as_tensor(v, dtype=real) if isinstance(v, np.ndarray) else v for k, v in kw.items()}


def _run_sigmoid(cid: str) -> tuple[np.ndarray, np.ndarray]:
    x, t, kw, dtype = _sigmoid_inputs(cid)
    real = torch.float64 if dtype == "float64" else torch.float32
    xt = torch.tensor(x, dtype=real, requires_grad=True)
    out = focal_torch.sigmoid_focal_loss(xt, torch.as_tensor(t, dtype=real), **_torch_kwargs(kw, real))
    assert out.dtype == real
    out.sum().backward()
    return out.detach().double().numpy(), xt.grad.double().numpy()


@pytest.mark.parametrize("cid", list(SIGMOID_CASES))
def test_sigmoid_options_match_the_float64_reference(cid):
    value, grad, sv, sg = _sigmoid_expected(cid)
    v, g = _run_sigmoid(cid)
    dtype = SIGMOID_CASES[cid]["dtype"]
    H.assert_close(v, value, dtype, "value", scale=sv)
    H.assert_close(g, grad, dtype, "gradient", scale=sg)


def test_sigmoid_grid_covers_every_pair_and_the_saturated_logits():
    assert H.required_pairs(SIGMOID_AXES) <= H.covered_pairs(SIGMOID_AXES, list(SIGMOID_CASES.values()))
    x = _sigmoid_inputs(next(iter(SIGMOID_CASES)))[0]
    assert np.nanmax(np.abs(x)) == 80.0


# ----------------------------------------------------------------------------------------
# Softmax: the grid.
# ----------------------------------------------------------------------------------------

SOFTMAX_AXES = {
    "poly1": (1.0, -0.7),
    "gamma": (2.0, 0.5, "per_class"),
    "reduction": H.REDUCTIONS,
    "dtype": ("float64", "float32"),
    "labels": ("index", "probs"),
    "weight": (None, "per_class"),
    "where": (None, "mask"),
    "label_smoothing": (0.0, 0.1),
}
SOFTMAX_CASES = {H.case_id(c): c for c in H.covering_array(SOFTMAX_AXES, ("gamma", "reduction", "dtype"))}


def _softmax_inputs(cid: str) -> H.Inputs:
    """(N, C, L) logits with saturated margins up to 80, labels (with ignored positions) or probabilities, as
    torch holds them."""
    case = SOFTMAX_CASES[cid]
    rng = np.random.default_rng(H.seed_of("options-softmax" + cid))
    n, c, length = 4, 5, 3
    dtype, cdt = case["dtype"], H.compute_dtype(case["dtype"])
    x = rng.normal(scale=3.0, size=(n, c, length))
    x[0, :, 0] = [80.0, -80.0, 0.0, 1.0, -1.0]
    x[1, :, 1] = [-30.0, 30.0, 29.0, 0.0, -17.3]
    kw: dict[str, Any] = {"reduction": case["reduction"], "label_smoothing": case["label_smoothing"],
                          "poly1": case["poly1"]}
    kw["gamma"] = rng.uniform(0.0, 3.0, size=c).round(1) if case["gamma"] == "per_class" else case["gamma"]
    if case["labels"] == "index":
        y = rng.integers(0, c, size=(n, length))
        y[0, 0], y[1, 1] = 0, 2
        y[2, 0] = -100
        x[2, :, 0] = np.inf  # garbage at an ignored position
    else:
        y = H.round_to(np.moveaxis(rng.dirichlet(np.ones(c), size=(n, length)), -1, 1), cdt)
    if case["weight"] == "per_class":
        kw["weight"] = H.round_to(rng.uniform(0.5, 2.0, size=c), cdt)
    if case["where"] == "mask":
        kw["where"] = rng.uniform(size=(n, length)) < 0.8
        x = np.where(kw["where"][:, None], x, np.nan)
    return H.Inputs(H.round_to(x, dtype), y, kw, dtype)


def _softmax_scales(inp: H.Inputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The harness' scales of the focal part, plus those of the Poly-1 term ε₁ Σ_c w_c q_c (1-p_c)^(γ_c+1)."""
    kw = inp.kwargs
    sv, sg, sg_ref = H.softmax_scales(H.Inputs(inp.logits, inp.labels, {k: v for k, v in kw.items() if k != "poly1"},
                                               inp.dtype))
    x = np.moveaxis(np.asarray(inp.logits, np.float64), 1, -1)
    c = x.shape[-1]
    valid = np.ones(x.shape[:-1], bool) if kw.get("where") is None else np.asarray(kw["where"]).copy()
    eps = kw["label_smoothing"]
    w = np.asarray(kw.get("weight", np.ones(c)), np.float64)
    labels = np.asarray(inp.labels)
    if np.issubdtype(labels.dtype, np.integer):
        valid &= labels != -100
        ys = np.where(valid, labels, 0)
        q = (1.0 - eps) * np.eye(c)[ys] + eps / c
        denom = float(np.where(valid, w[ys], 0.0).sum())
    else:
        q = np.moveaxis(labels, 1, -1) * (1.0 - eps) + eps / c
        denom = float(valid.sum())
    x = np.where(valid[..., None], x, 0.0)
    wq = np.where(valid[..., None], w * q, 0.0)
    lse = np.logaddexp.reduce(x, axis=-1, keepdims=True)
    log1mp = np.stack([np.logaddexp.reduce(np.delete(x, k, axis=-1), axis=-1) for k in range(c)], -1) - lse
    p = -np.expm1(log1mp)
    g = np.broadcast_to(np.asarray(kw["gamma"], np.float64), x.shape)
    k1 = H.modulator_condition(g + 1.0, log1mp)
    e1 = abs(kw["poly1"])
    pv = (wq * e1 * np.exp((g + 1.0) * log1mp) * k1).sum(-1)
    aa = wq * e1 * (g + 1.0) * np.exp(g * log1mp) * p * k1
    total = aa.sum(-1, keepdims=True)
    pg, pg_ref = aa * np.exp(log1mp) + p * (total - aa), aa + p * total
    red = kw["reduction"]
    f = 1.0 if red != "mean" else (1.0 / denom if denom else 0.0)
    pv = pv if red == "none" else np.asarray(pv.sum() * f)
    return sv + pv, sg + np.moveaxis(pg * f, -1, 1), sg_ref + np.moveaxis(pg_ref * f, -1, 1)


@functools.cache
def _softmax_expected(cid: str) -> tuple[np.ndarray, ...]:
    inp = _softmax_inputs(cid)
    value, grad = reference.softmax_focal_loss(inp.logits, inp.labels, axis=1, **inp.kwargs)
    return (value, grad, *_softmax_scales(inp))


def _run_softmax(cid: str) -> tuple[np.ndarray, np.ndarray]:
    inp = _softmax_inputs(cid)
    real = torch.float64 if inp.dtype == "float64" else torch.float32
    xt = torch.tensor(inp.logits, dtype=real, requires_grad=True)
    labels = torch.as_tensor(inp.labels) if inp.labels.dtype.kind == "i" else torch.as_tensor(inp.labels, dtype=real)
    out = focal_torch.softmax_focal_loss(xt, labels, **_torch_kwargs(inp.kwargs, real))
    assert out.dtype == real
    out.sum().backward()
    return out.detach().double().numpy(), xt.grad.double().numpy()


@pytest.mark.parametrize("cid", list(SOFTMAX_CASES))
def test_softmax_poly1_matches_the_float64_reference(cid):
    value, grad, sv, sg, sg_ref = _softmax_expected(cid)
    v, g = _run_softmax(cid)
    dtype = SOFTMAX_CASES[cid]["dtype"]
    H.assert_close(v, value, dtype, "value", scale=sv)
    H.assert_close(g, grad, dtype, "gradient", scale=sg, scale_ref=sg_ref)


def test_softmax_grid_covers_every_pair():
    assert H.required_pairs(SOFTMAX_AXES) <= H.covered_pairs(SOFTMAX_AXES, list(SOFTMAX_CASES.values()))


# ----------------------------------------------------------------------------------------
# Identities.
# ----------------------------------------------------------------------------------------

X = torch.tensor([[2.0, -1.0, 0.5, 80.0, -80.0], [-3.0, 1.5, 0.0, 17.3, -9.0]], dtype=torch.float64)
T_HARD = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
T_SOFT = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7], [0.95, 1.0, 0.25, 0.6, 0.05]], dtype=torch.float64)


def _value_and_grad(fn, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out.sum().backward()
    return out.detach().double().numpy(), x.grad.double().numpy()


def _variant_sigmoid(x, t, **kw):
    """The variant path at poly1=0: γ as a schedule of one value (no thresholds), which only that path reads."""
    kw = dict(kw, gamma=variants.GammaSchedule((), (kw.get("gamma", 2.0),)))
    return focal_torch.sigmoid_focal_loss(x, t, reduction="none", **kw)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_poly1_zero_is_the_focal_loss(gamma, dtype):
    real = getattr(torch, dtype)
    x, t = X.to(real), T_SOFT.to(real)
    kw = {"gamma": gamma, "alpha": 0.25, "label_smoothing": 0.05}
    ours = _value_and_grad(lambda z: _variant_sigmoid(z, t, **kw), x)
    plain = _value_and_grad(lambda z: focal_torch.sigmoid_focal_loss(z, t, reduction="none", **kw), x)
    expected = reference.sigmoid_focal_loss(x.double().numpy(), t.double().numpy(), reduction="none", **kw)
    xd = x.double().numpy()
    tp = t.double().numpy() * 0.95 + 0.025
    s, sn = 1 / (1 + np.exp(-xd)), 1 / (1 + np.exp(xd))
    terms = (1 - tp) * s + tp * sn  # soft targets: the gradient is a difference of terms of this size
    for a, b, e, what in zip(ours, plain, expected, ("value", "gradient"), strict=True):
        scale = np.abs(e) + np.abs(b) + (terms if what == "gradient" else 0.0)
        H.assert_close(a, b, dtype, f"poly1=0 {what} vs the focal loss", scale=2 * (1 + gamma * 10) * scale)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_softmax_poly1_adds_its_term_to_the_focal_loss(dtype):
    """The Poly-1 path minus the focal loss's own path is ε₁ times the reference's Poly-1 term."""
    real = getattr(torch, dtype)
    x = X.to(real)
    y = torch.tensor([3, 1])
    full = {"gamma": 1.5, "weight": torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=real), "ignore_index": -100,
            "label_smoothing": 0.1, "dim": 1, "reduction": "none"}
    ours = _value_and_grad(lambda z: focal_torch.softmax_focal_loss(z, y, poly1=0.5, **full), x)
    plain = _value_and_grad(lambda z: focal_torch.softmax_focal_loss(z, y, **full), x)
    kw = {"gamma": 1.5, "weight": full["weight"].double().numpy(), "label_smoothing": 0.1, "axis": 1,
          "reduction": "none"}
    with_term = reference.softmax_focal_loss(x.double().numpy(), y.numpy(), poly1=0.5, **kw)
    without = reference.softmax_focal_loss(x.double().numpy(), y.numpy(), **kw)
    for a, b, e1, e0, what in zip(ours, plain, with_term, without, ("value", "gradient"), strict=True):
        H.assert_close(a - b, e1 - e0, dtype, f"Poly-1 term's {what}", scale=10 * (np.abs(e1) + np.abs(e0)))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("targets", ["hard", "soft"])
def test_normalized_at_gamma_zero_is_the_mean_bce(targets, dtype):
    real = getattr(torch, dtype)
    x, t = X.to(real), (T_HARD if targets == "hard" else T_SOFT).to(real)
    ours = _value_and_grad(lambda z: focal_torch.sigmoid_focal_loss(z, t, gamma=0.0, normalized=True,
                                                                     reduction="sum"), x)
    bce = _value_and_grad(lambda z: F.binary_cross_entropy_with_logits(z, t), x)
    expected = reference.sigmoid_focal_loss(x.double().numpy(), t.double().numpy(), gamma=0.0, reduction="mean")
    H.assert_close(ours[0], expected[0], dtype, "value vs the float64 mean BCE")
    H.assert_close(ours[0], bce[0], dtype, "value vs F.binary_cross_entropy_with_logits", scale=4 * np.abs(bce[0]))
    scale = (np.abs(torch.sigmoid(x).double().numpy()) + t.double().numpy()) / x.numel()
    H.assert_close(ours[1], expected[1], dtype, "gradient vs the float64 mean BCE", scale=scale)
    H.assert_close(ours[1], bce[1], dtype, "gradient vs F.binary_cross_entropy_with_logits", scale=4 * scale)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("targets", ["hard", "soft"])
def test_flsd53_is_the_focal_loss_with_its_per_element_gamma(targets, dtype):
    real = getattr(torch, dtype)
    x, t = X.to(real), (T_HARD if targets == "hard" else T_SOFT).to(real)
    xd, td = x.double().numpy(), t.double().numpy()
    with np.errstate(divide="ignore"):
        log_q = np.logaddexp(np.log(td) + _log_sigmoid(-xd), np.log1p(-td) + _log_sigmoid(xd))
    gamma = variants.FLSD_53.gamma_of_q(np.exp(log_q))
    # a tensor γ is computed as exp(γ log q) even where it is whole: its rounding grows with γ |log q|
    cond = 2.0 + gamma * (1.0 + np.abs(log_q))
    assert set(gamma.ravel()) == {3.0, 5.0}
    ours = _value_and_grad(lambda z: focal_torch.sigmoid_focal_loss(z, t, gamma=focal_spec.FLSD_53,
                                                                     reduction="none"), x)
    plain = _value_and_grad(lambda z: focal_torch.sigmoid_focal_loss(z, t, gamma=torch.tensor(gamma, dtype=real),
                                                                      reduction="none"), x)
    expected = reference.sigmoid_focal_loss(xd, td, gamma=gamma, reduction="none")
    for a, b, e, what in zip(ours, plain, expected, ("value", "gradient"), strict=True):
        H.assert_close(b, e, dtype, f"tensor gamma {what} vs the reference", scale=cond * np.abs(e))
        H.assert_close(a, b, dtype, f"FLSD-53 {what} vs the tensor gamma", scale=cond * np.abs(e))


def test_the_spec_schedule_decides_on_one_minus_p_t():
    q = np.array([1.0, 0.9, 0.80001, 0.8, 0.5, 1e-30, 0.0])  # 1 - p_t
    np.testing.assert_array_equal(variants.FLSD_53.gamma_of_q(q), [5.0, 5.0, 5.0, 3.0, 3.0, 3.0, 3.0])
    off_the_step = q[[0, 1, 2, 4]]  # at q = 0.8 exactly, 1 - q rounds below 0.2
    np.testing.assert_array_equal(variants.FLSD_53.gamma_of_q(off_the_step),
                                  variants.FLSD_53.gamma_of(1.0 - off_the_step))


def test_reduced_threshold_one_is_the_cross_entropy():
    ours = focal_torch.sigmoid_focal_loss(X, T_HARD, gamma=3.0, reduced_threshold=1.0, reduction="none")
    ce = reference.sigmoid_focal_loss(X.numpy(), T_HARD.numpy(), gamma=0.0, reduction="none")[0]
    H.assert_close(ours.numpy(), ce, "float64", "value vs the float64 cross-entropy")
    bce = F.binary_cross_entropy_with_logits(X, T_HARD, reduction="none").numpy()
    H.assert_close(ours.numpy(), bce, "float64", "value vs F.binary_cross_entropy_with_logits", scale=8 * np.abs(ce))


def test_default_options_take_the_focal_path(monkeypatch):
    calls = []
    original = _sigmoid._Parts.variant_loss

    def spy(self, v):
        calls.append(v)
        return original(self, v)

    monkeypatch.setattr(_sigmoid._Parts, "variant_loss", spy)
    focal_torch.sigmoid_focal_loss(X, T_HARD, poly1=0.0, normalized=False, reduced_threshold=None)
    assert not calls
    focal_torch.sigmoid_focal_loss(X, T_HARD, poly1=0.5)
    assert calls and calls[0].poly1 == 0.5


# ----------------------------------------------------------------------------------------
# Errors: the spec's messages.
# ----------------------------------------------------------------------------------------


def _message(fn, *args) -> str:
    with pytest.raises((ValueError, TypeError)) as info:
        fn(*args)
    return str(info.value)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_reduced_threshold_outside_the_unit_interval_is_rejected(bad):
    msg = _message(variants.check_reduced_threshold, bad)
    assert "reduced_threshold" in msg
    with pytest.raises(ValueError, match=re.escape(msg)):
        focal_torch.sigmoid_focal_loss(X, T_HARD, reduced_threshold=bad)
    with pytest.raises(ValueError, match=re.escape(msg)):
        focal_torch.SigmoidFocalLoss(reduced_threshold=bad)


def test_bad_poly1_and_normalized_are_rejected():
    msg = _message(variants.check_poly1, math.inf)
    with pytest.raises(ValueError, match=re.escape(msg)):
        focal_torch.sigmoid_focal_loss(X, T_HARD, poly1=math.inf)
    with pytest.raises(ValueError, match=re.escape(msg)):
        focal_torch.softmax_focal_loss(X, torch.tensor([0, 1]), poly1=math.inf)
    with pytest.raises(ValueError, match=re.escape(msg)):
        focal_torch.SoftmaxFocalLoss(poly1=math.inf)
    msg = _message(variants.check_normalized, 1)
    with pytest.raises(TypeError, match=re.escape(msg)):
        focal_torch.sigmoid_focal_loss(X, T_HARD, normalized=1)
    with pytest.raises(TypeError, match=re.escape(msg)):
        focal_torch.SigmoidFocalLoss(normalized=1)


def test_the_other_options_are_still_validated_on_the_variant_path():
    with pytest.raises(ValueError, match=re.escape(focal_spec.targets_out_of_range(2.0))):
        focal_torch.sigmoid_focal_loss(X, T_HARD * 2.0, poly1=1.0)
    msg = _message(focal_spec.check_reduction, "avg")
    with pytest.raises(ValueError, match=re.escape(msg)):
        focal_torch.sigmoid_focal_loss(X, T_HARD, poly1=1.0, reduction="avg")
    with pytest.raises(ValueError, match=re.escape(focal_spec.label_out_of_range(7, 5, -100))):
        focal_torch.softmax_focal_loss(X, torch.tensor([7, 1]), poly1=1.0)


# ----------------------------------------------------------------------------------------
# Autograd, saturation and transforms.
# ----------------------------------------------------------------------------------------

ALL_SIGMOID = {"gamma": 1.5, "alpha": 0.25, "poly1": 0.7, "normalized": True, "reduced_threshold": 0.5,
               "label_smoothing": 0.05}


def test_gradcheck_float64():
    x = torch.tensor([[0.3, -1.2, 2.1], [1.7, -0.4, 0.9]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1.0, 0.0, 0.3], [0.0, 1.0, 0.8]], dtype=torch.float64)
    w = torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64, requires_grad=True)
    for kw in (ALL_SIGMOID, {"gamma": focal_spec.FLSD_53, "poly1": -0.5}, {"gamma": 0.5, "poly1": 1.0}):
        fn = functools.partial(focal_torch.sigmoid_focal_loss, target=t, reduction="sum", **kw)
        assert torch.autograd.gradcheck(lambda z, w, fn=fn: fn(z, weight=w), (x, w))
        assert torch.autograd.gradgradcheck(lambda z, w, fn=fn: fn(z, weight=w), (x, w))
    y = torch.tensor([2, 0])
    sm = functools.partial(focal_torch.softmax_focal_loss, target=y, gamma=1.5, poly1=0.8, label_smoothing=0.1)
    assert torch.autograd.gradcheck(lambda z, w: sm(z, weight=w), (x, w))
    assert torch.autograd.gradgradcheck(lambda z, w: sm(z, weight=w), (x, w))


SAT = [80.0, -80.0, 1e4, -1e4, 0.0]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("gamma", [0.5, 1.5, focal_spec.FLSD_53])
def test_sigmoid_value_gradient_and_hessian_are_finite_at_saturated_logits(gamma, dtype):
    real = getattr(torch, dtype)
    x = torch.tensor(SAT + SAT, dtype=real)
    t = torch.tensor([0.0] * 5 + [1.0] * 5, dtype=real)
    for kw in (dict(ALL_SIGMOID, gamma=gamma), {"gamma": gamma, "poly1": -1.0}):
        fn = functools.partial(focal_torch.sigmoid_focal_loss, target=t, reduction="sum", **kw)
        assert torch.isfinite(fn(x))
        assert torch.isfinite(torch.func.grad(fn)(x)).all()
        assert torch.isfinite(torch.func.hessian(fn)(x)).all()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("gamma", [0.5, 1.5, 2.0])
def test_softmax_value_gradient_and_hessian_are_finite_at_saturated_logits(gamma, dtype):
    real = getattr(torch, dtype)
    x = torch.tensor([[80.0, -80.0, 0.0], [1e4, 0.0, -1e4], [-1e4, 1e4, 1e4]], dtype=real)
    for y in (torch.tensor([0, 0, 1]), torch.tensor([1, 2, 0])):
        fn = functools.partial(focal_torch.softmax_focal_loss, target=y, gamma=gamma, poly1=1.0,
                               label_smoothing=0.1, reduction="sum")
        assert torch.isfinite(fn(x))
        assert torch.isfinite(torch.func.grad(fn)(x)).all()
        assert torch.isfinite(torch.func.hessian(fn)(x)).all()


def test_torch_func_grad_and_vmap():
    # no p_t at a threshold (0.2 and 0.5), where the reference's float64 rounding picks the branch
    x = torch.tensor([[0.3, -1.2, 2.1, 80.0], [1.7, -0.4, 0.9, -9.0], [0.4, 3.0, -2.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0, 0.3, 0.0], [0.0, 1.0, 0.8, 1.0], [1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    kw = dict(ALL_SIGMOID, gamma=focal_spec.FLSD_53, reduction="sum")
    fn = functools.partial(focal_torch.sigmoid_focal_loss, **kw)
    grads = torch.func.vmap(torch.func.grad(fn))(x, t)
    for i in range(3):
        expected = reference.sigmoid_focal_loss(x[i].numpy(), t[i].numpy(), **kw)[1]
        H.assert_close(grads[i].numpy(), expected, "float64", f"vmap(grad) row {i}", scale=np.abs(expected) + 1e-3)
        loop = fn(x[i], t[i])
        assert torch.func.vmap(fn)(x, t)[i].item() == pytest.approx(loop.item(), rel=1e-12)
    y = torch.tensor([[0, 3], [1, 2], [3, 3]])
    sm = functools.partial(focal_torch.softmax_focal_loss, gamma=0.5, poly1=1.0, dim=0, reduction="sum")
    xs = x.reshape(3, 4, 1).expand(3, 4, 2).contiguous()
    grads = torch.func.vmap(torch.func.grad(sm))(xs, y)
    for i in range(3):
        expected = reference.softmax_focal_loss(xs[i].numpy(), y[i].numpy(), gamma=0.5, poly1=1.0, axis=0,
                                                reduction="sum")[1]
        H.assert_close(grads[i].numpy(), expected, "float64", f"softmax vmap(grad) row {i}",
                       scale=np.abs(expected).max())


def test_forward_mode_matches_the_gradient():
    x = torch.tensor([0.3, -1.2, 2.1, 17.3], dtype=torch.float64)
    t = torch.tensor([1.0, 0.0, 0.3, 0.0], dtype=torch.float64)
    v = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    fn = functools.partial(focal_torch.sigmoid_focal_loss, target=t, reduction="sum", **ALL_SIGMOID)
    _, jvp = torch.func.jvp(fn, (x,), (v,))
    expected = reference.sigmoid_focal_loss(x.numpy(), t.numpy(), reduction="sum", **ALL_SIGMOID)[1]
    assert jvp.item() == pytest.approx(float(expected @ v.numpy()), rel=1e-12)


def test_where_masks_garbage_on_the_variant_paths():
    x = X.clone().requires_grad_()
    where = torch.tensor([[True, False, True, True, False], [True, True, False, True, True]])
    garbage = torch.where(where, x, torch.nan)
    out = focal_torch.sigmoid_focal_loss(garbage, torch.where(where, T_HARD, 255.0), where=where, **ALL_SIGMOID)
    out.backward()
    assert torch.isfinite(out) and (x.grad[~where] == 0).all() and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------


def test_sigmoid_module_passes_the_options_through():
    kw = {"gamma": focal_spec.FLSD_53, "alpha": 0.25, "poly1": 0.5, "normalized": True, "reduced_threshold": 0.4}
    module = focal_torch.SigmoidFocalLoss(reduction="sum", **kw)
    got = module(X, T_SOFT)
    expected = reference.sigmoid_focal_loss(X.numpy(), T_SOFT.numpy(), reduction="sum", **kw)[0]
    H.assert_close(got.detach().numpy(), expected, "float64", "module value")
    text = repr(module)
    assert "poly1=0.5" in text and "normalized=True" in text and "reduced_threshold=0.4" in text
    assert "FLSD" not in text and "GammaSchedule" in text
    assert "poly1" not in repr(focal_torch.SigmoidFocalLoss())


def test_softmax_module_passes_poly1_through():
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    module = focal_torch.SoftmaxFocalLoss(gamma=1.5, weight=w, poly1=-0.5)
    y = torch.tensor([3, 0])
    got = module(X, y)
    expected = reference.softmax_focal_loss(X.numpy(), y.numpy(), gamma=1.5, weight=w.numpy(), poly1=-0.5, axis=1)[0]
    H.assert_close(got.detach().numpy(), expected, "float64", "module value")
    assert "poly1=-0.5" in repr(module) and "poly1" not in repr(focal_torch.SoftmaxFocalLoss())
