"""dℓ/dγ = ℓ log(1 - p) of both backends where the labelled class (the target's side) is improbable, against the
definition evaluated in arbitrary precision.

There 1 - p rounds to 1 (to within p) and log(1 - p) ≈ -p is tiny: formed as log of the rounded 1 - p, or as a
difference of two logarithms, it keeps only the digits of p above the dtype's rounding of 1 (20 % off at
p = 3e-7 in float32). A learned γ (per class, per step) reads exactly this derivative. The bound is the precision
contract's relative one, with the condition numbers of the modulator (1 + γ + γ|log(1-p)|) and of p itself
(|log p|: p comes from exp of a logit difference).
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

from parity_tests import _harness as H

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import focal_jax  # noqa: E402
import focal_torch  # noqa: E402

DTYPES = ("float32", "float64")
GAMMAS = (0.5, 2.0)
LEADS = (0.5, 3.0, 9.0, 15.0, 20.0, 30.0, 50.0)


def _exact(p_of, gamma: float) -> tuple[float, float, float]:
    """dℓ/dγ = -(1-p)^γ log p log(1-p), log p and log(1-p), from a function giving p in working precision."""
    with mpmath.workdps(120):
        p = p_of()
        g = mpmath.mpf(gamma)
        loss = -((1 - p) ** g) * mpmath.log(p)
        return float(loss * mpmath.log(1 - p)), float(mpmath.log(p)), float(mpmath.log(1 - p))


def _softmax_rows() -> np.ndarray:
    """The label (class 0) behind by m, or ahead by m."""
    return np.asarray([r for m in LEADS for r in ([0.0, m, 0.0, -1.0], [m, 0.0, -m, 0.0])])


def _softmax_exact(rows: np.ndarray, gamma: float) -> np.ndarray:
    def p_of(r):
        return lambda: (lambda e: e[0] / sum(e))([mpmath.exp(mpmath.mpf(float(v))) for v in r])

    return np.asarray([_exact(p_of(r), gamma) for r in rows])


def _sigmoid_points() -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray([s * m for m in LEADS for s in (1.0, -1.0)])
    xs, ts = np.meshgrid(x, np.asarray([0.0, 1.0, 0.3]))
    return xs.ravel(), ts.ravel()


def _sigmoid_exact(xs: np.ndarray, ts: np.ndarray, gamma: float) -> np.ndarray:
    """For soft targets the loss is (1-p_t)^γ ce with 1-p_t = t σ(-x) + (1-t) σ(x): dℓ/dγ = ℓ log(1-p_t)."""
    out = []
    for x, t in zip(xs, ts, strict=True):
        with mpmath.workdps(120):
            xm, tm, g = mpmath.mpf(float(x)), mpmath.mpf(float(t)), mpmath.mpf(gamma)
            s, r = 1 / (1 + mpmath.exp(-xm)), 1 / (1 + mpmath.exp(xm))
            q = tm * r + (1 - tm) * s
            ce = -tm * mpmath.log(s) - (1 - tm) * mpmath.log(r)
            out.append((float(q**g * ce * mpmath.log(q)), float(mpmath.log(1 - q)), float(mpmath.log(q))))
    return np.asarray(out)


def _bound_scale(gamma: float, exact: np.ndarray, dtype: str) -> np.ndarray:
    """K |dℓ/dγ|, plus the loss's own floor carried by the factor log(1-p): where ℓ is below the dtype's smallest
    normal number (a confident, correct prediction with γ = 2 in float32), so is what it multiplies."""
    d, log_p, log_q = exact[:, 0], exact[:, 1], exact[:, 2]
    k = 1.0 + gamma + gamma * np.abs(log_q) + np.abs(log_p)
    tol = H.TOLERANCES[dtype]
    return k * np.abs(d) + tol["floor"] * np.abs(log_q) / tol["rtol"]


def _softmax_d_gamma(backend: str, rows: np.ndarray, gamma: float, dtype: str, labels: str) -> np.ndarray:
    """dℓ/dγ per row, label 0: a class index, or the one-hot probabilities (the loss with every class)."""
    n = len(rows)
    onehot = np.eye(rows.shape[1])[np.zeros(n, int)]
    if backend == "jax":
        with jax.enable_x64(dtype == "float64"):
            x = jnp.asarray(rows, dtype)
            y = jnp.zeros(n, jnp.int32) if labels == "index" else jnp.asarray(onehot, dtype)
            f = jax.jit(jax.jacfwd(lambda g: focal_jax.softmax_focal_loss(x, y, gamma=g, reduction="none")))
            return np.asarray(f(jnp.asarray(gamma, dtype)), np.float64)
    dt = getattr(torch, dtype)
    g = torch.tensor(gamma, dtype=dt, requires_grad=True)
    yt = torch.zeros(n, dtype=torch.long) if labels == "index" else torch.tensor(onehot, dtype=dt)
    loss = focal_torch.softmax_focal_loss(torch.tensor(rows, dtype=dt), yt, gamma=g, reduction="none")
    return np.asarray([torch.autograd.grad(loss[i], g, retain_graph=True)[0].item() for i in range(n)])


def _sigmoid_d_gamma(backend: str, xs: np.ndarray, ts: np.ndarray, gamma: float, dtype: str) -> np.ndarray:
    if backend == "jax":
        with jax.enable_x64(dtype == "float64"):
            x, t = jnp.asarray(xs, dtype), jnp.asarray(ts, dtype)
            f = jax.jit(jax.jacfwd(lambda g: focal_jax.sigmoid_focal_loss(x, t, gamma=g, reduction="none")))
            return np.asarray(f(jnp.asarray(gamma, dtype)), np.float64)
    dt = getattr(torch, dtype)
    g = torch.tensor(gamma, dtype=dt, requires_grad=True)
    loss = focal_torch.sigmoid_focal_loss(torch.tensor(xs, dtype=dt), torch.tensor(ts, dtype=dt), gamma=g,
                                          reduction="none")
    return np.asarray([torch.autograd.grad(loss[i], g, retain_graph=True)[0].item() for i in range(len(xs))])


@pytest.mark.parametrize("labels", ["index", "probabilities"])
@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", GAMMAS, ids=lambda g: f"gamma={g}")
def test_softmax_d_gamma_where_the_label_is_improbable(backend, dtype, gamma, labels):
    rows = _softmax_rows()
    exact = _softmax_exact(rows, gamma)
    got = _softmax_d_gamma(backend, rows, gamma, dtype, labels)
    H.assert_close(got, exact[:, 0], dtype, f"{backend} dℓ/dγ (softmax)", scale=_bound_scale(gamma, exact, dtype))


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", GAMMAS, ids=lambda g: f"gamma={g}")
def test_sigmoid_d_gamma_where_the_target_is_improbable(backend, dtype, gamma):
    xs, ts = _sigmoid_points()
    exact = _sigmoid_exact(xs, ts, gamma)
    got = _sigmoid_d_gamma(backend, xs, ts, gamma, dtype)
    H.assert_close(got, exact[:, 0], dtype, f"{backend} dℓ/dγ (sigmoid)", scale=_bound_scale(gamma, exact, dtype))
