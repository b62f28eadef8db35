"""Second derivatives of the focal losses' definitions in arbitrary-precision arithmetic (mpmath), for the
Hessian tests.

They are closed forms of the definitions themselves, evaluated far beyond float64, so that no rounding of the
reference competes with the backends' (a finite difference of a float64 gradient cannot resolve a curvature of
e^-50 on a gradient of order 1). Each function also returns ``S``, the sum of the magnitudes of the terms it
adds: the scale of the precision contract where those terms cancel.
"""

from __future__ import annotations

import mpmath
import numpy as np

DIGITS = 40
"""Significant digits beyond the inputs' own dynamic range: a quantity like 1 - σ(x) at x = 400 needs 174 more."""


def _digits(*magnitudes: float) -> int:
    return DIGITS + int(2 * max(abs(m) for m in magnitudes) / 2.302585) + 1


def sigmoid_second_derivative(x: float, t: float, gamma: float) -> tuple[float, float, float]:
    """d²ℓ/dx², its term scale and log(1-p_t) for ℓ = (1-p_t)^γ ce, ce = -t log σ(x) - (1-t) log σ(-x),
    1-p_t = t σ(-x) + (1-t) σ(x) (no α, weight, smoothing: those scale ℓ or move t)."""
    with mpmath.workdps(_digits(x)):
        x, t, g = mpmath.mpf(x), mpmath.mpf(t), mpmath.mpf(gamma)
        s, r = 1 / (1 + mpmath.exp(-x)), 1 / (1 + mpmath.exp(x))  # σ(x), σ(-x)
        q = t * r + (1 - t) * s
        q1 = (1 - 2 * t) * s * r  # dq/dx
        q2 = q1 * (r - s)
        ce = -t * mpmath.log(s) - (1 - t) * mpmath.log(r)
        ce1, ce2 = s - t, s * r
        if g == 0:
            m, m1, m2 = mpmath.mpf(1), mpmath.mpf(0), mpmath.mpf(0)
        else:
            m = q**g
            m1 = g * q ** (g - 1) * q1
            m2 = g * (g - 1) * q ** (g - 2) * q1**2 + g * q ** (g - 1) * q2
        terms = (m2 * ce, 2 * m1 * ce1, m * ce2)
        return float(sum(terms)), float(sum(abs(v) for v in terms)), float(mpmath.log(q)) if q > 0 else -np.inf


def softmax_hessian(z: list[float], y: int, gamma: float) -> tuple[np.ndarray, np.ndarray, float]:
    """The C × C Hessian of ℓ = -(1-p_y)^γ log p_y over one position's logits ``z``, its term scales and
    log(1-p_y)."""
    with mpmath.workdps(_digits(max(z) - min(z))):
        z = [mpmath.mpf(v) for v in z]
        g = mpmath.mpf(gamma)
        c = len(z)
        top = max(z)
        e = [mpmath.exp(v - top) for v in z]
        p = [v / sum(e) for v in e]
        u = sum(p[k] for k in range(c) if k != y)  # 1 - p_y
        log_p = -mpmath.log(p[y])  # -log p_y

        def d(a: int, b: int) -> int:
            return 1 if a == b else 0

        dl = [p[k] - d(k, y) for k in range(c)]  # d(-log p_y)/dz_k
        du = [-p[y] * (d(k, y) - p[k]) for k in range(c)]
        hess = np.zeros((c, c))
        scale = np.zeros((c, c))
        for j in range(c):
            for k in range(c):
                d2l = p[k] * (d(j, k) - p[j])
                d2u = -(p[y] * (d(j, y) - p[j]) * (d(k, y) - p[k]) - p[y] * p[k] * (d(j, k) - p[j]))
                if g == 0:
                    m, mj, mk, m2 = mpmath.mpf(1), 0, 0, 0
                else:
                    m = u**g
                    mj, mk = g * u ** (g - 1) * du[j], g * u ** (g - 1) * du[k]
                    m2 = g * (g - 1) * u ** (g - 2) * du[j] * du[k] + g * u ** (g - 1) * d2u
                terms = (m2 * log_p, mj * dl[k], dl[j] * mk, m * d2l)
                hess[j, k] = float(sum(terms))
                scale[j, k] = float(sum(abs(v) for v in terms))
        return hess, scale, float(mpmath.log(u))


FLOOR_ULPS = 4
"""The absolute floor of a second derivative, in multiples of the dtype's smallest normal number. A second
derivative is a product with one more small factor than the gradient, and XLA's CPU code flushes subnormal
intermediates to 0, so a curvature within a few multiples of that number (2.4e-38 in float32, say) can lose all
of its digits; anything larger is held to the relative bound."""


def assert_close(actual: np.ndarray, expected: np.ndarray, scale: np.ndarray, k: np.ndarray | float, dtype: str,
                 rtol: float, what: str) -> None:
    """``|actual - expected| <= rtol * k * scale + FLOOR_ULPS * tiny(dtype)`` elementwise (NaN never passes)."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    bound = rtol * np.asarray(k) * np.asarray(scale) + FLOOR_ULPS * float(np.finfo(dtype).tiny)
    err = np.abs(a - e)
    bad = ~(err <= bound)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / bound, -1.0)), bad.shape)
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} outside the bound ({dtype}); worst at {i}: "
                             f"actual={a[i]!r}, exact={e[i]!r}, scale={np.asarray(scale)[i]:.3g}, "
                             f"bound={bound[i]:.3g}")
