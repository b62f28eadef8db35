"""The precision contract of ``_harness``, enforced where it is hardest to meet.

Elementwise: a logit grid with confident predictions (|x| up to 100) and, for each γ, the logits
where the loss falls to about 1e-30; 0/1/soft targets; γ in {0, 0.5, 1, ..., 8}; both losses, both
backends, float32 and float64; values and gradients against the float64 reference, each element
within a few dozen ulps of its condition scale. Reductions: the mean and the sum of 2^22 elements
(2^26 with FOCAL_SLOW=1) against the float64 sum, with the same bound.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from parity_tests import _harness as H

BACKENDS = ("jax", "torch")
DTYPES = ("float32", "float64")
PRECISION_GAMMAS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
LN_1E30 = float(np.log(1e30))  # 69.08: exp(-LN_1E30) = 1e-30

BASE_LOGITS = (0.0, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 17.3, 20.0, 30.0, 50.0, 69.0, 87.0, 100.0)
TARGETS = (0.0, 1.0, 0.25, 0.5, 0.9)


def _tail(gamma: float) -> float:
    """The logit where the hard-target loss σ(-x)^γ log(1 + e^-x) ≈ e^{-x(γ+1)} is about 1e-30."""
    return LN_1E30 / (gamma + 1.0)


def _sigmoid_grid(gamma: float) -> tuple[np.ndarray, np.ndarray]:
    mags = np.array(BASE_LOGITS + (_tail(gamma), 0.5 * _tail(gamma)))
    x = np.concatenate([mags, -mags[1:]])
    xx, tt = np.meshgrid(x, np.array(TARGETS), indexing="ij")
    return xx.ravel(), tt.ravel()


@pytest.mark.parametrize("alpha", [None, 0.25], ids=lambda a: f"alpha={a}")
@pytest.mark.parametrize("eps", [0.0, 0.1], ids=lambda e: f"label_smoothing={e}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", PRECISION_GAMMAS, ids=lambda g: f"gamma={g}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_elementwise_precision(backend, gamma, dtype, eps, alpha):
    x, t = _sigmoid_grid(gamma)
    inp = H.Inputs(x, t, {"gamma": gamma, "alpha": alpha, "label_smoothing": eps, "reduction": "none"}, dtype)
    v, g = H.RUNNERS[backend]("sigmoid", inp)
    H.expected("sigmoid", inp).check(v, g, dtype, backend)


def test_sigmoid_grid_reaches_the_tails_and_confident_predictions():
    """The grid holds what it claims: losses near 1e-30 for every γ, and |x| = 100."""
    from focal_spec import reference

    for gamma in PRECISION_GAMMAS:
        x, t = _sigmoid_grid(gamma)
        v, _ = reference.sigmoid_focal_loss(x, t, gamma=gamma, reduction="none")
        assert np.any((v > 1e-31) & (v < 1e-29)), gamma
        assert np.abs(x).max() == 100.0
    # a loss of 3e-7 (x = 15, t = 1, γ = 0) is not 0 under the contract
    with pytest.raises(AssertionError):
        H.assert_close(np.zeros(1), reference.sigmoid_focal_loss(np.array([15.0]), np.array([1.0]), gamma=0.0,
                                                                reduction="none")[0], "float32")


SOFTMAX_MARGINS = (0.0, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 50.0, 87.0, 100.0)
C = 4


def _softmax_rows(gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 4 logits and a label: the label far ahead (confident and right), far behind (confident and
    wrong), tied at the top, and in the middle, for every margin d; plus the margin at which the
    confident-right loss ((C-1) e^-d)^(γ+1) is about 1e-30."""
    rows, labels = [], []
    for d in SOFTMAX_MARGINS + (_tail(gamma) + np.log(C - 1),):
        rows += [[d, 0, 0, 0], [0, d, 0, 0], [d, d, 0, -d], [d, d / 2, -d / 2, 0], [-d, 0, d / 3, d / 7]]
        labels += [0, 0, 0, 1, 3]
    return np.array(rows, np.float64), np.array(labels)


def _probabilities(kind: str, labels: np.ndarray) -> np.ndarray:
    onehot = np.eye(C)[labels]
    if kind == "onehot":
        return onehot
    return 0.7 * onehot + 0.3 * np.array([0.5, 0.25, 0.125, 0.125])  # soft, exactly representable


@pytest.mark.parametrize("weight", [None, "per_class"], ids=lambda w: f"weight={w}")
@pytest.mark.parametrize("labels", ["index", "index-smoothed", "probs-onehot", "probs-soft"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", PRECISION_GAMMAS, ids=lambda g: f"gamma={g}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_elementwise_precision(backend, gamma, dtype, labels, weight):
    x, y = _softmax_rows(gamma)
    kw = {"gamma": gamma, "reduction": "none"}
    if labels.startswith("probs"):
        y = _probabilities(labels.split("-")[1], y)
    elif labels == "index-smoothed":
        kw["label_smoothing"] = 0.1
    if weight:
        kw["weight"] = np.array([0.5, 2.0, 1.0, 0.75])
    inp = H.Inputs(x, y, kw, dtype)
    v, g = H.RUNNERS[backend]("softmax", inp)
    H.expected("softmax", inp).check(v, g, dtype, backend)


def test_softmax_grid_reaches_the_tails():
    from focal_spec import reference

    for gamma in PRECISION_GAMMAS:
        x, y = _softmax_rows(gamma)
        v, _ = reference.softmax_focal_loss(x, y, gamma=gamma, reduction="none")
        assert np.any((v > 1e-31) & (v < 1e-29)), gamma


# ----------------------------------------------------------------------------------------
# Reductions: the mean and the sum of many elements against the float64 sum.
# ----------------------------------------------------------------------------------------

CHUNK = 1 << 22


def _big_inputs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """float32-exact logits and 0/1 targets (10% positives), as a detector's dense head sees them."""
    rng = np.random.default_rng(n)
    x = rng.normal(scale=4.0, size=n).astype(np.float32)
    t = (rng.uniform(size=n) < 0.1).astype(np.float32)
    return x, t


@functools.cache
def _big_expected(n: int, alpha: float | None) -> tuple[float, float, list[tuple[np.ndarray, np.ndarray]]]:
    """The float64 sum of the elementwise loss, its condition scale, and per chunk the elementwise
    gradient and its scale (the gradient of the sum; the mean's is that over n)."""
    x, t = _big_inputs(n)
    total, scale, grads = [], [], []
    for i in range(0, n, CHUNK):
        piece = H.Inputs(x[i:i + CHUNK].astype(np.float64), t[i:i + CHUNK].astype(np.float64),
                         {"gamma": 2.0, "alpha": alpha, "reduction": "none"}, "float32")
        e = H.expected("sigmoid", piece)
        total.append(e.value.sum())
        scale.append(e.value_scale.sum())
        grads.append((e.grad, e.grad_scale))
    return float(np.sum(total)), float(np.sum(scale)), grads


@functools.lru_cache(maxsize=1)
def _big_run(backend: str, n: int, alpha: float | None, reduction: str) -> tuple[float, np.ndarray]:
    x, t = _big_inputs(n)
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        import focal_jax

        fn = jax.jit(jax.value_and_grad(lambda z, tt: focal_jax.sigmoid_focal_loss(
            z, tt, gamma=2.0, alpha=alpha, reduction=reduction)))
        v, g = fn(jnp.asarray(x), jnp.asarray(t))
        return float(v), np.asarray(g)
    import torch

    import focal_torch

    xt = torch.from_numpy(x).requires_grad_()
    out = focal_torch.sigmoid_focal_loss(xt, torch.from_numpy(t), gamma=2.0, alpha=alpha, reduction=reduction)
    out.backward()
    return float(out), xt.grad.numpy()


def _check_reduction(backend: str, n: int, alpha: float | None, reduction: str, what: str) -> None:
    total, scale, grads = _big_expected(n, alpha)
    k = 1.0 / n if reduction == "mean" else 1.0
    v, g = _big_run(backend, n, alpha, reduction)
    if what == "value":
        H.assert_close(np.float64(v), np.float64(total * k), "float32", f"{backend} {reduction} of {n}",
                       scale=scale * k)
        return
    for i, (eg, sg) in enumerate(grads):
        H.assert_close(g[i * CHUNK:(i + 1) * CHUNK].astype(np.float64), eg * k, "float32",
                       f"{backend} gradient of the {reduction}, chunk {i}", scale=sg * k)


# value and gradient of one run are adjacent, so that the run is shared
REDUCTION_PARAMS = [pytest.param(b, r, a, w, id=f"{b}-{r}-alpha={a}-{w}")
                    for b in BACKENDS for r in ("mean", "sum") for a in (None, 0.25) for w in ("value", "gradient")]


@pytest.mark.parametrize("backend,reduction,alpha,what", REDUCTION_PARAMS)
def test_reduction_of_2_22_elements(backend, reduction, alpha, what):
    _check_reduction(backend, 1 << 22, alpha, reduction, what)


@pytest.mark.slow
@pytest.mark.parametrize("backend,reduction,alpha,what", REDUCTION_PARAMS)
def test_reduction_of_2_26_elements(backend, reduction, alpha, what):
    _check_reduction(backend, 1 << 26, alpha, reduction, what)
