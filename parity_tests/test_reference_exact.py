"""The float64 reference against the definition in arbitrary precision (mpmath), where the label is confident.

Every backend test measures its error against ``focal_spec.reference``, so the reference must keep the digits
that the backends are asked to keep: at a p_y close to 1 the gradient's label entry A_y (1 - p_y) is far below
A_y, and forming it as A_y - p_y A_y would leave rounding noise of A_y's size there.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

from focal_spec import reference

LEADS = [2.0, 12.0, 20.0, 30.0]


def _exact_softmax_grad(row: np.ndarray, label: int, gamma: float, eps: float) -> np.ndarray:
    """dℓ/dx_k = Σ_c dℓ/dp_c · p_c (δ_ck - p_k), ℓ = -Σ_c q_c (1-p_c)^γ log p_c, q = (1-ε) onehot + ε/C."""
    c = len(row)
    with mpmath.workdps(120):
        e = [mpmath.exp(mpmath.mpf(float(v))) for v in row]
        s = sum(e)
        p = [v / s for v in e]
        q = [(1 - mpmath.mpf(eps)) * (k == label) + mpmath.mpf(eps) / c for k in range(c)]
        g = mpmath.mpf(gamma)
        d_p = [-q[k] * (-g * (1 - p[k]) ** (g - 1) * mpmath.log(p[k]) + (1 - p[k]) ** g / p[k]) for k in range(c)]
        return np.asarray([float(sum(d_p[j] * p[j] * ((j == k) - p[k]) for j in range(c))) for k in range(c)])


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_reference_softmax_gradient_keeps_every_entry_where_the_label_leads(gamma, eps):
    rows = np.asarray([[m, 0.0, -m, 1.0] for m in LEADS] + [[m, m - 1.0, -m, 0.0] for m in LEADS])
    labels = np.zeros(len(rows), np.int64)
    _, grad = reference.softmax_focal_loss(rows, labels, gamma=gamma, label_smoothing=eps, reduction="none",
                                           axis=-1)
    # reduction "none" gives the gradient of the sum of the positions' losses: one row each
    exact = np.stack([_exact_softmax_grad(r, 0, gamma, eps) for r in rows])
    np.testing.assert_allclose(grad, exact, rtol=1e-12, atol=0)
