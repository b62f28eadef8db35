"""Second derivatives of both backends, element by element, against the definitions' closed forms evaluated in
arbitrary-precision arithmetic (``parity_tests/_exact.py``).

The bound is the precision contract's, applied to each Hessian entry: ``rtol[dtype] * K * S`` with S the sum of
the magnitudes of the closed form's terms and K the modulator's condition number, plus a floor of a few times the
dtype's smallest normal number (see ``_exact.FLOOR_ULPS``). A finite difference of a float64 gradient cannot stand
in for the reference here: at |x| = 50 the curvature is e^-50 on a gradient of order 1.

Three routes are checked per backend where they differ: torch's double backward
(``torch.autograd.functional.hessian``), ``torch.func.hessian`` (forward over reverse through the
``setup_context`` Functions), and ``jax.hessian``; γ as a number (static) and as an array (a tensor, a traced JAX
argument).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from parity_tests import _exact
from parity_tests import _harness as H

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("mpmath")

import focal_jax  # noqa: E402
import focal_torch  # noqa: E402

DTYPES = ("float32", "float64")
GAMMAS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.5)
ROUTES = ("torch-double-backward", "torch-func", "jax")

_MAGNITUDES = (0.0, 0.5, 3.0, 10.0, 20.0, 30.0, 44.0, 50.0, 60.0, 75.0, 80.0)
SIGMOID_X = {
    # float32's e^-|x| reaches its smallest normal number at |x| = 87: beyond 80 the curvature's own factors
    # are subnormal, and XLA flushes those to 0
    "float32": _MAGNITUDES,
    "float64": _MAGNITUDES + (87.0, 100.0, 200.0, 400.0),
}
SIGMOID_T = (0.0, 1.0, 0.5, 0.9, 0.1)


def _rtol(dtype: str) -> float:
    return H.TOLERANCES[dtype]["rtol"]


@functools.cache
def _sigmoid_grid(dtype: str, gamma: float) -> tuple[np.ndarray, ...]:
    m = np.asarray(SIGMOID_X[dtype])
    xs, ts = np.meshgrid(np.concatenate([m, -m[1:]]), np.asarray(SIGMOID_T))
    xs, ts = xs.ravel(), ts.ravel()
    exact = np.array([_exact.sigmoid_second_derivative(a, b, gamma) for a, b in zip(xs, ts, strict=True)])
    return xs, ts, exact[:, 0], exact[:, 1], exact[:, 2]


def _sigmoid_hessian_diagonal(route: str, x: np.ndarray, t: np.ndarray, gamma: float, gamma_kind: str,
                              dtype: str) -> np.ndarray:
    if route == "jax":
        with jax.enable_x64(dtype == "float64"):
            xj, tj = jnp.asarray(x, dtype), jnp.asarray(t, dtype)

            def loss(z, g):
                return focal_jax.sigmoid_focal_loss(z, tj, gamma=g, reduction="sum")

            if gamma_kind == "number":
                h = jax.hessian(loss)(xj, gamma)
            else:  # traced: the array-γ path
                h = jax.jit(lambda z, g: jax.hessian(loss)(z, g))(xj, jnp.asarray(gamma, dtype))
            return np.diag(np.asarray(h, np.float64))
    dt = getattr(torch, dtype)
    xt, tt = torch.tensor(x, dtype=dt), torch.tensor(t, dtype=dt)
    g = gamma if gamma_kind == "number" else torch.tensor(gamma, dtype=dt)

    def loss_t(z):
        return focal_torch.sigmoid_focal_loss(z, tt, gamma=g, reduction="sum")

    h = torch.autograd.functional.hessian(loss_t, xt) if route == "torch-double-backward" else \
        torch.func.hessian(loss_t)(xt)
    return torch.diagonal(h).double().numpy()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", GAMMAS, ids=lambda g: f"gamma={g}")
def test_sigmoid_second_derivative_matches_the_exact_one(route, dtype, gamma):
    """At every logit from 0 to the tails (|x| up to 80 in float32, 400 in float64), hard and soft targets."""
    xs, ts, exact, scale, log_q = _sigmoid_grid(dtype, gamma)
    diag = _sigmoid_hessian_diagonal(route, xs, ts, gamma, "number", dtype)
    k = H.modulator_condition(np.full(xs.shape, gamma), log_q)
    _exact.assert_close(diag, exact, scale, k, dtype, _rtol(dtype), f"{route} d²ℓ/dx², γ={gamma}")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [0.5, 2.0], ids=lambda g: f"gamma={g}")
def test_sigmoid_second_derivative_with_an_array_gamma(route, dtype, gamma):
    xs, ts, exact, scale, log_q = _sigmoid_grid(dtype, gamma)
    diag = _sigmoid_hessian_diagonal(route, xs, ts, gamma, "array", dtype)
    # an array γ always takes the general path exp(γ log q), whose condition number holds γ|log q|
    k = 1.0 + gamma + gamma * np.abs(log_q)
    _exact.assert_close(diag, exact, scale, k, dtype, _rtol(dtype), f"{route} d²ℓ/dx², array γ={gamma}")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.5, 3.5], ids=lambda g: f"gamma={g}")
def test_sigmoid_float32_curvature_keeps_its_sign_at_the_edge_of_the_range(route, gamma):
    """At |x| = 86 and 87 float32's e^-|x| is within a few multiples of its smallest normal number, and XLA
    flushes subnormal intermediates to 0: the curvature (-1e-37 to -1e-35 here) may lose digits there, not its
    sign or its size. (The γ term of dℓ/dx once formed γ σ(x)σ(-x) before multiplying by ce, and lost it.)"""
    xs = np.array([86.0, 87.0, 86.0, 87.0])
    ts = np.array([0.0, 0.0, 0.1, 0.1])
    exact = np.array([_exact.sigmoid_second_derivative(a, b, gamma)[0] for a, b in zip(xs, ts, strict=True)])
    assert (np.abs(exact) > 16 * np.finfo(np.float32).tiny).all()
    diag = _sigmoid_hessian_diagonal(route, xs, ts, gamma, "number", "float32")
    np.testing.assert_array_equal(np.sign(diag), np.sign(exact))
    np.testing.assert_allclose(diag, exact, rtol=0.05, atol=0)


# ----------------------------------------------------------------------------------------
# Softmax, class indices: the C × C Hessian of each position.
# ----------------------------------------------------------------------------------------

_SOFTMAX_M = {"float32": (0.5, 3.0, 10.0, 20.0, 30.0, 44.0, 50.0, 75.0),
              "float64": (0.5, 3.0, 10.0, 20.0, 30.0, 44.0, 50.0, 75.0, 100.0, 200.0)}
_SOFTMAX_M_OTHER = {
    # with another class ahead by m (and the label behind it by up to 2m) the smallest entries are of order
    # e^-3m: from m = 30 that is within a few multiples of float32's smallest normal number, where XLA's flushed
    # subnormal intermediates take their digits
    "float32": (0.5, 3.0, 10.0, 20.0),
    "float64": _SOFTMAX_M["float64"],
}


def _label_leads(m: float) -> list[list[float]]:
    """Rows whose labelled class 0 has the largest logit (alone or tied): every other class has p <= 1/2."""
    return [[m, 0.0, 0.0, 0.0], [m, m, 0.0, -m], [m, m / 2, -m, 0.0], [m, -m, -m, -m]]


def _another_leads(m: float) -> list[list[float]]:
    return [[0.0, m, 0.0, 0.0], [-m, m, 0.0, 0.0]]


@functools.cache
def _softmax_rows(dtype: str, gamma: float, leader: str) -> tuple[np.ndarray, ...]:
    make, leads = (_label_leads, _SOFTMAX_M) if leader == "label" else (_another_leads, _SOFTMAX_M_OTHER)
    rows = np.asarray([r for m in leads[dtype] for r in make(m)])
    exact = [_exact.softmax_hessian(list(r), 0, gamma) for r in rows]
    hess = np.stack([e[0] for e in exact])
    scale = np.stack([e[1] for e in exact])
    k = H.modulator_condition(np.full(len(rows), gamma), np.asarray([e[2] for e in exact]))[:, None, None]
    return rows, hess, scale, k


def _softmax_hessians(route: str, rows: np.ndarray, gamma: float, dtype: str) -> np.ndarray:
    """The (R, C, C) blocks of each position's Hessian."""
    r = len(rows)
    if route == "jax":
        with jax.enable_x64(dtype == "float64"):
            y = jnp.zeros(r, jnp.int32)
            h = jax.hessian(lambda z: focal_jax.softmax_focal_loss(z, y, gamma=gamma, reduction="sum"))(
                jnp.asarray(rows, dtype))
            h = np.asarray(h, np.float64)
    else:
        dt = getattr(torch, dtype)
        y = torch.zeros(r, dtype=torch.long)

        def loss(z):
            return focal_torch.softmax_focal_loss(z, y, gamma=gamma, reduction="sum")

        xt = torch.tensor(rows, dtype=dt)
        h = torch.autograd.functional.hessian(loss, xt) if route == "torch-double-backward" else \
            torch.func.hessian(loss)(xt)
        h = h.double().numpy()
    return np.stack([h[i, :, i, :] for i in range(r)])


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", GAMMAS, ids=lambda g: f"gamma={g}")
def test_softmax_hessian_matches_the_exact_one_where_the_label_leads(route, dtype, gamma):
    """Every entry, including those of order e^-2m where the label dominates by m (|x| up to 75 in float32)."""
    rows, exact, scale, k = _softmax_rows(dtype, gamma, "label")
    got = _softmax_hessians(route, rows, gamma, dtype)
    assert np.isfinite(got).all()
    _exact.assert_close(got, exact, scale, k, dtype, _rtol(dtype), f"{route} Hessian, γ={gamma}")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", GAMMAS, ids=lambda g: f"gamma={g}")
def test_softmax_hessian_where_another_class_leads(route, dtype, gamma):
    """p_k -> 1 for a k other than the label: entries of order p_k (1 - p_k) and p_y p_k. The leading class's
    e = exp(x - M) differentiates as a constant (M is differentiated with it), and 1 - p_y as -p_y, so that none is
    formed as a difference of near-equal terms."""
    rows, exact, scale, k = _softmax_rows(dtype, gamma, "other")
    got = _softmax_hessians(route, rows, gamma, dtype)
    assert np.isfinite(got).all()
    _exact.assert_close(got, exact, scale, k, dtype, _rtol(dtype), f"{route} Hessian, γ={gamma}")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("leader", ["label", "other"])
def test_softmax_hessian_with_the_classes_on_another_axis_and_uint8_labels(route, leader):
    """Classes first (JAX ``axis=0``; torch (1, C, L) with ``dim=1``), uint8 labels: the same entries."""
    gamma = 0.5
    rows, exact, scale, k = _softmax_rows("float64", gamma, leader)
    r = len(rows)
    if route == "jax":
        with jax.enable_x64(True):
            y = jnp.zeros(r, jnp.uint8)
            h = jax.hessian(lambda z: focal_jax.softmax_focal_loss(z, y, gamma=gamma, axis=0, reduction="sum"))(
                jnp.asarray(rows.T))
            got = np.stack([np.asarray(h)[:, i, :, i] for i in range(r)])
    else:
        y = torch.zeros(1, r, dtype=torch.uint8)

        def loss(z):
            return focal_torch.softmax_focal_loss(z, y, gamma=gamma, dim=1, reduction="sum")

        xt = torch.tensor(rows.T[None])  # (1, C, R)
        h = torch.autograd.functional.hessian(loss, xt) if route == "torch-double-backward" else \
            torch.func.hessian(loss)(xt)
        got = np.stack([h[0, :, i, 0, :, i].numpy() for i in range(r)])
    _exact.assert_close(got, exact, scale, k, "float64", _rtol("float64"), f"{route} Hessian, classes first")


@pytest.mark.parametrize("route", ROUTES)
def test_softmax_hessian_with_many_classes(route):
    """130 classes (JAX masks the positions it does not count differently from 128 classes on)."""
    gamma, c = 0.5, 130
    rows = np.zeros((2, c))
    rows[0, 1], rows[1, 0], rows[1, 5] = 30.0, 30.0, -30.0  # another class leads; the label leads
    rows[:, 7:] = np.linspace(-3.0, 3.0, c - 7)
    exact = [_exact.softmax_hessian(list(row), 0, gamma) for row in rows]
    hess, scale = np.stack([e[0] for e in exact]), np.stack([e[1] for e in exact])
    k = H.modulator_condition(np.full(2, gamma), np.asarray([e[2] for e in exact]))[:, None, None]
    got = _softmax_hessians(route, rows, gamma, "float64")
    _exact.assert_close(got, hess, scale, k, "float64", _rtol("float64"), f"{route} Hessian, 130 classes")
