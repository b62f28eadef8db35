"""Finite everywhere: extreme logits, small gamma, half precision, masked garbage, empty batches."""

from __future__ import annotations

import re

import numpy as np
import pytest

from focal_spec import reference
from parity_tests import _harness as H

EXTREME_LOGITS = np.array([0.0, 1e-3, -1e-3, 5.0, -5.0, 17.3, -17.3, 18.0, -18.0, 100.0, -100.0, 1e4, -1e4])
EXTREME_TARGETS = np.array([0.0, 1.0, 0.5, 0.9])
# 0 and 0.0 differ for JAX: x ** 0.0 has a NaN derivative at x = 0, x ** 0 does not.
SMALL_GAMMAS = [0, 0.0, 0.25, 0.5, 1, 1.5, 2, 5]


def _grid():
    x, t = np.meshgrid(EXTREME_LOGITS, EXTREME_TARGETS, indexing="ij")
    return x.ravel(), t.ravel()


def _run(backend, loss, inp):
    return (H.run_jax if backend == "jax" else H.run_torch)(loss, inp)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("gamma", SMALL_GAMMAS, ids=lambda g: f"gamma={g!r}")
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_sigmoid_saturation_is_finite_and_matches_reference(backend, gamma, dtype):
    x, t = _grid()
    inp = H.Inputs(x, t, {"gamma": gamma, "alpha": 0.25, "reduction": "none"}, dtype)
    v, g = _run(backend, "sigmoid", inp)
    assert np.isfinite(v).all() and np.isfinite(g).all()
    H.expected("sigmoid", inp).check(v, g, dtype, backend)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_float_gamma_zero_gives_exactly_the_cross_entropy_gradient(backend):
    x = np.array([1000.0, -1000.0, 30.0, 0.0, -3.0, 17.5], np.float32)
    t = np.array([1.0, 0.0, 1.0, 0.5, 0.9, 1.0], np.float32)
    if backend == "jax":
        import jax
        import jax.numpy as jnp
        import optax

        import focal_jax

        xs, ts = jnp.asarray(x), jnp.asarray(t)
        g_float = jax.grad(lambda z: focal_jax.sigmoid_focal_loss(z, ts, gamma=0.0, reduction="sum"))(xs)
        g_int = jax.grad(lambda z: focal_jax.sigmoid_focal_loss(z, ts, gamma=0, reduction="sum"))(xs)
        g_ce = jax.grad(lambda z: optax.sigmoid_binary_cross_entropy(z, ts).sum())(xs)
    else:
        import torch
        import torch.nn.functional as F

        import focal_torch

        def grad(fn):
            z = torch.tensor(x, requires_grad=True)
            fn(z).backward()
            return z.grad

        tt = torch.tensor(t)
        g_float = grad(lambda z: focal_torch.sigmoid_focal_loss(z, tt, gamma=0.0, reduction="sum"))
        g_int = grad(lambda z: focal_torch.sigmoid_focal_loss(z, tt, gamma=0, reduction="sum"))
        g_ce = grad(lambda z: F.binary_cross_entropy_with_logits(z, tt, reduction="sum"))
    g_float, g_int, g_ce = (np.asarray(a) for a in (g_float, g_int, g_ce))
    assert np.isfinite(g_float).all()
    np.testing.assert_array_equal(g_float, g_int)
    # the framework's closed form σ(x) - t in float32: its rounding is relative to σ(x) + t
    terms = 1 / (1 + np.exp(-x.astype(np.float64))) + t
    H.assert_close(g_float, g_ce, "float32", "cross-entropy gradient", scale=terms)
    # and γ = 0.0 is the cross-entropy gradient of the reference, within the contract
    exp = H.expected("sigmoid", H.Inputs(x.astype(np.float64), t.astype(np.float64),
                                         {"gamma": 0.0, "reduction": "sum"}, "float32"))
    H.assert_close(g_float, exp.grad, "float32", "reference gradient", scale=exp.grad_scale)


HESSIAN_LOGITS = np.array([100.0, -100.0, 75.0, -75.0, 50.0, -50.0])


def _reference_second_derivative(x, t, gamma):
    """d²ℓ/dx² of ℓ = q^γ ce (q = 1 - p_t = t σ(-x) + (1-t) σ(x)) in closed form, in float64, and the sum of
    its terms' magnitudes: ℓ'' = γ(γ-1) q^(γ-2) q'² ce + γ q^(γ-1) (q'' ce + 2 q' ce') + q^γ ce'', with
    q' = (1-2t) σσ₋, q'' = (1-2t) σσ₋ (σ₋ - σ), ce' = σ - t = (1-t)σ - tσ₋, ce'' = σσ₋ (σ₋ = σ(-x)). Each
    power of q is taken in logarithms, so that nothing underflows before it is multiplied (a difference of
    the gradient would lose every digit where the Hessian is e^-100 and the gradient is 1)."""
    lp, ln = -np.logaddexp(0.0, -x), -np.logaddexp(0.0, x)
    s, sn = np.exp(lp), np.exp(ln)
    with np.errstate(divide="ignore"):
        log_q = np.logaddexp(np.log(t) + ln, np.log1p(-t) + lp)
        log_ssn = lp + ln
        ce = -(t * lp + (1.0 - t) * ln)
        c = 1.0 - 2.0 * t

        def pw(k, *logs):  # q^k times the product of exp(logs), 0 where a factor is 0
            return np.exp(k * log_q + sum(logs))

        terms = [
            gamma * (gamma - 1.0) * c * c * pw(gamma - 2.0, 2 * log_ssn) * ce if gamma else 0.0 * x,
            gamma * c * pw(gamma - 1.0, log_ssn) * (sn - s) * ce if gamma else 0.0 * x,
            2.0 * gamma * c * pw(gamma - 1.0, log_ssn) * ((1.0 - t) * s - t * sn) if gamma else 0.0 * x,
            pw(gamma, log_ssn),
        ]
    terms = [np.where(np.isnan(v), 0.0, v) for v in terms]  # 0 · inf where a factor is exactly 0
    return sum(terms), sum(np.abs(v) for v in terms)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0, 1.5])
@pytest.mark.parametrize("target", [0.0, 1.0, 0.5, 0.9])
@pytest.mark.parametrize("backend", ["jax", "torch", "torch.func"])
def test_sigmoid_hessian_is_finite_for_small_gamma(backend, target, gamma, dtype):
    """Second derivatives where the loss's are e^-50 to e^-100 (JAX's transforms; torch's double backward, and
    torch.func.hessian, which differentiates the plain formula)."""
    x = HESSIAN_LOGITS
    t = np.full_like(x, target)
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        import focal_jax

        with jax.enable_x64(dtype == "float64"):
            xs, ts = jnp.asarray(x, dtype), jnp.asarray(t, dtype)
            hess = np.asarray(jax.hessian(lambda z: focal_jax.sigmoid_focal_loss(z, ts, gamma=gamma,
                                                                                 reduction="sum"))(xs))
    else:
        import torch

        import focal_torch

        tt = torch.tensor(t, dtype=getattr(torch, dtype))
        fn = lambda z: focal_torch.sigmoid_focal_loss(z, tt, gamma=gamma, reduction="sum")  # noqa: E731
        xt = torch.tensor(x, dtype=getattr(torch, dtype))
        hess = (torch.autograd.functional.hessian(fn, xt) if backend == "torch"
                else torch.func.hessian(fn)(xt)).detach().numpy()
    assert np.isfinite(hess).all()
    np.testing.assert_array_equal(hess - np.diag(np.diag(hess)), 0.0)
    expected, terms = _reference_second_derivative(x, t, gamma)
    # the reference's first derivative at the same points: the closed form above is its derivative
    h = 1e-6
    fd = (reference.sigmoid_focal_loss(1.0 + h, 0.3, gamma=gamma, reduction="none")[1]
          - reference.sigmoid_focal_loss(1.0 - h, 0.3, gamma=gamma, reduction="none")[1]) / (2 * h)
    np.testing.assert_allclose(_reference_second_derivative(np.array(1.0), 0.3, gamma)[0], fd, rtol=1e-7)
    H.assert_close(np.diag(hess), expected, dtype, "d²ℓ/dx²", scale=1e-4 / H.TOLERANCES[dtype]["rtol"] * terms)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("gamma", [0.25, 0.5])
@pytest.mark.parametrize("margin", [20.0, 50.0, 100.0])
@pytest.mark.parametrize("labels", ["index", "index-smoothed", "probs"])
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_softmax_dominant_class_is_finite(backend, labels, margin, gamma, dtype):
    c = 4
    x = np.zeros((3, c))
    x[0, 0] = margin  # the label dominates
    x[1, 2] = margin  # another class dominates
    x[2, :2] = margin  # two classes tie at the top
    kw = {"gamma": gamma, "reduction": "none"}
    if labels == "probs":
        y = np.eye(c)[[0, 0, 1]] * 0.9 + 0.1 / c
    else:
        y = np.array([0, 0, 1])
        kw["label_smoothing"] = 0.1 if labels == "index-smoothed" else 0.0
    inp = H.Inputs(x, y, kw, dtype)
    v, g = _run(backend, "softmax", inp)
    assert np.isfinite(v).all() and np.isfinite(g).all()
    H.expected("softmax", inp).check(v, g, dtype, backend)


# ----------------------------------------------------------------------------------------
# Half precision.
# ----------------------------------------------------------------------------------------

HALF_SIG = [c for i, c in enumerate(H.SIGMOID_CASES) if i % 9 == 0 and c["dtype"] == "float32"]
HALF_SOFT = [c for i, c in enumerate(H.SOFTMAX_CASES) if i % 7 == 0 and c["dtype"] == "float32"]


def _half_case(case, dtype, loss):
    inp = (H.sigmoid_inputs if loss == "sigmoid" else H.softmax_inputs)(case)
    import ml_dtypes

    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    x = inp.logits.astype(np_dtype).astype(np.float64)  # the logits as the half dtype holds them
    return H.Inputs(x, inp.labels, inp.kwargs, dtype, inp.per_class)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("loss,case", [pytest.param("sigmoid", c, id="sigmoid-" + H.case_id(c)) for c in HALF_SIG]
                         + [pytest.param("softmax", c, id="softmax-" + H.case_id(c)) for c in HALF_SOFT])
def test_half_precision_matches_reference_and_other_backend(loss, case, dtype):
    inp = _half_case(case, dtype, loss)
    exp = H.expected(loss, inp)
    jv, jg = H.run_jax(loss, inp)
    tv, tg = H.run_torch(loss, inp)
    exp.check(jv, jg, dtype, "jax")
    exp.check(tv, tg, dtype, "torch")
    H.Expected(tv, tg, exp.value_scale, exp.grad_scale, exp.grad_scale_ref).check(jv, jg, dtype, "jax vs torch",
                                                                                   factor=2.0)


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_returns_the_input_dtype_and_keeps_soft_targets(backend, dtype):
    x = np.full(4, 8.0)
    t = np.full(4, 0.9)  # bfloat16 would hold 0.8984375
    if backend == "jax":
        import jax.numpy as jnp

        import focal_jax

        out = focal_jax.sigmoid_focal_loss(jnp.asarray(x, dtype), jnp.asarray(t, jnp.float32), reduction="none")
        assert out.dtype == jnp.dtype(dtype)
        grad_dtype = None
    else:
        import torch

        import focal_torch

        xt = torch.tensor(x, dtype=getattr(torch, dtype), requires_grad=True)
        out = focal_torch.sigmoid_focal_loss(xt, torch.tensor(t, dtype=torch.float32), reduction="none")
        assert out.dtype == getattr(torch, dtype)
        out.sum().backward()
        grad_dtype = xt.grad.dtype
        assert grad_dtype == getattr(torch, dtype)
        out = out.detach()
    v = np.asarray(out.float() if hasattr(out, "float") else out.astype(np.float32), np.float64)
    exact, _ = reference.sigmoid_focal_loss(x, t, reduction="none")
    quantized, _ = reference.sigmoid_focal_loss(x, np.full(4, 0.8984375), reduction="none")
    H.assert_close(v, exact, dtype)
    assert np.all(np.abs(v - quantized) > 2 * H.TOLERANCES[dtype]["rtol"] * np.abs(exact))


# ----------------------------------------------------------------------------------------
# Garbage where it should not matter; empty and degenerate inputs; bad labels at run time.
# ----------------------------------------------------------------------------------------

GARBAGE = [np.nan, np.inf, -np.inf]


# the sigmoid loss has no ignore_index: only where= excludes its elements
EXCLUSIONS = [("sigmoid", "where"), ("softmax", "where"), ("softmax", "ignore_index")]


@pytest.mark.parametrize("garbage", GARBAGE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("loss,how", EXCLUSIONS, ids=[f"{a}-{b}" for a, b in EXCLUSIONS])
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_garbage_at_excluded_positions_is_harmless(backend, loss, how, garbage):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6, 3))
    keep = np.array([True, False, True, True, False, True])
    kw = {"gamma": 0.5, "reduction": "mean"}
    if loss == "sigmoid":
        y = np.where(keep[:, None], rng.uniform(size=(6, 3)), 255.0)  # garbage targets too
        kw["where"] = np.broadcast_to(keep[:, None], (6, 3)).copy()
    else:
        y = rng.integers(0, 3, size=6)
        if how == "where":
            y = np.where(keep, y, 255)
            kw["where"] = keep
        else:
            y = np.where(keep, y, 255)
            kw["ignore_index"] = 255
    x = np.where(keep[:, None], x, garbage)
    v, g = _run(backend, loss, H.Inputs(x, y, kw, "float32"))
    assert np.isfinite(v).all() and np.isfinite(g).all()
    np.testing.assert_array_equal(g[~keep], 0.0)
    clean = {k: (val[keep] if k == "where" else val) for k, val in kw.items()}
    ev, eg = _run(backend, loss, H.Inputs(x[keep], y[keep], clean, "float32"))
    H.assert_close(v, ev, "float32")
    H.assert_close(g[keep], eg, "float32")


EMPTY = [
    ("zero-size", (0, 3), None),
    ("all-masked", (4, 3), "where"),
    ("all-ignored", (4, 3), "ignore"),
]
EMPTY_CASES = [pytest.param(loss, *e, id=f"{loss}-{e[0]}") for loss in ("sigmoid", "softmax") for e in EMPTY
               if not (loss == "sigmoid" and e[2] == "ignore")]  # the sigmoid loss has no ignore_index


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss,name,shape,how", EMPTY_CASES)
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_nothing_counted_gives_zero_and_zero_gradients(backend, loss, name, shape, how, reduction):
    x = np.ones(shape)
    kw = {"reduction": reduction, "gamma": 0.5}
    if loss == "sigmoid":
        y = np.ones(shape)
        if how == "where":
            kw["where"] = np.zeros(shape, bool)
    else:
        y = np.zeros(shape[:1], np.int64)
        if how == "where":
            kw["where"] = np.zeros(shape[:1], bool)
        elif how == "ignore":
            y = np.full(shape[:1], -100)
    v, g = _run(backend, loss, H.Inputs(x, y, kw, "float32"))
    assert v.shape == () and float(v) == 0.0
    assert g.shape == shape and np.all(g == 0.0)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_one_class(backend, loss):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(5, 1))
    y = rng.uniform(size=(5, 1)) if loss == "sigmoid" else np.zeros(5, np.int64)
    inp = H.Inputs(x, y, {"reduction": "none", "gamma": 0.5}, "float64")
    v, g = _run(backend, loss, inp)
    if loss == "softmax":  # p = 1 for the only class: nothing to learn
        np.testing.assert_array_equal(v, 0.0)
        np.testing.assert_array_equal(g, 0.0)
    else:
        assert np.all(v > 0)
    H.expected(loss, inp).check(v, g, "float64", backend)


def test_torch_out_of_range_label_raises_the_spec_error():
    import torch

    import focal_spec
    import focal_torch

    msg = focal_spec.label_out_of_range(7, 3, -100)
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        focal_torch.softmax_focal_loss(torch.zeros(4, 3), torch.tensor([0, 7, 1, -100]))
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        reference.softmax_focal_loss(np.zeros((4, 3)), np.array([0, 7, 1, -100]), axis=1)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_jax_out_of_range_label_gives_nan_for_that_element(jit):
    import jax
    import jax.numpy as jnp

    import focal_jax

    fn = lambda x, y: focal_jax.softmax_focal_loss(x, y, reduction="none")
    fn = jax.jit(fn) if jit else fn
    out = np.asarray(fn(jnp.zeros((5, 3)), jnp.array([0, 7, 1, -100, -2])))
    assert np.isnan(out[1]) and np.isnan(out[4])
    np.testing.assert_allclose(out[[0, 2]], reference.softmax_focal_loss(np.zeros((2, 3)), np.array([0, 1]),
                                                                         reduction="none")[0], rtol=1e-6)
    assert out[3] == 0.0
    assert np.isnan(float(jax.jit(lambda x, y: focal_jax.softmax_focal_loss(x, y))(jnp.zeros((2, 3)),
                                                                                   jnp.array([0, 3]))))
