"""The focal family (asymmetric, quality focal and varifocal losses, class-balanced weights) on both backends.

Every backend value and gradient is held to the precision contract of :mod:`parity_tests._harness` against
the float64 references of :mod:`focal_spec._variants`, evaluated on the inputs as the backend holds them.
The condition scale ``S`` of each quantity is the sum of the magnitudes of its terms, as for the focal
loss, plus the two roundings that no float32 formula can avoid: the difference t - σ(x) of soft targets
(QFL, and the VFL gradient) and the margin shift σ(x) - m of ASL's negatives, each times the sensitivity
of the quantity to it. For hard targets and away from the margin the bound is purely relative.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import numpy as np
import pytest

import focal_spec
from focal_spec import _variants as variants
from parity_tests import _harness as H

BACKENDS = ("jax", "torch")
SATURATED = np.array([100.0, -100.0, 30.0, -30.0, 17.3, -17.3, 9.0, -9.0])

# Hyperparameter settings per variant: the defaults, fractional exponents (with a small margin: 1 - p_m must
# keep its digits where σ(x) rounds to 1), exponents of 0, and no margin.
HYPER = {
    "asymmetric": ({}, {"gamma_pos": 0.5, "gamma_neg": 2.5, "clip": 1e-4}, {"gamma_pos": 1.0, "gamma_neg": 0.0},
                   {"gamma_pos": 0.3, "gamma_neg": 1.7, "clip": 0.0}),
    "quality_focal": ({}, {"beta": 0.5}, {"beta": 0.0}, {"beta": 1.7}),
    "varifocal": ({}, {"alpha": 0.4, "gamma": 0.5}, {"gamma": 0.0}, {"alpha": 1.0, "gamma": 3.0}),
}
REFERENCES = {"asymmetric": variants.asymmetric_loss, "quality_focal": variants.quality_focal_loss,
              "varifocal": variants.varifocal_loss}
AXES = {
    "hyper": (0, 1, 2, 3),
    "reduction": H.REDUCTIONS,
    "dtype": ("float64", "float32"),
    "shape": ((6, 5), (2, 3, 4)),
    "targets": ("hard", "soft"),
    "weight": (None, "per_class"),
    "where": (None, "mask"),
    "label_smoothing": (0.0, 0.1),
}
CASES = [(loss, case) for loss in HYPER for case in H.covering_array(
    AXES if loss == "asymmetric" else {k: v for k, v in AXES.items() if k != "label_smoothing"},
    ("hyper", "reduction", "dtype"))]


def _case_id(loss: str, case: dict[str, Any]) -> str:
    return f"{loss}-" + H.case_id(dict(case, hyper=HYPER[loss][case["hyper"]] or "default"))


def _inputs(loss: str, case: dict[str, Any]) -> dict[str, Any]:
    """Logits (normal, scale 4, with saturated values up to |x| = 100), targets, and the call's keywords."""
    rng = np.random.default_rng(H.seed_of(_case_id(loss, case)))
    shape = case["shape"]
    x = rng.normal(scale=4.0, size=shape)
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, SATURATED.size, replace=False)] = SATURATED
    if case["targets"] == "hard":
        t = (rng.uniform(size=shape) < 0.3).astype(np.float64)
    elif loss == "varifocal":  # IoU-aware scores: 0 for negatives
        t = np.where(rng.uniform(size=shape) < 0.4, rng.uniform(0.05, 1.0, size=shape), 0.0)
    else:
        t = rng.uniform(size=shape)
    kw: dict[str, Any] = dict(HYPER[loss][case["hyper"]], reduction=case["reduction"])
    if case.get("label_smoothing"):
        kw["label_smoothing"] = case["label_smoothing"]
    if case["weight"] == "per_class":
        kw["weight"] = rng.uniform(0.5, 2.0, size=shape[-1])
    if case["where"] == "mask":
        kw["where"] = rng.uniform(size=shape) < 0.8
        x = np.where(kw["where"], x, np.nan)  # garbage at excluded positions must not matter
        t = np.where(kw["where"], t, 255.0)
    return {"logits": x, "targets": t, "kwargs": kw, "dtype": case["dtype"]}


# ----------------------------------------------------------------------------------------
# The reference on the held inputs, and the condition scales.
# ----------------------------------------------------------------------------------------


def _held(inp: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    cdt = H.compute_dtype(inp["dtype"])
    kw = dict(inp["kwargs"])
    if "weight" in kw:
        kw["weight"] = H.round_to(kw["weight"], cdt)
    return H.round_to(inp["logits"], inp["dtype"]), H.round_to(inp["targets"], cdt), kw


def _pow(u: np.ndarray, k: float) -> np.ndarray:
    """u^k with 0^0 = 1, 0^k = 0 for k > 0 and inf for k < 0."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(u > 0, u ** k, 1.0 if k == 0 else (0.0 if k > 0 else np.inf))


def _times(coef: float, v: np.ndarray) -> np.ndarray:
    """coef · v with 0 · inf = 0 (a term whose coefficient vanishes)."""
    return np.zeros_like(v) if coef == 0 else coef * v


def _scales(loss: str, x: np.ndarray, t: np.ndarray, kw: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Condition scales of the elementwise value and gradient (see the module docstring), unreduced."""
    mask = np.ones(x.shape, bool) if kw.get("where") is None else np.asarray(kw["where"])
    x = np.where(mask, x, 0.0)
    t = np.where(mask, t, 0.0)
    eps = kw.get("label_smoothing", 0.0)
    t = t * (1.0 - eps) + eps / 2.0
    w = np.where(mask, np.broadcast_to(np.abs(np.asarray(kw.get("weight", 1.0))), x.shape), 0.0)
    ls, lsn = -np.logaddexp(0.0, -x), -np.logaddexp(0.0, x)
    s, sn, a, b = np.exp(ls), np.exp(lsn), -ls, -lsn
    if loss == "asymmetric":
        gp = kw.get("gamma_pos", variants.ASL_GAMMA_POS)
        gn = kw.get("gamma_neg", variants.ASL_GAMMA_NEG)
        m = kw.get("clip", variants.ASL_CLIP)
        pos, dpos = _pow(sn, gp) * a, _pow(sn, gp) * (gp * s * a + sn)
        if m == 0:
            neg, dneg = _pow(s, gn) * b, _pow(s, gn) * (gn * sn * b + s)
            cond_v = cond_g = 0.0
        else:
            active = s > m
            pm = np.where(active, s - m, 0.0)
            nll = -np.log1p(-pm)
            first = np.where(active, _times(gn, _pow(pm, gn - 1.0)) * nll, 0.0)
            dnll = np.where(active, _pow(pm, gn) / (1.0 - pm), 0.0)
            neg, dneg = np.where(active, _pow(pm, gn) * nll, 0.0), s * sn * (first + dnll)
            second = (_times(gn * abs(gn - 1.0), _pow(pm, gn - 2.0)) * nll
                      + 2.0 * _times(gn, _pow(pm, gn - 1.0)) / (1.0 - pm) + _pow(pm, gn) / (1.0 - pm) ** 2)
            # the rounding of σ(x) - m, times ∂/∂p_m; above p_m = 1/2, 1 - p_m is the sum s̄ + m (no rounding of
            # σ(x) enters it), so only the powers of p_m carry that rounding
            small = pm < 0.5
            cond_v = (s + m) * (first + np.where(small, dnll, 0.0))
            second_big = (_times(gn * abs(gn - 1.0), _pow(pm, gn - 2.0)) * nll
                          + _times(gn, _pow(pm, gn - 1.0)) / (1.0 - pm))
            cond_g = (s + m) * s * sn * np.where(active, np.where(small, second, second_big), 0.0)
        sv = w * (t * pos + (1.0 - t) * (neg + cond_v) + (pos + neg if eps else 0.0))
        sg = w * (t * dpos + (1.0 - t) * (dneg + cond_g) + (dpos + dneg if eps else 0.0))
    elif loss == "quality_focal":
        beta = kw.get("beta", variants.QFL_BETA)
        d, sd = np.abs(t * sn - (1.0 - t) * s), t * sn + (1.0 - t) * s
        ce = t * a + (1.0 - t) * b
        db = _times(beta, _pow(d, beta - 1.0))
        with np.errstate(invalid="ignore"):
            sv = w * (_pow(d, beta) * ce + db * ce * sd)
            second = _times(beta * abs(beta - 1.0), _pow(d, beta - 2.0)) * s * sn * ce + (beta + 1.0) * _pow(d, beta)
            sg = w * (db * s * sn * ce + _pow(d, beta + 1.0) + sd * second)
        sv, sg = np.nan_to_num(sv, nan=np.inf), np.nan_to_num(sg, nan=np.inf)
    else:
        alpha = kw.get("alpha", variants.VFL_ALPHA)
        gamma = kw.get("gamma", variants.VFL_GAMMA)
        ce = t * a + (1.0 - t) * b
        neg = alpha * _pow(s, gamma)
        sv = w * np.where(t > 0, t, neg) * ce
        sg = w * np.where(t > 0, t * ((1.0 - t) * s + t * sn), neg * (gamma * sn * b + s))
    return sv, sg


@functools.cache
def _expected(loss: str, cid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    inp = _inputs(loss, _CASE_OF[cid])
    x, t, kw = _held(inp)
    value, grad = REFERENCES[loss](x, t, **kw)
    sv, sg = _scales(loss, x, t, kw)
    mask = np.ones(x.shape, bool) if kw.get("where") is None else kw["where"]
    k = 1.0 / mask.sum() if kw["reduction"] == "mean" else 1.0
    if kw["reduction"] != "none":
        sv, sg = np.asarray(sv.sum() * k), sg * k
    return value, grad, sv, sg


_CASE_OF = {_case_id(loss, case): case for loss, case in CASES}


# ----------------------------------------------------------------------------------------
# Backend runners: (value, gradient of sum(value) wrt the logits), as float64 NumPy.
# ----------------------------------------------------------------------------------------


def run_jax(loss: str, logits: np.ndarray, targets: np.ndarray, dtype: str, **kw: Any) -> tuple[np.ndarray, ...]:
    import jax
    import jax.numpy as jnp

    from focal_jax import _family

    fn = getattr(_family, f"{loss}_loss")
    with jax.enable_x64(dtype == "float64"):
        real = jnp.float64 if dtype == "float64" else jnp.float32
        kw = {k: jnp.asarray(v, real) if k == "weight" else v for k, v in kw.items()}
        x = jnp.asarray(logits, getattr(jnp, dtype))
        t = jnp.asarray(targets, real)

        def total(z):
            out = fn(z, t, **kw)
            return jnp.sum(out.astype(real)), out

        (_, out), g = jax.value_and_grad(total, has_aux=True)(x)
        return np.asarray(out.astype(real), np.float64), np.asarray(g.astype(real), np.float64)


def run_torch(loss: str, logits: np.ndarray, targets: np.ndarray, dtype: str, **kw: Any) -> tuple[np.ndarray, ...]:
    import torch

    from focal_torch import _family

    fn = getattr(_family, f"{loss}_loss")
    real = torch.float64 if dtype == "float64" else torch.float32
    kw = {k: torch.as_tensor(v, dtype=real) if k == "weight" else torch.as_tensor(v) if k == "where" else v
          for k, v in kw.items()}
    x = torch.tensor(logits, dtype=getattr(torch, dtype), requires_grad=True)
    out = fn(x, torch.as_tensor(targets, dtype=real), **kw)
    out.to(real).sum().backward()
    return out.detach().to(torch.float64).numpy(), x.grad.to(torch.float64).numpy()


RUNNERS = {"jax": run_jax, "torch": run_torch}


@functools.cache
def _run(backend: str, loss: str, cid: str) -> tuple[np.ndarray, np.ndarray]:
    inp = _inputs(loss, _CASE_OF[cid])
    return RUNNERS[backend](loss, inp["logits"], inp["targets"], inp["dtype"], **inp["kwargs"])


# ----------------------------------------------------------------------------------------
# The parity grid.
# ----------------------------------------------------------------------------------------

GRID = [pytest.param(loss, _case_id(loss, case), id=_case_id(loss, case)) for loss, case in CASES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("loss", "cid"), GRID)
def test_matches_the_float64_reference(backend, loss, cid):
    value, grad, sv, sg = _expected(loss, cid)
    dtype = _CASE_OF[cid]["dtype"]
    v, g = _run(backend, loss, cid)
    assert v.shape == value.shape and g.shape == grad.shape
    H.assert_close(v, value, dtype, f"{backend} value", scale=sv)
    H.assert_close(g, grad, dtype, f"{backend} gradient", scale=sg)


@pytest.mark.parametrize(("loss", "cid"), GRID)
def test_backends_agree(loss, cid):
    _, _, sv, sg = _expected(loss, cid)
    dtype = _CASE_OF[cid]["dtype"]
    (vj, gj), (vt, gt) = _run("jax", loss, cid), _run("torch", loss, cid)
    H.assert_close(vj, vt, dtype, "jax vs torch value", scale=2 * sv)
    H.assert_close(gj, gt, dtype, "jax vs torch gradient", scale=2 * sg)


def test_grid_covers_every_pair_and_the_saturated_logits():
    for loss in HYPER:
        axes = AXES if loss == "asymmetric" else {k: v for k, v in AXES.items() if k != "label_smoothing"}
        cases = [c for lo, c in CASES if lo == loss]
        assert H.required_pairs(axes) <= H.covered_pairs(axes, cases), loss
    x = _inputs("asymmetric", CASES[0][1])["logits"]
    assert np.nanmax(np.abs(x)) == 100.0


# ----------------------------------------------------------------------------------------
# Identities.
# ----------------------------------------------------------------------------------------

RNG = np.random.default_rng(20261202)
X = np.concatenate([RNG.normal(scale=4.0, size=40), SATURATED, [0.0, 1e-3, -1e-3]])
HARD = (RNG.uniform(size=X.size) < 0.3).astype(np.float64)
SOFT = RNG.uniform(size=X.size)


def _focal(backend: str, logits: np.ndarray, targets: np.ndarray, dtype: str, gamma: float) -> tuple[np.ndarray, ...]:
    """The backend's own sigmoid focal loss (no alpha), elementwise, with its gradient."""
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        import focal_jax

        with jax.enable_x64(dtype == "float64"):
            t = jnp.asarray(targets, dtype)
            fn = lambda z: focal_jax.sigmoid_focal_loss(z, t, gamma=gamma, reduction="none")  # noqa: E731
            x = jnp.asarray(logits, dtype)
            return np.asarray(fn(x), np.float64), np.asarray(jax.grad(lambda z: fn(z).sum())(x), np.float64)
    import torch

    import focal_torch

    x = torch.tensor(logits, dtype=getattr(torch, dtype), requires_grad=True)
    out = focal_torch.sigmoid_focal_loss(x, torch.as_tensor(targets, dtype=getattr(torch, dtype)), gamma=gamma,
                                         reduction="none")
    out.sum().backward()
    return out.detach().double().numpy(), x.grad.double().numpy()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 2.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_asl_with_equal_gammas_and_no_margin_is_the_focal_loss(backend, gamma, dtype):
    x = H.round_to(X, dtype)
    ours = RUNNERS[backend]("asymmetric", x, HARD, dtype, gamma_pos=gamma, gamma_neg=gamma, clip=0.0,
                            reduction="none")
    fl = _focal(backend, x, HARD, dtype, gamma)
    ref = focal_spec.reference.sigmoid_focal_loss(x, HARD, gamma=gamma, reduction="none")
    for a, b, e, what in zip(ours, fl, ref, ("value", "gradient"), strict=True):
        H.assert_close(a, b, dtype, f"ASL vs focal {what}", scale=2 * np.abs(e))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0, 3.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_qfl_with_hard_targets_is_the_focal_loss_without_alpha(backend, beta, dtype):
    x = H.round_to(X, dtype)
    ours = RUNNERS[backend]("quality_focal", x, HARD, dtype, beta=beta, reduction="none")
    fl = _focal(backend, x, HARD, dtype, beta)
    ref = focal_spec.reference.sigmoid_focal_loss(x, HARD, gamma=beta, reduction="none")
    for a, b, e, what in zip(ours, fl, ref, ("value", "gradient"), strict=True):
        H.assert_close(a, b, dtype, f"QFL vs focal {what}", scale=2 * np.abs(e))


def _cbw(backend: str, counts: Any, beta: float) -> np.ndarray:
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        from focal_jax._family import class_balanced_weights

        with jax.enable_x64(True):  # float64 is available: the result's dtype follows the counts'
            w = class_balanced_weights(jnp.asarray(counts), beta=beta)
            return np.asarray(w), str(w.dtype)
    import torch

    from focal_torch._family import class_balanced_weights

    w = class_balanced_weights(torch.as_tensor(counts), beta=beta)
    return w.numpy(), str(w.dtype).removeprefix("torch.")


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_balanced_weights(backend):
    counts = np.array([5000, 300, 12, 0, 1])
    w, dtype = _cbw(backend, counts, 0.0)
    assert dtype == "float32"
    np.testing.assert_array_equal(w, np.ones(5, np.float32))
    for beta in (0.9, 0.999, 1.0):
        w, dtype = _cbw(backend, counts, beta)
        expected = variants.class_balanced_weights(counts, beta=beta)
        assert dtype == "float32"
        H.assert_close(w, expected, "float32", f"beta={beta}")
        assert w[3] == w[4] == w.max()  # count 0 is weighted as a class seen once
    w, dtype = _cbw(backend, counts.astype(np.float64), 0.99)
    assert dtype == "float64"
    H.assert_close(w, variants.class_balanced_weights(counts, beta=0.99), "float64", "float64 counts")
    with pytest.raises(ValueError, match="counts"):
        _cbw(backend, np.array([3.0, -1.0]), 0.9)
    with pytest.raises(ValueError, match="beta"):
        _cbw(backend, counts, 1.5)


# ----------------------------------------------------------------------------------------
# Masking, out-of-range targets, half precision.
# ----------------------------------------------------------------------------------------

LOSSES = tuple(HYPER)
FRACTIONAL = {loss: HYPER[loss][1] for loss in LOSSES}


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_garbage_gives_zero_loss_and_zero_gradient(backend, loss, reduction):
    mask = RNG.uniform(size=X.size) < 0.7
    garbage_x = np.where(mask, X, np.where(np.arange(X.size) % 2, np.nan, -np.inf))
    garbage_t = np.where(mask, SOFT, 255.0)
    kw = dict(FRACTIONAL[loss], reduction=reduction)
    v, g = RUNNERS[backend](loss, garbage_x, garbage_t, "float64", where=mask, **kw)
    v0, g0 = RUNNERS[backend](loss, X[mask], SOFT[mask], "float64", **kw)
    assert np.all(g[~mask] == 0.0) and np.isfinite(g).all()
    H.assert_close(g[mask], g0, "float64", "gradient at counted elements")
    if reduction == "none":
        assert np.all(v[~mask] == 0.0)
        H.assert_close(v[mask], v0, "float64", "value at counted elements")
    else:
        H.assert_close(v, v0, "float64", "mean over counted elements")
    nothing = RUNNERS[backend](loss, garbage_x, garbage_t, "float64", where=np.zeros(X.size, bool), **kw)
    assert np.all(nothing[0] == 0.0) and np.all(nothing[1] == 0.0)


@pytest.mark.parametrize("loss", LOSSES)
def test_targets_out_of_range_raise_in_torch_and_give_nan_in_jax(loss):
    t = SOFT.copy()
    t[3] = 255.0
    with pytest.raises(ValueError, match=re.escape(focal_spec.targets_out_of_range(255.0))):
        run_torch(loss, X, t, "float64", reduction="none")
    v, _ = run_jax(loss, X, t, "float64", reduction="none")
    assert np.isnan(v[3]) and np.isfinite(np.delete(v, 3)).all()
    mask = np.ones(X.size, bool)
    mask[3] = False  # masked: anything goes
    assert np.isfinite(run_torch(loss, X, t, "float64", where=mask, reduction="sum")[0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_is_computed_in_float32(backend, loss, dtype):
    x = np.clip(X, -9.0, 9.0)  # inside float16's range of meaningful logits
    held = H.round_to(x, dtype)
    t = H.round_to(SOFT if loss != "varifocal" else np.where(HARD > 0, SOFT, 0.0), "float32")
    if backend == "jax":
        import jax.numpy as jnp

        from focal_jax import _family

        out = getattr(_family, f"{loss}_loss")(jnp.asarray(x, getattr(jnp, dtype)), jnp.asarray(t, jnp.float32),
                                               reduction="none")
        got_dtype, v = str(out.dtype), np.asarray(out.astype(jnp.float32), np.float64)
    else:
        import torch

        from focal_torch import _family

        out = getattr(_family, f"{loss}_loss")(torch.tensor(x, dtype=getattr(torch, dtype)),
                                               torch.as_tensor(t, dtype=torch.float32), reduction="none")
        got_dtype, v = str(out.dtype).removeprefix("torch."), out.float().double().numpy()
    assert got_dtype == dtype
    expected, _ = REFERENCES[loss](held, t, reduction="none")
    H.assert_close(v, expected, dtype, f"{dtype} value")


# ----------------------------------------------------------------------------------------
# Transforms and higher derivatives.
# ----------------------------------------------------------------------------------------

EXPONENTS = {
    "asymmetric": [{"gamma_pos": g, "gamma_neg": g, "clip": m} for g in (0.0, 0.3, 1.0, 2.5) for m in (0.0, 0.05)],
    "quality_focal": [{"beta": b} for b in (0.0, 0.3, 1.0, 1.5, 2.0)],
    "varifocal": [{"gamma": g} for g in (0.0, 0.3, 1.0, 2.5)],
}
EXPONENT_CASES = [pytest.param(loss, kw, id=f"{loss}-{kw}") for loss in LOSSES for kw in EXPONENTS[loss]]
EDGE_X = np.array([100.0, -100.0, 60.0, -60.0, 30.0, -30.0, 0.0, 1e-6, -2.9444, 3.0])  # -2.9444 ≈ logit(0.05)


EDGE_T = (0.0, 1.0, 0.3)
EDGE_XT = np.array([(x, t) for t in EDGE_T for x in EDGE_X])  # every logit with every kind of target


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("loss", "kw"), EXPONENT_CASES)
def test_jax_hessian_is_finite_at_saturated_logits(loss, kw, dtype):
    import jax
    import jax.numpy as jnp

    from focal_jax import _family

    fn = getattr(_family, f"{loss}_loss")
    with jax.enable_x64(dtype == "float64"):
        f = lambda z, t: fn(z, t, reduction="sum", **kw)  # noqa: E731
        xs, ts = (jnp.asarray(EDGE_XT[:, i:i + 1], dtype) for i in (0, 1))
        value, grad, hess = jax.jit(jax.vmap(lambda z, t: (f(z, t), jax.grad(f)(z, t), jax.hessian(f)(z, t))))(xs, ts)
        for what, v in (("value", value), ("gradient", grad), ("hessian", hess)):
            assert np.isfinite(np.asarray(v)).all(), f"{what}: {np.asarray(v).ravel()}"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("loss", "kw"), EXPONENT_CASES)
def test_torch_second_derivative_is_finite_at_saturated_logits(loss, kw, dtype):
    import torch

    from focal_torch import _family

    fn = getattr(_family, f"{loss}_loss")
    x = torch.tensor(EDGE_XT[:, 0], dtype=getattr(torch, dtype), requires_grad=True)
    out = fn(x, torch.tensor(EDGE_XT[:, 1], dtype=getattr(torch, dtype)), reduction="none", **kw)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)  # elementwise: the Hessian's diagonal
    for what, v in (("value", out), ("gradient", g), ("second derivative", h)):
        assert torch.isfinite(v).all(), f"{what}: {v}"


@pytest.mark.parametrize("loss", LOSSES)
def test_torch_gradcheck_float64(loss):
    import torch

    from focal_torch import _family

    fn = getattr(_family, f"{loss}_loss")
    rng = np.random.default_rng(7)
    x = torch.tensor(rng.normal(scale=3.0, size=(4, 3)), requires_grad=True)
    t = torch.tensor(np.where(rng.uniform(size=(4, 3)) < 0.5, rng.uniform(0.1, 0.9, size=(4, 3)), 0.0))
    w = torch.tensor(rng.uniform(0.5, 2.0, size=3), requires_grad=True)
    where = torch.tensor(rng.uniform(size=(4, 3)) < 0.8)
    kw = dict(FRACTIONAL[loss], where=where)
    for reduction in ("none", "mean"):
        f = lambda xx, ww, reduction=reduction: fn(xx, t, weight=ww, reduction=reduction, **kw)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, w))
        assert torch.autograd.gradgradcheck(f, (x, w))


@pytest.mark.parametrize("loss", LOSSES)
def test_torch_func_grad_vmap_and_forward_ad(loss):
    import torch
    from torch.func import grad, jvp, vmap

    from focal_torch import _family

    fn = getattr(_family, f"{loss}_loss")
    x = torch.tensor(np.stack([X, -X, X / 3]))
    t = torch.tensor(np.stack([SOFT, HARD, SOFT]))
    kw = FRACTIONAL[loss]
    per_row = vmap(lambda xx, tt: fn(xx, tt, **kw))(x, t)
    loop = torch.stack([fn(x[i], t[i], **kw) for i in range(3)])
    torch.testing.assert_close(per_row, loop, rtol=1e-12, atol=0)
    g = grad(lambda xx: fn(xx, t, reduction="sum", **kw))(x)
    xr = x.clone().requires_grad_()
    fn(xr, t, reduction="sum", **kw).backward()
    torch.testing.assert_close(g, xr.grad, rtol=1e-12, atol=0)
    _, tangent = jvp(lambda xx: fn(xx, t, reduction="sum", **kw), (x,), (torch.ones_like(x),))
    torch.testing.assert_close(tangent, xr.grad.sum(), rtol=1e-10, atol=0)
    bad = t.clone()
    bad[1, 2] = 2.0
    out = vmap(lambda xx, tt: fn(xx, tt, reduction="none", **kw))(x, bad)  # no eager check inside vmap: NaN
    assert torch.isnan(out[1, 2]) and torch.isfinite(out[0]).all()


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES)
def test_torch_compile_fullgraph_matches_eager(loss):
    import torch

    from focal_torch import _family

    fn = getattr(_family, f"{loss}_loss")
    kw = FRACTIONAL[loss]
    x = torch.tensor(np.stack([X, -X]), requires_grad=True)
    t = torch.tensor(np.stack([SOFT, HARD]))
    compiled = torch.compile(lambda a, b: fn(a, b, reduction="none", **kw), fullgraph=True)
    out = compiled(x, t)
    out.sum().backward()
    xe = x.detach().clone().requires_grad_()
    eager = fn(xe, t, reduction="none", **kw)
    eager.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-12, atol=0)
    torch.testing.assert_close(x.grad, xe.grad, rtol=1e-12, atol=0)
    bad = t.clone()
    bad[0, 1] = 255.0  # no eager check when compiled: that element is NaN
    out = compiled(x, bad)
    assert torch.isnan(out[0, 1]) and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("loss", LOSSES)
def test_jax_jit_vmap_grad_and_axis_name(loss):
    import jax
    import jax.numpy as jnp

    from focal_jax import _family

    fn = getattr(_family, f"{loss}_loss")
    kw = FRACTIONAL[loss]
    with jax.enable_x64(True):
        x = jnp.asarray(np.stack([X, -X, X / 3]))
        t = jnp.asarray(np.stack([SOFT, HARD, SOFT]))
        eager = fn(x, t, **kw)
        compiled = jax.jit(lambda a, b: fn(a, b, **kw))
        np.testing.assert_allclose(compiled(x, t), eager, rtol=1e-12)
        per_row = jax.vmap(lambda a, b: fn(a, b, **kw))(x, t)
        np.testing.assert_allclose(per_row, [fn(x[i], t[i], **kw) for i in range(3)], rtol=1e-12)
        g = jax.jit(jax.grad(lambda a: fn(a, t, reduction="sum", **kw)))(x)
        np.testing.assert_allclose(g, jax.grad(lambda a: fn(a, t, reduction="sum", **kw))(x), rtol=1e-12)
        # a mapped axis stands in for devices: every row returns the mean over all rows
        shards = jax.vmap(lambda a, b: fn(a, b, axis_name="rows", **kw), axis_name="rows")(x, t)
        np.testing.assert_allclose(shards, np.full(3, float(eager)), rtol=1e-12)
        grads = jax.jit(jax.vmap(jax.grad(lambda a, b: fn(a, b, **kw))))(x, t)
        assert np.isfinite(np.asarray(grads)).all()


# ----------------------------------------------------------------------------------------
# Agreement with the libraries that introduced each variant, written here from their definitions
# (float64 torch ops, autograd for the gradients).
# ----------------------------------------------------------------------------------------

MODERATE = np.clip(X, -18.0, 18.0)  # σ(x) > 1e-8: timm's clamp is inactive


def timm_asymmetric(x, y, *, gamma_neg, gamma_pos, clip, eps=1e-8):
    """timm's AsymmetricLossMultiLabel, elementwise: probabilities clamped at eps before the log, the
    negatives' probability shifted as (1 - σ(x) + clip).clamp(max=1), one joint p_t per element."""
    import torch

    p = torch.sigmoid(x)
    xs_neg = (1 - p + clip).clamp(max=1) if clip > 0 else 1 - p
    loss = y * torch.log(p.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        pt = p * y + xs_neg * (1 - y)
        loss = loss * torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
    return -loss


def mmdet_quality_focal(x, label, score, *, beta):
    """mmdetection's quality_focal_loss on (label, score) targets, summed over classes per sample: every
    class is a negative supervised by 0, but the label's class (background = C), supervised by the score."""
    import torch
    import torch.nn.functional as F

    s = torch.sigmoid(x)
    loss = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none") * s.pow(beta)
    pos = torch.nonzero(label < x.shape[1]).squeeze(1)
    lab = label[pos]
    loss = loss.index_put((pos, lab), F.binary_cross_entropy_with_logits(
        x[pos, lab], score[pos], reduction="none") * (score[pos] - s[pos, lab]).abs().pow(beta))
    return loss.sum(dim=1)


def mmdet_varifocal(x, q, *, alpha, gamma):
    """mmdetection's varifocal_loss with iou_weighted=True, elementwise."""
    import torch.nn.functional as F

    s = x.sigmoid()
    focal_weight = q * (q > 0.0).double() + alpha * (s - q).abs().pow(gamma) * (q <= 0.0).double()
    return F.binary_cross_entropy_with_logits(x, q, reduction="none") * focal_weight


def _value_and_grad(fn, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    xt = torch.tensor(x, requires_grad=True)
    out = fn(xt)
    out.sum().backward()
    return out.detach().numpy(), xt.grad.numpy()


def _assert_agree(ours, theirs, what, x_value=MODERATE, x_grad=MODERATE):
    """Equal up to the plain formulas' own float64 rounding: 1 - σ(x) and log(1 - σ(x)) computed from σ(x)
    keep only eps / min(σ(x), σ(-x)) of relative precision."""
    for a, b, x, part in zip(ours, theirs, (x_value, x_grad), ("value", "gradient"), strict=True):
        rtol = 1e-9 + 8 * np.finfo(np.float64).eps * (1.0 + np.exp(np.abs(x)))  # eps / min(σ(x), σ(-x))
        b = np.asarray(b)
        assert np.all(np.abs(a - b) <= rtol * np.abs(b) + 1e-300), f"{what} {part}: {np.abs(a - b) / np.abs(b)}"


@pytest.mark.parametrize("hyper", [{"gamma_pos": 0.0, "gamma_neg": 4.0, "clip": 0.05},
                                   {"gamma_pos": 1.0, "gamma_neg": 2.5, "clip": 0.2},
                                   {"gamma_pos": 0.5, "gamma_neg": 0.0, "clip": 0.0}], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_asymmetric_loss_agrees_with_timm_where_timm_does_not_clamp(backend, hyper):
    import torch

    y = torch.tensor(HARD)
    ours = RUNNERS[backend]("asymmetric", MODERATE, HARD, "float64", reduction="none", **hyper)
    _assert_agree(ours, _value_and_grad(lambda z: timm_asymmetric(z, y, **hyper), MODERATE), "timm")
    # Below σ(x) = 1e-8 timm's clamp freezes a positive's loss at -log(1e-8) = 18.42 with a zero gradient;
    # ours stays the exact -log σ(x), as the float64 reference.
    x = np.array([-30.0, -60.0])
    t = np.ones(2)
    v, g = RUNNERS[backend]("asymmetric", x, t, "float64", reduction="none", **hyper)
    ref = variants.asymmetric_loss(x, t, reduction="none", **hyper)
    H.assert_close(v, ref[0], "float64", "value")
    H.assert_close(g, ref[1], "float64", "gradient")
    tv, tg = _value_and_grad(lambda z: timm_asymmetric(z, torch.tensor(t), **hyper), x)
    np.testing.assert_allclose(tv, -math.log(1e-8), rtol=1e-6)
    assert np.all(v > 29.0)
    assert np.all(np.abs(tg) < 1e-9) and np.all(np.abs(g) > 0.99)  # ours: d(-log σ(x))/dx = -σ(-x) ≈ -1


@pytest.mark.parametrize("beta", [2.0, 0.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_quality_focal_loss_agrees_with_mmdet(backend, beta):
    import torch

    n, c = 9, 4
    rng = np.random.default_rng(3)
    x = rng.normal(scale=3.0, size=(n, c))
    label = rng.integers(0, c + 1, size=n)  # c: background
    score = rng.uniform(0.05, 1.0, size=n)
    dense = np.zeros((n, c))
    fg = label < c
    dense[np.flatnonzero(fg), label[fg]] = score[fg]
    v, g = RUNNERS[backend]("quality_focal", x, dense, "float64", beta=beta, reduction="none")
    theirs = _value_and_grad(lambda z: mmdet_quality_focal(z, torch.tensor(label), torch.tensor(score), beta=beta), x)
    _assert_agree((v.sum(axis=1), g), theirs, "mmdet QFL", np.abs(x).max(axis=1), x)


@pytest.mark.parametrize("hyper", [{"alpha": 0.75, "gamma": 2.0}, {"alpha": 0.4, "gamma": 0.5}], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_varifocal_loss_agrees_with_mmdet(backend, hyper):
    import torch

    q = np.where(HARD > 0, np.maximum(SOFT, 0.05), 0.0)
    ours = RUNNERS[backend]("varifocal", MODERATE, q, "float64", reduction="none", **hyper)
    _assert_agree(ours, _value_and_grad(lambda z: mmdet_varifocal(z, torch.tensor(q), **hyper), MODERATE), "mmdet")


# ----------------------------------------------------------------------------------------
# Modules, and the example.
# ----------------------------------------------------------------------------------------

MODULES = {"asymmetric": "AsymmetricLoss", "quality_focal": "QualityFocalLoss", "varifocal": "VarifocalLoss"}


@pytest.mark.parametrize("loss", LOSSES)
def test_module_stores_its_options_and_calls_the_functional(loss):
    import torch

    from focal_torch import _family

    weight = torch.tensor([0.5, 2.0, 1.0])
    where = torch.tensor([[True, False, True], [True, True, True]])
    kw = dict(FRACTIONAL[loss], weight=weight, where=where, reduction="sum")
    module = getattr(_family, MODULES[loss])(**kw)
    assert set(dict(module.named_buffers())) == {"weight", "where"}
    text = repr(module)
    assert text.startswith(MODULES[loss] + "(") and "reduction='sum'" in text
    assert "weight=tensor(shape=(3,), dtype=torch.float32)" in text
    for name, value in FRACTIONAL[loss].items():
        assert f"{name}={value!r}" in text
    x = torch.tensor([[2.0, float("nan"), -1.0], [0.5, -3.0, 30.0]], dtype=torch.float64)
    t = torch.tensor([[0.9, 0.0, 0.0], [0.0, 0.6, 1.0]], dtype=torch.float64)
    expected = getattr(_family, f"{loss}_loss")(x, t, **kw)
    assert torch.isfinite(expected)
    torch.testing.assert_close(module.double()(x, t), expected, rtol=0, atol=0)
    assert module.weight.dtype == torch.float64  # buffers follow .to()


@pytest.mark.parametrize("loss", LOSSES)
def test_module_validates_its_options_at_construction(loss):
    from focal_torch import _family

    cls = getattr(_family, MODULES[loss])
    name = next(iter(FRACTIONAL[loss]))
    with pytest.raises(ValueError, match=re.escape(name)):
        cls(**{name: -1.0})
    with pytest.raises(ValueError, match=re.escape(focal_spec.invalid_value(
            "reduction", f"one of {focal_spec.REDUCTIONS}", "avg"))):
        cls(reduction="avg")


def test_family_curve_example(tmp_path):
    from parity_tests.test_examples import assert_png, run_quick

    out = tmp_path / "family_curve.png"
    result = run_quick("family_curve", out)
    assert_png(out)
    assert set(result["curves"]) >= {"asymmetric", "quality_focal", "varifocal", "focal", "cross_entropy", "poly1",
                                     "reduced", "flsd53"}
    assert result["max_abs_diff"] < 1e-5
    for backend, diff in result["max_abs_diff_from_reference"].items():
        assert diff < 1e-5, f"{backend} differs from the float64 reference by {diff}"


SPEC_DEFAULTS = {
    "asymmetric_loss": {"gamma_pos": variants.ASL_GAMMA_POS, "gamma_neg": variants.ASL_GAMMA_NEG,
                        "clip": variants.ASL_CLIP, "label_smoothing": focal_spec.LABEL_SMOOTHING},
    "quality_focal_loss": {"beta": variants.QFL_BETA},
    "varifocal_loss": {"alpha": variants.VFL_ALPHA, "gamma": variants.VFL_GAMMA},
    "class_balanced_weights": {"beta": variants.CLASS_BALANCE_BETA},
}


@pytest.mark.parametrize("name", list(SPEC_DEFAULTS))
def test_twins_share_arguments_and_defaults(name):
    import inspect

    from focal_jax import _family as jax_family
    from focal_torch import _family as torch_family

    renamed = {"axis_name": "process_group", "logits": "input", "targets": "target"}
    j = inspect.signature(getattr(jax_family, name)).parameters
    t = inspect.signature(getattr(torch_family, name)).parameters
    assert [renamed.get(n, n) for n in j] == list(t)
    for n, p in j.items():
        assert p.kind == t[renamed.get(n, n)].kind and p.default == t[renamed.get(n, n)].default, n
    for n, d in SPEC_DEFAULTS.get(name, {}).items():
        assert j[n].default == d, n
    if name.removesuffix("_loss") in MODULES:
        m = inspect.signature(getattr(torch_family, MODULES[name.removesuffix("_loss")]).__init__).parameters
        f = {n: p for n, p in t.items() if n not in ("input", "target")}
        assert [n for n in m if n != "self"] == list(f)
        assert all(m[n].default == f[n].default for n in f)


# ----------------------------------------------------------------------------------------
# The closed-form paths of ASL and QFL: torch's eager kernels (pieces, layouts, which calls take them,
# and the plain formulas they stand in for) and JAX's custom JVP (target derivatives, second derivatives).
# ----------------------------------------------------------------------------------------

KERNEL_LOSSES = ("asymmetric", "quality_focal")
PLAIN_GRID = [p for p in GRID if p.values[0] in KERNEL_LOSSES]


@pytest.fixture
def plain_torch_formulas(monkeypatch):
    from focal_torch import _family

    monkeypatch.setattr(_family, "EAGER_KERNELS", False)


@pytest.mark.parametrize(("loss", "cid"), PLAIN_GRID)
def test_torch_plain_formulas_match_the_float64_reference(plain_torch_formulas, loss, cid):
    """What torch.compile, torch.func and double backward differentiate, on the grid the kernels pass."""
    value, grad, sv, sg = _expected(loss, cid)
    inp = _inputs(loss, _CASE_OF[cid])
    v, g = run_torch(loss, inp["logits"], inp["targets"], inp["dtype"], **inp["kwargs"])
    H.assert_close(v, value, inp["dtype"], "plain torch value", scale=sv)
    H.assert_close(g, grad, inp["dtype"], "plain torch gradient", scale=sg)


@pytest.mark.parametrize("layout", ["flat", "rows", "whole"])
@pytest.mark.parametrize("hyper", [0, 1], ids=["default", "fractional"])
@pytest.mark.parametrize("loss", KERNEL_LOSSES)
def test_torch_kernels_match_the_reference_across_pieces(monkeypatch, loss, hyper, layout):
    """Inputs of several pieces (contiguous: flat pieces; transposed, with per-class weights and a mask: row
    pieces) and the accelerator's whole-tensor path, elementwise and reduced, against the reference."""
    import torch

    from focal_torch import _common, _family

    monkeypatch.setattr(_common, "CHUNK", 256)  # pieces of 256 elements per thread: 4000 elements make several
    if layout == "whole":
        monkeypatch.setattr(_common, "ACCELERATOR_PATHS", True)
    rng = np.random.default_rng(11)
    n, c = 40, 100
    x = rng.normal(scale=4.0, size=(c, n) if layout == "rows" else (n, c)).astype(np.float32)
    x = x.T if layout == "rows" else x
    t = np.where(rng.uniform(size=(n, c)) < 0.1, rng.uniform(0.05, 1.0, size=(n, c)), 0.0).astype(np.float32)
    kw: dict[str, Any] = dict(HYPER[loss][hyper])
    if layout == "rows":
        kw["weight"] = rng.uniform(0.5, 2.0, size=c).astype(np.float32)
        kw["where"] = rng.uniform(size=(n, c)) < 0.9
    xt = torch.from_numpy(np.ascontiguousarray(x.T).T if layout == "rows" else x).requires_grad_()
    assert xt.is_contiguous() == (layout != "rows")
    targs = {k: torch.as_tensor(v) for k, v in kw.items() if k in ("weight", "where")}
    fn = getattr(_family, f"{loss}_loss")
    calls = []
    apply = _family._FamilyKernel.apply
    monkeypatch.setattr(_family._FamilyKernel, "apply", lambda *a: calls.append(1) or apply(*a))
    for reduction in ("none", "mean"):
        out = fn(xt, torch.from_numpy(t), **dict(kw, **targs), reduction=reduction)
        (g,) = torch.autograd.grad(out.sum(), xt)
        value, grad = REFERENCES[loss](x.astype(np.float64), t, **kw, reduction=reduction)
        sv, sg = _scales(loss, x.astype(np.float64), t.astype(np.float64), kw)
        if reduction == "mean":
            k = 1.0 / (kw["where"].sum() if "where" in kw else x.size)
            sv, sg = sv.sum() * k, sg * k
        H.assert_close(out.detach().numpy(), value, "float32", f"{reduction} value", scale=sv)
        H.assert_close(g.numpy(), grad, "float32", f"{reduction} gradient", scale=sg)
    assert len(calls) == 2


@pytest.mark.parametrize("loss", KERNEL_LOSSES)
def test_torch_kernels_take_eager_calls_that_need_only_the_logits_gradient(monkeypatch, loss):
    import torch
    from torch.func import grad

    from focal_torch import _family

    calls = []
    apply = _family._FamilyKernel.apply
    monkeypatch.setattr(_family._FamilyKernel, "apply", lambda *a: calls.append(1) or apply(*a))
    fn = getattr(_family, f"{loss}_loss")
    x = torch.tensor(X, requires_grad=True)
    t = torch.tensor(SOFT)

    def taken(f) -> bool:
        calls.clear()
        f()
        return bool(calls)

    assert taken(lambda: fn(x, t))
    assert taken(lambda: fn(x.detach(), t))
    with torch.no_grad():
        assert taken(lambda: fn(x, t))
    assert not taken(lambda: fn(x, t.clone().requires_grad_()))  # gradients for the targets: plain formulas
    assert not taken(lambda: fn(x, t, weight=torch.ones(X.size, dtype=torch.float64, requires_grad=True)))
    assert not taken(lambda: grad(lambda z: fn(z, t))(x.detach()))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x.detach(), torch.ones_like(x))
        assert not taken(lambda: fn(dual, t))
    monkeypatch.setattr(_family, "EAGER_KERNELS", False)
    assert not taken(lambda: fn(x, t))


@pytest.mark.parametrize(("loss", "kw"), [p for p in EXPONENT_CASES if p.values[0] in KERNEL_LOSSES])
def test_torch_double_backward_through_the_kernels_is_the_plain_formulas(monkeypatch, loss, kw):
    import torch

    from focal_torch import _family

    fn = getattr(_family, f"{loss}_loss")
    t = torch.tensor(np.concatenate([SOFT, HARD]))
    x0 = np.concatenate([X, -X])

    def derivatives():
        x = torch.tensor(x0, requires_grad=True)
        (g,) = torch.autograd.grad(fn(x, t, reduction="sum", **kw), x, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), x)
        return g.detach(), h

    g, h = derivatives()
    monkeypatch.setattr(_family, "EAGER_KERNELS", False)
    g_plain, h_plain = derivatives()
    torch.testing.assert_close(g, g_plain, rtol=1e-13, atol=0)
    torch.testing.assert_close(h, h_plain, rtol=1e-13, atol=0)


SMOOTH_X = np.array([-7.0, -3.1, -2.5, -1.0, -0.3, 0.4, 1.2, 2.8, 6.5, 12.0])  # away from the margin's kink
SMOOTH_T = np.array([0.0, 0.9, 0.2, 1.0, 0.35, 0.6, 0.0, 0.75, 0.1, 1.0])


def _central(f, z: np.ndarray, h: float) -> np.ndarray:
    """Elementwise central differences of an elementwise f (float64)."""
    return (np.asarray(f(z + h)) - np.asarray(f(z - h))) / (2 * h)


@pytest.mark.parametrize(("loss", "kw"), [
    ("asymmetric", {"gamma_pos": 0.0, "gamma_neg": 0.0, "clip": 0.05}),
    ("asymmetric", {"gamma_pos": 0.3, "gamma_neg": 2.5, "clip": 0.05}),
    ("asymmetric", {"gamma_pos": 2.0, "gamma_neg": 0.3, "clip": 0.0}),
    ("quality_focal", {"beta": 0.3}),
    ("quality_focal", {"beta": 2.0}),
], ids=str)
def test_jax_target_and_second_derivatives_match_finite_differences(loss, kw):
    """The custom JVP's derivative in the targets, and the derivative of its derivative in the logits."""
    import jax
    import jax.numpy as jnp

    from focal_jax import _family

    fn = getattr(_family, f"{loss}_loss")
    soft = np.clip(SMOOTH_T, 0.05, 0.95)  # finite differences need room on both sides
    with jax.enable_x64(True):
        x, t = jnp.asarray(SMOOTH_X), jnp.asarray(soft)
        value = lambda z, u: fn(z, u, reduction="none", **kw)  # noqa: E731
        d_t = jax.grad(lambda u: value(x, u).sum())(t)
        # central differences with h = 1e-6: truncation h² times the third derivative (up to ~1e-7 relative
        # next to d = 0 at β < 1), rounding ~1e-16 |ℓ| / h; a dropped factor or a flipped sign is far above
        np.testing.assert_allclose(d_t, _central(lambda u: value(x, u), soft, 1e-6), rtol=1e-6, atol=1e-8,
                                   err_msg="d/dt")
        d_x = lambda z, u: jax.grad(lambda zz: value(zz, u).sum())(z)  # noqa: E731
        xh = jnp.asarray(SMOOTH_X)
        for targets in (soft, SMOOTH_T):
            u = jnp.asarray(targets)
            d2 = jax.vmap(jax.grad(jax.grad(lambda z, uu: fn(z, uu, reduction="sum", **kw))))(xh, u)
            fd = _central(lambda z, u=u: d_x(jnp.asarray(z), u), SMOOTH_X, 1e-6)
            np.testing.assert_allclose(d2, fd, rtol=1e-6, atol=1e-8, err_msg=f"d²/dx² at targets {targets}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_jax_logistic_derivative_keeps_its_digits_at_saturated_logits(dtype):
    """The sigmoid inside ASL's and QFL's derivatives (what second derivatives differentiate): σ(x) σ(-x),
    where σ(x)(1 - σ(x)) would be 0 or a few ulps of 1 - σ(x) for a large x."""
    import jax
    import jax.numpy as jnp

    from focal_jax import _family

    x = np.array([-60.0, -30.0, -9.0, 0.0, 2.0, 9.0, 30.0, 60.0])
    expected = np.exp(-np.logaddexp(0.0, x) - np.logaddexp(0.0, -x))  # σ(x) σ(-x)
    with jax.enable_x64(dtype == "float64"):
        got = jax.vmap(jax.grad(_family._logistic))(jnp.asarray(x, dtype))
        H.assert_close(np.asarray(got, np.float64), expected, dtype, "dσ/dx")
