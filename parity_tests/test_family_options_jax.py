"""The focal loss's own variants in JAX: ``poly1``, ``normalized``, ``reduced_threshold`` and a
:class:`focal_spec.GammaSchedule` ``gamma`` of ``focal_jax.sigmoid_focal_loss``, and ``poly1`` of
``focal_jax.softmax_focal_loss``.

Values and gradients are held to the precision contract of :mod:`parity_tests._harness` against the float64
references of :mod:`focal_spec.reference`, evaluated on the inputs as the backend holds them. The condition
scale ``S`` of each quantity is the sum of the magnitudes of its terms, each times the condition number of
its power of 1 - p_t (:func:`parity_tests._harness.modulator_condition`), as for the focal loss. The
normalized loss ℓ/Σm adds the rounding of the normalizer Σm (and, for the gradient, of Σℓ and of dΣm)
relative to the quotient. Logits are within 2e-3 of no threshold in p_t, so that a rounding of p_t never
selects another branch.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np
import pytest

import focal_spec
from focal_spec import _variants as variants
from focal_spec import reference
from parity_tests import _harness as H

SATURATED = np.array([80.0, -80.0, 1e4, -1e4, 30.0, -30.0, 17.3, -17.3])
SHAPE = (4, 6)
MARGIN = 2e-3  # no p_t this close to a threshold (of a schedule or of reduced_threshold)

# Options of the sigmoid loss: Poly-1 (positive, negative, with a fractional γ), the reduced focal loss, FLSD-53,
# the normalized loss, an array γ (one per class) with Poly-1, and all of them at once.
SIGMOID_OPTIONS = {
    "poly1": {"gamma": 2.0, "poly1": 1.0},
    "poly1-neg-frac": {"gamma": 1.5, "poly1": -0.7, "alpha": 0.25},
    "reduced": {"gamma": 2.0, "reduced_threshold": 0.5},
    "reduced-frac-poly1": {"gamma": 2.5, "reduced_threshold": 0.3, "poly1": 0.5},
    "flsd53-poly1-alpha": {"gamma": variants.FLSD_53, "poly1": 1.0, "alpha": 0.25},
    "normalized-frac-alpha": {"gamma": 0.5, "normalized": True, "alpha": 0.25},
    "array-gamma-poly1": {"gamma": np.array([0.5, 1.0, 2.0, 3.0, 0.0, 2.5]), "poly1": 1.0},
    "everything": {"gamma": variants.FLSD_53, "normalized": True, "reduced_threshold": 0.4, "poly1": -0.5},
}
NORMALIZED = tuple(k for k, v in SIGMOID_OPTIONS.items() if v.get("normalized"))
SIGMOID_AXES = {
    "options": tuple(SIGMOID_OPTIONS),
    "reduction": H.REDUCTIONS,
    "dtype": ("float64", "float32"),
    "targets": ("hard", "soft"),
    "where": (None, "mask"),
    "weight": (None, "per_class"),
    "label_smoothing": (0.0, 0.1),
    "pos_weight": (None, "per_class"),
}
# label smoothing's rounding of t' is bounded elementwise; a normalized loss couples every element
SIGMOID_FORBIDDEN = tuple({"options": k, "label_smoothing": 0.1} for k in NORMALIZED)
SIGMOID_CASES = H.covering_array(SIGMOID_AXES, ("options", "reduction"), SIGMOID_FORBIDDEN)


def _thresholds(kw: dict[str, Any]) -> tuple[float, ...]:
    th = tuple(kw["gamma"].thresholds) if isinstance(kw["gamma"], variants.GammaSchedule) else ()
    return th + ((kw["reduced_threshold"],) if kw.get("reduced_threshold") else ())


def _p_t(x: np.ndarray, t: np.ndarray, eps: float) -> np.ndarray:
    tp = t * (1.0 - eps) + eps / 2.0
    return tp * np.exp(-np.logaddexp(0.0, -x)) + (1.0 - tp) * np.exp(-np.logaddexp(0.0, x))


def _clear_of_thresholds(x: np.ndarray, t: np.ndarray, eps: float, thresholds: tuple[float, ...],
                         dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, t)`` with the logits whose p_t (in ``dtype``) is within MARGIN of a threshold moved away from it;
    a soft target that keeps p_t near a threshold whatever the logit (t' close to 1/2) is rounded to 0 or 1."""
    for i in range(60):
        pt = _p_t(H.round_to(x, dtype), t, eps)
        near = np.zeros(x.shape, bool)
        for th in thresholds:
            near |= np.abs(pt - th) < MARGIN
        if not near.any():
            return x, t
        x = np.where(near, x + 0.05, x)
        if i == 30:
            t = np.where(near, np.round(t), t)
    raise AssertionError("could not move the logits away from the thresholds")


def sigmoid_case_id(case: dict[str, Any]) -> str:
    return H.case_id(case)


def sigmoid_inputs(case: dict[str, Any]) -> H.Inputs:
    """Logits (normal, scale 4, with saturated values up to |x| = 1e4), targets and the call's keywords."""
    rng = np.random.default_rng(H.seed_of("family-options" + sigmoid_case_id(case)))
    x = rng.normal(scale=4.0, size=SHAPE)
    saturated = np.zeros(x.size, bool)
    saturated[rng.choice(x.size, SATURATED.size, replace=False)] = True
    x.reshape(-1)[saturated] = SATURATED
    t = (rng.uniform(size=SHAPE) < 0.3).astype(np.float64) if case["targets"] == "hard" else rng.uniform(size=SHAPE)
    kw: dict[str, Any] = dict(SIGMOID_OPTIONS[case["options"]], reduction=case["reduction"],
                              label_smoothing=case["label_smoothing"])
    per_class = ["gamma"] if isinstance(kw["gamma"], np.ndarray) else []
    x, t = _clear_of_thresholds(x, t, case["label_smoothing"], _thresholds(kw), case["dtype"])
    if case["weight"] == "per_class":
        kw["weight"] = rng.uniform(0.5, 2.0, size=SHAPE[-1])
        per_class.append("weight")
    if case["pos_weight"] == "per_class":
        kw["pos_weight"] = H.round_to(rng.uniform(0.5, 3.0, size=SHAPE[-1]), H.compute_dtype(case["dtype"]))
        per_class.append("pos_weight")
    if case["where"] == "mask":
        mask = (rng.uniform(size=SHAPE) < 0.7) | saturated.reshape(SHAPE)
        x = np.where(mask, x, np.nan)  # garbage at excluded positions must not matter
        t = np.where(mask, t, 255.0)
        kw["where"] = mask
    return H.Inputs(x, t, kw, case["dtype"], tuple(per_class))


def _gamma_per_element(kw: dict[str, Any], p_t: np.ndarray) -> np.ndarray:
    g = kw.get("gamma", focal_spec.GAMMA)
    if isinstance(g, variants.GammaSchedule):
        return g.gamma_of(p_t)
    return np.broadcast_to(np.asarray(g, np.float64), p_t.shape)


def sigmoid_scales(held: H.Inputs) -> tuple[np.ndarray, np.ndarray]:
    """Condition scales ``S`` of the value and of the gradient (see the module docstring), for ``held``."""
    kw = held.kwargs
    x = np.asarray(held.logits, np.float64)
    mask = np.ones(x.shape, bool) if kw.get("where") is None else np.asarray(kw["where"])
    x = np.where(mask, x, 0.0)
    t = np.where(mask, np.asarray(held.labels, np.float64), 0.0)
    eps = float(kw.get("label_smoothing", 0.0))
    tp = t * (1.0 - eps) + eps / 2.0
    lp, ln = -np.logaddexp(0.0, -x), -np.logaddexp(0.0, x)
    s, sn = np.exp(lp), np.exp(ln)
    pw = np.asarray(kw.get("pos_weight", 1.0), np.float64)
    ce = -(pw * tp * lp + (1.0 - tp) * ln)
    with np.errstate(divide="ignore"):
        log_q = np.logaddexp(np.log(tp) + ln, np.log1p(-tp) + lp)
    g = _gamma_per_element(kw, -np.expm1(log_q))
    th = kw.get("reduced_threshold")
    active = np.ones(x.shape) if th is None else (-np.expm1(log_q) >= th).astype(np.float64)
    log_u = log_q if th is None else np.where(active > 0, log_q - np.log(th), 0.0)
    with np.errstate(invalid="ignore"):
        m = np.where(g == 0, 1.0, np.exp(g * log_u))
    r = np.exp(lp + ln - log_q)
    alpha = kw.get("alpha")
    at = 1.0 if alpha is None else np.abs(alpha * tp + (1.0 - alpha) * (1.0 - tp))
    a = np.where(mask, at * np.abs(np.asarray(kw.get("weight", 1.0), np.float64)), 0.0)
    k_m, k_p = H.modulator_condition(g, log_u), H.modulator_condition(g + 1.0, log_q)
    eps1 = abs(float(kw.get("poly1", 0.0)))
    dm = active * g * m * np.abs(1.0 - 2.0 * tp) * r
    poly, dpoly = eps1 * np.exp((g + 1.0) * log_q), eps1 * (g + 1.0) * np.exp(g * log_q + lp + ln)
    sv = a * (m * ce * k_m + poly * k_p)
    sg = a * ((dm * ce + m * ((1.0 - tp) * s + pw * tp * sn)) * k_m + dpoly * k_p)
    if eps:  # t' is rounded to the compute dtype inside the backend: t' |d/dt'| of the value and gradient
        h = 1e-7
        pre = {k: v for k, v in kw.items() if k not in ("label_smoothing", "reduction")}
        up = reference.sigmoid_focal_loss(x, tp * (1 + h), **pre, reduction="none")
        dn = reference.sigmoid_focal_loss(x, tp * (1 - h), **pre, reduction="none")
        sv = sv + np.abs(up[0] - dn[0]) / (2 * h)
        sg = sg + np.abs(up[1] - dn[1]) / (2 * h)
    if kw.get("normalized"):  # ℓ/z and (dℓ z - Σℓ dz)/z², with the roundings of z, Σℓ and dz
        full = {k: v for k, v in kw.items() if k not in ("normalized", "reduction")}
        loss, grad = reference.sigmoid_focal_loss(x, t, **full, reduction="none")
        z = float(np.where(mask, m, 0.0).sum())
        sz = float(np.where(mask, m * k_m, 0.0).sum())
        dz = np.where(mask, dm, 0.0)
        total, s_total = abs(float(loss.sum())), float(sv.sum())
        sv = sv / z + np.abs(loss) * sz / z**2
        sg = (sg * z + np.abs(grad) * sz + s_total * dz + total * dz * k_m) / z**2
        if kw["reduction"] == "none":
            return sv, sg
    n = float(mask.sum())
    if kw["reduction"] == "none":
        return sv, sg
    k = 1.0 if kw["reduction"] == "sum" else 1.0 / n
    return np.asarray(sv.sum() * k), sg * k


@functools.cache
def _sigmoid_expected(cid: str) -> H.Expected:
    held = H.as_held(sigmoid_inputs(_SIGMOID_CASE_OF[cid]))
    held = H.Inputs(held.logits, held.labels,
                    dict(held.kwargs, pos_weight=held.kwargs["pos_weight"]) if "pos_weight" in held.kwargs
                    else held.kwargs, held.dtype, held.per_class)
    value, grad = H.run_reference("sigmoid", held)
    sv, sg = sigmoid_scales(held)
    return H.Expected(value, grad, sv, sg)


_SIGMOID_CASE_OF = {sigmoid_case_id(c): c for c in SIGMOID_CASES}
SIGMOID_GRID = [pytest.param(cid, id=cid) for cid in _SIGMOID_CASE_OF]


@pytest.mark.parametrize("cid", SIGMOID_GRID)
def test_sigmoid_options_match_the_float64_reference(cid):
    inp = sigmoid_inputs(_SIGMOID_CASE_OF[cid])
    value, grad = H.run_jax("sigmoid", inp, "jit")
    _sigmoid_expected(cid).check(value, grad, inp.dtype, "jax")


def test_sigmoid_grid_covers_every_pair_and_both_branches():
    allowed = H.required_pairs(SIGMOID_AXES, SIGMOID_FORBIDDEN)
    assert allowed <= H.covered_pairs(SIGMOID_AXES, SIGMOID_CASES)
    # every schedule value and both sides of every reduced threshold are reached somewhere in the grid
    seen: dict[str, set] = {}
    for cid, case in _SIGMOID_CASE_OF.items():
        inp = H.as_held(sigmoid_inputs(case))
        kw = inp.kwargs
        mask = np.ones(SHAPE, bool) if kw.get("where") is None else kw["where"]
        pt = _p_t(np.where(mask, inp.logits, 0.0), np.where(mask, inp.labels, 0.0), kw["label_smoothing"])[mask]
        if isinstance(kw["gamma"], variants.GammaSchedule):
            seen.setdefault("schedule", set()).update(np.unique(kw["gamma"].gamma_of(pt)))
        if kw.get("reduced_threshold"):
            seen.setdefault("reduced", set()).update(np.unique(pt < kw["reduced_threshold"]))
        assert np.nanmax(np.abs(inp.logits)) == 1e4, cid
    assert seen == {"schedule": {3.0, 5.0}, "reduced": {False, True}}


# ----------------------------------------------------------------------------------------
# Softmax Poly-1.
# ----------------------------------------------------------------------------------------

SOFTMAX_OPTIONS = {
    "poly1": {"gamma": 2.0, "poly1": 1.0},
    "poly1-neg-frac": {"gamma": 1.5, "poly1": -0.7},
    "poly1-gamma0": {"gamma": 0.0, "poly1": 0.5},
    "poly1-array-gamma": {"gamma": np.array([0.5, 1.0, 2.0, 3.0]), "poly1": 2.0},
}
SOFTMAX_AXES = {
    "options": tuple(SOFTMAX_OPTIONS),
    "reduction": H.REDUCTIONS,
    "dtype": ("float64", "float32"),
    "labels": ("index", "probs"),
    "shape": ((6, 4), (2, 4, 3, 2)),
    "weight": (None, "per_class"),
    "label_smoothing": (0.0, 0.1),
    "ignore": (None, -100),
    "where": (None, "mask"),
}
SOFTMAX_FORBIDDEN = ({"labels": "probs", "ignore": -100},)
SOFTMAX_CASES = H.covering_array(SOFTMAX_AXES, ("options", "reduction"), SOFTMAX_FORBIDDEN)
_SOFTMAX_CASE_OF = {H.case_id(c): c for c in SOFTMAX_CASES}


def softmax_inputs(case: dict[str, Any]) -> H.Inputs:
    """The harness' softmax inputs (class axis 1), with saturated logits (±80) at some counted positions and
    the options of ``case``."""
    base = H.softmax_inputs(dict(case, gamma=0.0))
    rng = np.random.default_rng(H.seed_of("family-options-softmax" + H.case_id(case)))
    x = base.logits.copy()
    xm = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])  # a view: rows are positions
    rows = rng.choice(xm.shape[0], 2, replace=False)
    for row, sign in zip(rows, (1.0, -1.0), strict=True):
        if np.isfinite(xm[row]).all():
            xm[row, rng.integers(xm.shape[1])] = sign * 80.0
    x = np.moveaxis(xm.reshape(np.moveaxis(x, 1, -1).shape), -1, 1)
    kw = dict(base.kwargs, **SOFTMAX_OPTIONS[case["options"]])
    return H.Inputs(x, base.labels, kw, base.dtype)


def softmax_poly1_scales(held: H.Inputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The condition scales of Poly-1's term ε₁ Σ_c w_c q_c (1-p_c)^(γ_c+1) (value, gradient, and the reference's
    own A_k - p_k Σ_c A_c), for ``held`` (class axis 1), reduced as the loss."""
    kw = held.kwargs
    x, valid, w, q, denom = H.softmax_setup(held)
    c = x.shape[-1]
    wq = np.where(valid[..., None], w * np.abs(q), 0.0)
    lse = np.logaddexp.reduce(x, axis=-1, keepdims=True)
    log1mp = np.stack([np.logaddexp.reduce(np.delete(x, k, axis=-1), axis=-1) for k in range(c)], axis=-1) - lse
    p, omp = np.exp(x - lse), np.exp(log1mp)
    g = np.broadcast_to(np.asarray(kw["gamma"], np.float64), x.shape)
    k_p = H.modulator_condition(g + 1.0, log1mp)
    eps1 = abs(kw["poly1"])
    sv = (eps1 * wq * np.exp((g + 1.0) * log1mp) * k_p).sum(-1)
    aa = eps1 * wq * (g + 1.0) * np.exp(g * log1mp) * p * k_p
    total = aa.sum(-1, keepdims=True)
    sg, sg_ref = aa * omp + p * (total - aa), aa + p * total
    k = 1.0 if kw["reduction"] != "mean" else (1.0 / denom if denom else 0.0)
    if kw["reduction"] != "none":
        sv = np.asarray(sv.sum())
    return sv * k, np.moveaxis(sg * k, -1, 1), np.moveaxis(sg_ref * k, -1, 1)


@functools.cache
def _softmax_expected(cid: str) -> H.Expected:
    held = H.as_held(softmax_inputs(_SOFTMAX_CASE_OF[cid]))
    value, grad = H.run_reference("softmax", held)
    sv, sg, sg_ref = H.softmax_scales(held)
    pv, pg, pg_ref = softmax_poly1_scales(held)
    return H.Expected(value, grad, sv + pv, sg + pg, sg_ref + pg_ref)


@pytest.mark.parametrize("cid", [pytest.param(cid, id=cid) for cid in _SOFTMAX_CASE_OF])
def test_softmax_poly1_matches_the_float64_reference(cid):
    inp = softmax_inputs(_SOFTMAX_CASE_OF[cid])
    value, grad = H.run_jax("softmax", inp, "jit")
    _softmax_expected(cid).check(value, grad, inp.dtype, "jax")


def test_softmax_grid_covers_every_pair_and_the_saturated_logits():
    assert H.required_pairs(SOFTMAX_AXES, SOFTMAX_FORBIDDEN) <= H.covered_pairs(SOFTMAX_AXES, SOFTMAX_CASES)
    assert all(np.nanmax(np.where(np.isinf(softmax_inputs(c).logits), np.nan, softmax_inputs(c).logits)) == 80.0
               for c in SOFTMAX_CASES[:4])


# ----------------------------------------------------------------------------------------
# Identities.
# ----------------------------------------------------------------------------------------

RNG = np.random.default_rng(20261203)
X = np.concatenate([RNG.normal(scale=4.0, size=36), SATURATED, [0.0, 1e-3, -1e-3, 5.0]])
HARD = (RNG.uniform(size=X.size) < 0.3).astype(np.float64)
SOFT = RNG.uniform(size=X.size)


def _jax_sigmoid(logits: np.ndarray, targets: np.ndarray, dtype: str, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """focal_jax's sigmoid loss and the gradient of its sum, as float64 NumPy."""
    import jax
    import jax.numpy as jnp

    import focal_jax

    with jax.enable_x64(dtype == "float64"):
        kw = {k: jnp.asarray(v, dtype) if isinstance(v, np.ndarray) and k != "where" else v for k, v in kw.items()}
        t = jnp.asarray(targets, dtype)
        f = lambda z: focal_jax.sigmoid_focal_loss(z, t, **kw)  # noqa: E731
        value, grad = jax.jit(lambda z: (f(z), jax.grad(lambda a: f(a).sum())(z)))(jnp.asarray(logits, dtype))
        return np.asarray(value, np.float64), np.asarray(grad, np.float64)


def _jax_softmax(logits: np.ndarray, labels: np.ndarray, dtype: str, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    import jax
    import jax.numpy as jnp

    import focal_jax

    with jax.enable_x64(dtype == "float64"):
        y = jnp.asarray(labels) if labels.dtype.kind == "i" else jnp.asarray(labels, dtype)
        f = lambda z: focal_jax.softmax_focal_loss(z, y, **kw)  # noqa: E731
        value, grad = jax.jit(lambda z: (f(z), jax.grad(lambda a: f(a).sum())(z)))(jnp.asarray(logits, dtype))
        return np.asarray(value, np.float64), np.asarray(grad, np.float64)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("gamma", [0.0, 1.5, 2.0])
def test_poly1_zero_is_the_focal_loss_and_poly1_adds_its_term(gamma, dtype):
    x = H.round_to(X, dtype)
    t = H.round_to(SOFT, dtype)
    plain = _jax_sigmoid(x, t, dtype, gamma=gamma, alpha=0.25, reduction="none")
    zero = _jax_sigmoid(x, t, dtype, gamma=gamma, alpha=0.25, reduction="none", poly1=0.0, normalized=False,
                        reduced_threshold=None)
    for a, b in zip(plain, zero, strict=True):
        np.testing.assert_array_equal(a, b)  # the defaults are today's computation, bit for bit
    # the increment is ε₁ α_t (1-p_t)^(γ+1), in float64
    eps1 = -0.7
    with_poly = _jax_sigmoid(x, t, dtype, gamma=gamma, alpha=0.25, reduction="none", poly1=eps1)
    at = 0.25 * t + 0.75 * (1.0 - t)
    q = 1.0 - _p_t(x, t, 0.0)
    ref_fl = reference.sigmoid_focal_loss(x, t, gamma=gamma, alpha=0.25, reduction="none")[0]
    term = eps1 * at * q ** (gamma + 1.0)
    H.assert_close(with_poly[0] - plain[0], term, dtype, "poly1 term", scale=2 * (np.abs(term) + ref_fl) * (2 + gamma))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("labels", ["index", "probs"])
def test_softmax_poly1_zero_is_the_focal_loss(labels, dtype):
    x = H.round_to(RNG.normal(scale=3.0, size=(5, 4)), dtype)
    y = np.array([0, 3, 1, 2, 2]) if labels == "index" else RNG.dirichlet(np.ones(4), size=5)
    plain = _jax_softmax(x, y, dtype, gamma=1.5, reduction="none")
    zero = _jax_softmax(x, y, dtype, gamma=1.5, reduction="none", poly1=0.0)
    for a, b in zip(plain, zero, strict=True):
        np.testing.assert_array_equal(a, b)
    ours = _jax_softmax(x, y, dtype, gamma=1.5, reduction="none", poly1=0.5)
    q = np.eye(4)[y] if labels == "index" else H.round_to(y, dtype)
    p = np.exp(x - np.logaddexp.reduce(x, axis=-1, keepdims=True))
    term = 0.5 * (q * (1.0 - p) ** 2.5).sum(-1)
    ref_fl = reference.softmax_focal_loss(x, q if labels == "probs" else y, gamma=1.5, reduction="none")[0]
    H.assert_close(ours[0] - plain[0], term, dtype, "poly1 term", scale=2 * (term + ref_fl) * 4.0)


def test_the_defaults_keep_the_closed_form_path():
    import jax
    import jax.numpy as jnp

    import focal_jax

    x, t = jnp.asarray(X, jnp.float32), jnp.asarray(SOFT, jnp.float32)
    plain = str(jax.make_jaxpr(lambda z: focal_jax.sigmoid_focal_loss(z, t))(x))
    explicit = str(jax.make_jaxpr(lambda z: focal_jax.sigmoid_focal_loss(
        z, t, poly1=0.0, normalized=False, reduced_threshold=None))(x))
    variant = str(jax.make_jaxpr(lambda z: focal_jax.sigmoid_focal_loss(z, t, gamma=variants.FLSD_53))(x))
    assert plain == explicit and "custom_jvp_call" in plain
    assert "custom_jvp_call" not in variant
    y = jnp.asarray([0, 3, 1, 2, 2])
    xs = jnp.asarray(RNG.normal(size=(5, 4)), jnp.float32)
    assert (str(jax.make_jaxpr(lambda z: focal_jax.softmax_focal_loss(z, y))(xs))
            == str(jax.make_jaxpr(lambda z: focal_jax.softmax_focal_loss(z, y, poly1=0.0))(xs)))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("targets", ["hard", "soft"])
def test_normalized_at_gamma_zero_is_the_mean_bce(targets, dtype):
    x = H.round_to(X, dtype)
    t = H.round_to(HARD if targets == "hard" else SOFT, dtype)
    ours = _jax_sigmoid(x, t, dtype, gamma=0.0, normalized=True, reduction="sum")
    bce = reference.sigmoid_focal_loss(x, t, gamma=0.0, reduction="mean")  # the float64 mean cross-entropy
    ce = np.logaddexp(0.0, x) - t * x
    H.assert_close(ours[0], bce[0], dtype, "value")
    terms = (1.0 - t) * np.exp(-np.logaddexp(0.0, -x)) + t * np.exp(-np.logaddexp(0.0, x))  # (1-t)σ(x) + tσ(-x)
    H.assert_close(ours[1], bce[1], dtype, "gradient", scale=terms / x.size)
    H.assert_close(ours[0], ce.mean(), dtype, "value against the plain formula", scale=2 * ce.mean())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("targets", ["hard", "soft"])
def test_flsd53_is_the_focal_loss_with_the_scheduled_gamma_array(targets, dtype):
    x, t = _clear_of_thresholds(X, HARD if targets == "hard" else SOFT, 0.0, (0.2,), dtype)
    x, t = H.round_to(x, dtype), H.round_to(t, dtype)
    gamma = variants.FLSD_53.gamma_of(_p_t(x, t, 0.0))
    assert set(np.unique(gamma)) == {3.0, 5.0}  # both branches are exercised
    ours = _jax_sigmoid(x, t, dtype, gamma=variants.FLSD_53, reduction="none")
    fixed = _jax_sigmoid(x, t, dtype, gamma=gamma, reduction="none")
    # both within the contract of the float64 reference, so within twice its scales of each other (the scales hold
    # K for an array γ, and, for soft targets, the magnitudes of the gradient's terms, which cancel there)
    scales = H.sigmoid_scales(H.Inputs(x, t, {"gamma": gamma, "reduction": "none"}, dtype))
    for a, b, s, what in zip(ours, fixed, scales, ("value", "gradient"), strict=True):
        H.assert_close(a, b, dtype, f"FLSD-53 vs the γ array {what}", scale=2 * s)


def test_a_constant_schedule_is_the_plain_focal_loss():
    x = H.round_to(X, "float32")
    constant = variants.GammaSchedule(thresholds=(0.5,), values=(2.0, 2.0))
    ours = _jax_sigmoid(x, SOFT, "float32", gamma=constant, alpha=0.25, reduction="none")
    plain = _jax_sigmoid(x, SOFT, "float32", gamma=2.0, alpha=0.25, reduction="none")
    ref = reference.sigmoid_focal_loss(x, H.round_to(SOFT, "float32"), gamma=2.0, alpha=0.25, reduction="none")
    for a, b, e, what in zip(ours, plain, ref, ("value", "gradient"), strict=True):
        H.assert_close(a, b, "float32", what, scale=2 * 3 * (np.abs(e) + 1e-30))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_reduced_threshold_of_one_is_the_cross_entropy(dtype):
    x = H.round_to(X, dtype)
    ours = _jax_sigmoid(x, HARD, dtype, gamma=3.0, reduced_threshold=1.0, reduction="none")
    ce = reference.sigmoid_focal_loss(x, HARD, gamma=0.0, reduction="none")  # at every logit, saturated included
    H.assert_close(ours[0], ce[0], dtype, "value")
    H.assert_close(ours[1], ce[1], dtype, "gradient")


def _spec_error(check, value) -> tuple[type, str]:
    try:
        check(value)
    except (TypeError, ValueError) as e:
        return type(e), str(e)
    raise AssertionError(f"the spec accepts {value!r}")


@pytest.mark.parametrize(("option", "value", "check"), [
    ("reduced_threshold", 0.0, variants.check_reduced_threshold),
    ("reduced_threshold", 0, variants.check_reduced_threshold),
    ("reduced_threshold", 1.5, variants.check_reduced_threshold),
    ("poly1", float("inf"), variants.check_poly1),
    ("poly1", "1", variants.check_poly1),
    ("normalized", 1, variants.check_normalized),
], ids=lambda v: getattr(v, "__name__", repr(v)))
def test_bad_options_raise_the_spec_error(option, value, check):
    import focal_jax

    kind, msg = _spec_error(check, value)
    assert option in msg
    with pytest.raises(kind, match=re.escape(msg)):
        focal_jax.sigmoid_focal_loss(X, HARD, **{option: value})
    if option == "poly1":
        with pytest.raises(kind, match=re.escape(msg)):
            focal_jax.softmax_focal_loss(X.reshape(-1, 4), np.zeros(X.size // 4, np.int32), poly1=value)


def test_reduced_threshold_zero_is_rejected_with_the_spec_message():
    import focal_jax

    msg = focal_spec.invalid_value("reduced_threshold", "None or a number in (0, 1]", 0.0)
    with pytest.raises(ValueError, match=re.escape(msg)):
        focal_jax.sigmoid_focal_loss(X, HARD, reduced_threshold=0.0)


def test_softmax_has_no_other_family_option():
    import inspect

    import focal_jax

    params = inspect.signature(focal_jax.softmax_focal_loss).parameters
    reference_params = inspect.signature(reference.softmax_focal_loss).parameters
    for name in ("normalized", "reduced_threshold"):
        assert name not in params and name not in reference_params
    assert params["poly1"].default == reference_params["poly1"].default == 0.0
    sigmoid = inspect.signature(focal_jax.sigmoid_focal_loss).parameters
    sigmoid_ref = inspect.signature(reference.sigmoid_focal_loss).parameters
    for name in ("poly1", "normalized", "reduced_threshold"):
        assert sigmoid[name].kind == inspect.Parameter.KEYWORD_ONLY
        assert sigmoid[name].default == sigmoid_ref[name].default, name


# ----------------------------------------------------------------------------------------
# Transforms and higher derivatives.
# ----------------------------------------------------------------------------------------

EDGE_X = np.array([80.0, -80.0, 1e4, -1e4, 30.0, -30.0, 0.0, 1e-6, 3.0])
EDGE_T = (0.0, 1.0, 0.3)
EDGE_XT = np.array([(x, t) for t in EDGE_T for x in EDGE_X])
HESSIAN_OPTIONS = {
    "poly1-frac": {"gamma": 0.3, "poly1": -0.5},
    "poly1-gamma0": {"gamma": 0.0, "poly1": 1.0},
    "reduced-frac": {"gamma": 0.7, "reduced_threshold": 0.25},
    "schedule-frac": {"gamma": variants.GammaSchedule((0.3, 0.6), (0.5, 1.5, 0.2))},
    "normalized-frac": {"gamma": 0.5, "normalized": True, "poly1": 0.5},
    "everything": {"gamma": variants.FLSD_53, "normalized": True, "reduced_threshold": 0.4, "poly1": 2.0},
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(HESSIAN_OPTIONS))
def test_sigmoid_gradient_and_hessian_are_finite_at_saturated_logits(name, dtype):
    import jax
    import jax.numpy as jnp

    import focal_jax

    kw = HESSIAN_OPTIONS[name]
    with jax.enable_x64(dtype == "float64"):
        t = jnp.asarray(EDGE_XT[:, 1], dtype)
        f = lambda z: focal_jax.sigmoid_focal_loss(z, t, reduction="sum", **kw)  # noqa: E731
        x = jnp.asarray(EDGE_XT[:, 0], dtype)
        value, grad, hess = jax.jit(lambda z: (f(z), jax.grad(f)(z), jax.hessian(f)(z)))(x)
        for what, v in (("value", value), ("gradient", grad), ("hessian", hess)):
            assert np.isfinite(np.asarray(v)).all(), f"{what}: {np.asarray(v)}"
        if dtype == "float64":  # the gradient is the reference's, at every edge
            ref = reference.sigmoid_focal_loss(EDGE_XT[:, 0], EDGE_XT[:, 1], reduction="sum", **kw)
            H.assert_close(np.asarray(value), ref[0], dtype, "value", scale=np.abs(ref[0]) * 1e2)
            H.assert_close(np.asarray(grad), ref[1], dtype, "gradient", scale=np.abs(ref[1]) * 1e2)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("labels", ["index", "smoothed-probs"])
@pytest.mark.parametrize("gamma", [0.3])
def test_softmax_poly1_gradient_and_hessian_are_finite_at_saturated_logits(gamma, labels, dtype):
    import jax
    import jax.numpy as jnp

    import focal_jax

    logits = np.array([[80.0, -80.0, 0.0], [1e4, -1e4, 3.0], [-1e4, 0.0, 1e4], [0.0, 0.0, 0.0], [30.0, 1.0, -30.0]])
    index = np.array([0, 1, 2, 0, 2])
    with jax.enable_x64(dtype == "float64"):
        y = jnp.asarray(index) if labels == "index" else jnp.asarray(np.eye(3)[index] * 0.8 + 0.2 / 3, dtype)
        smoothing = 0.0 if labels == "index" else 0.1
        f = lambda z: focal_jax.softmax_focal_loss(z, y, gamma=gamma, poly1=-0.8, label_smoothing=smoothing,  # noqa: E731
                                                   reduction="sum")
        x = jnp.asarray(logits, dtype)
        value, grad, hess = jax.jit(lambda z: (f(z), jax.grad(f)(z), jax.hessian(f)(z)))(x)
        for what, v in (("value", value), ("gradient", grad), ("hessian", hess)):
            assert np.isfinite(np.asarray(v)).all(), f"{what}: {np.asarray(v)}"


def test_jit_compiles_once_for_new_inputs_and_vmap_equals_a_loop():
    import jax
    import jax.numpy as jnp

    import focal_jax

    traces = []

    def loss(z, t, w):
        traces.append(1)
        return focal_jax.sigmoid_focal_loss(z, t, weight=w, gamma=variants.FLSD_53, poly1=0.5, normalized=True,
                                            reduced_threshold=0.6)

    step = jax.jit(jax.value_and_grad(loss))
    rng = np.random.default_rng(5)
    for _ in range(3):
        x = jnp.asarray(rng.normal(scale=3.0, size=(3, 8)), jnp.float32)
        t = jnp.asarray(rng.uniform(size=(3, 8)), jnp.float32)
        w = jnp.asarray(rng.uniform(0.5, 2.0, size=8), jnp.float32)
        value, grad = step(x, t, w)
        assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
    assert len(traces) == 1

    soft = []

    def soft_loss(z, y):
        soft.append(1)
        return focal_jax.softmax_focal_loss(z, y, gamma=1.5, poly1=-0.3)

    soft_step = jax.jit(jax.value_and_grad(soft_loss))
    for _ in range(3):
        soft_step(jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), jnp.asarray(rng.integers(0, 4, 6)))
    assert len(soft) == 1

    with jax.enable_x64(True):
        x = jnp.asarray(np.stack([X, -X, X / 3]))
        t = jnp.asarray(np.stack([SOFT, HARD, SOFT]))
        kw = {"gamma": variants.FLSD_53, "poly1": 0.5, "normalized": True, "reduced_threshold": 0.6}
        row = jax.jit(lambda a, b: focal_jax.sigmoid_focal_loss(a, b, **kw))
        per_row = jax.jit(jax.vmap(row))(x, t)
        np.testing.assert_allclose(per_row, [row(x[i], t[i]) for i in range(3)], rtol=1e-12)


def test_normalized_sums_its_normalizer_over_axis_name():
    import jax
    import jax.numpy as jnp

    import focal_jax

    with jax.enable_x64(True):
        x = jnp.asarray(np.stack([X, -X, X / 3]))
        t = jnp.asarray(np.stack([SOFT, HARD, SOFT]))
        mask = jnp.asarray(RNG.uniform(size=x.shape) < 0.8)
        kw = {"gamma": 1.5, "poly1": 0.5, "normalized": True}
        whole = jax.jit(lambda a, b, m: focal_jax.sigmoid_focal_loss(a, b, where=m, reduction="sum", **kw))(x, t, mask)
        shards = jax.jit(jax.vmap(lambda a, b, m: focal_jax.sigmoid_focal_loss(
            a, b, where=m, reduction="sum", axis_name="rows", **kw), axis_name="rows"))(x, t, mask)
        np.testing.assert_allclose(shards, np.full(3, float(whole)), rtol=1e-12)
        ref = reference.sigmoid_focal_loss(np.asarray(x), np.asarray(t), where=np.asarray(mask), reduction="sum", **kw)
        H.assert_close(float(whole), ref[0], "float64", "value")


def test_gradients_flow_to_alpha_weight_targets_and_an_array_gamma():
    import jax
    import jax.numpy as jnp

    import focal_jax

    kw = {"poly1": 0.7, "normalized": True, "reduced_threshold": 0.3, "reduction": "sum"}
    x = X[:12]
    t = SOFT[:12]
    args = (0.25, np.full(12, 1.5), t, np.full(12, 1.7))  # alpha, weight, targets, gamma

    def ours(a, w, tt, g):
        return focal_jax.sigmoid_focal_loss(jnp.asarray(x), tt, alpha=a, weight=w, gamma=g, **kw)

    def ref(i, value):
        full = list(args)
        full[i] = value
        a, w, tt, g = full
        return float(reference.sigmoid_focal_loss(x, tt, alpha=a, weight=w, gamma=g, **kw)[0])

    with jax.enable_x64(True):
        grads = jax.jit(jax.grad(ours, argnums=(0, 1, 2, 3)))(*(jnp.asarray(a) for a in args))
    h = 1e-6
    for i, (g, arg) in enumerate(zip(grads, args, strict=True)):
        arg = np.asarray(arg, np.float64)
        num = np.array([(ref(i, arg + h * e) - ref(i, arg - h * e)) / (2 * h)
                        for e in (np.eye(arg.size).reshape((arg.size,) + arg.shape) if arg.ndim else [1.0])])
        np.testing.assert_allclose(np.asarray(g).reshape(-1), num.reshape(-1), rtol=1e-6, atol=1e-9)
