"""Property-based tests over shapes (0-d to 4-d, size-0 dimensions included), dtypes and every option.

The default profile is sized for CI. FOCAL_HYPOTHESIS=thorough runs many more examples.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity_tests import _harness as H

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("FOCAL_HYPOTHESIS", "ci")

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)
nonempty_shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)
gammas = st.sampled_from([0, 0.0, 0.25, 0.5, 1.0, 1.5, 2, 3.7, 5.0])
dtypes = st.sampled_from(["float32", "float64"])


@st.composite
def sigmoid_calls(draw):
    shape = draw(shapes)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1.0, 5.0, 30.0]))
    x = rng.normal(scale=scale, size=shape)
    t = draw(st.sampled_from(["hard", "soft"]))
    t = (rng.uniform(size=shape) < 0.5).astype(float) if t == "hard" else rng.uniform(size=shape)
    kw = {
        "gamma": draw(gammas),
        "alpha": draw(st.sampled_from([None, 0.0, 0.25, 1.0, "array"])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.1, 1.0])),
        "reduction": draw(st.sampled_from(H.REDUCTIONS)),
    }
    # per-class arrays run along the class axis (1 in the torch layout; the only axis of 1-d logits)
    c = shape[1] if len(shape) >= 2 else (shape[0] if shape else None)
    per_class = []
    if kw["alpha"] == "array":
        kw["alpha"] = rng.uniform(size=() if c is None else (c,))
        per_class += [] if c is None else ["alpha"]
    if draw(st.booleans()):
        kw["weight"] = rng.uniform(0.1, 3.0, size=() if c is None else (c,))
        per_class += [] if c is None else ["weight"]
    if draw(st.booleans()):
        kw["where"] = rng.uniform(size=shape) < 0.7
    return H.Inputs(x, t, kw, draw(dtypes), tuple(per_class))


@st.composite
def softmax_calls(draw):
    # the torch layout (N, C, ...): positions are 1-d to 3-d (size 0 allowed), C >= 1
    positions = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
    c = draw(st.integers(1, 5))
    shape = positions[:1] + (c,) + positions[1:]
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.normal(scale=draw(st.sampled_from([1.0, 5.0, 30.0])), size=shape)
    kw = {
        "gamma": draw(gammas),
        "label_smoothing": draw(st.sampled_from([0.0, 0.1])),
        "reduction": draw(st.sampled_from(H.REDUCTIONS)),
    }
    if draw(st.booleans()):
        y = rng.integers(0, c, size=positions)
        if draw(st.booleans()):
            y = np.where(rng.uniform(size=positions) < 0.3, -100, y)
    else:
        y = np.moveaxis(rng.dirichlet(np.ones(c), size=positions), -1, 1)
    if draw(st.booleans()):
        kw["weight"] = rng.uniform(0.1, 3.0, size=(c,))
    if draw(st.booleans()):
        kw["where"] = rng.uniform(size=positions) < 0.7
    return H.Inputs(x, y, kw, draw(dtypes))


def _check_against_reference(loss, inp):
    exp = H.expected(loss, inp)
    jv, jg = H.run_jax(loss, inp)
    tv, tg = H.run_torch(loss, inp)
    for v, g, who in ((jv, jg, "jax"), (tv, tg, "torch")):
        assert np.isfinite(v).all() and np.isfinite(g).all(), who
        exp.check(v, g, inp.dtype, who)
    H.Expected(tv, tg, exp.value_scale, exp.grad_scale, exp.grad_scale_ref).check(jv, jg, inp.dtype, "jax vs torch",
                                                                                   factor=2.0)


@settings(settings.get_profile(PROFILE))
@given(sigmoid_calls())
def test_sigmoid_properties(inp):
    _check_against_reference("sigmoid", inp)


@settings(settings.get_profile(PROFILE))
@given(softmax_calls())
def test_softmax_properties(inp):
    _check_against_reference("softmax", inp)


def _run(backend, inp):
    if backend == "reference":
        return H.run_reference("sigmoid", H.as_held(inp))
    return H.RUNNERS[backend]("sigmoid", inp)


BACKENDS = ["reference", "jax", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(settings.get_profile(PROFILE))
@given(inp=sigmoid_calls())
def test_focal_is_at_most_cross_entropy_and_gamma0_is_cross_entropy(backend, inp):
    kw = {k: v for k, v in inp.kwargs.items() if k not in ("alpha", "reduction")}
    per_class = tuple(k for k in inp.per_class if k != "alpha")
    fl, _ = _run(backend, H.Inputs(inp.logits, inp.labels, dict(kw, reduction="none"), inp.dtype, per_class))
    ce_inp = H.Inputs(inp.logits, inp.labels, dict(kw, gamma=0.0, reduction="none"), inp.dtype, per_class)
    ce, _ = _run(backend, ce_inp)
    tol = H.TOLERANCES[inp.dtype]
    assert np.all(fl <= ce * (1 + tol["rtol"]) + tol["floor"])
    # γ = 0 is the (weighted, masked, smoothed) BCE: log(1 + e^-|x|) + (1-t') relu(x) + t' relu(-x),
    # evaluated here in float64 on the held inputs
    held = H.as_held(ce_inp)
    laid_out = H._layout_kwargs(held, "torch", held.logits.ndim)
    eps = kw["label_smoothing"]
    mask = np.broadcast_to(laid_out.get("where", True), np.shape(held.logits))
    x = np.where(mask, held.logits, 0.0)
    tp = np.asarray(held.labels) * (1 - eps) + eps / 2
    bce = np.log1p(np.exp(-np.abs(x))) + (1 - tp) * np.maximum(x, 0) + tp * np.maximum(-x, 0)
    w = np.broadcast_to(laid_out.get("weight", 1.0), np.shape(x))
    H.assert_close(ce, np.where(mask, w * bce, 0.0), inp.dtype, "cross-entropy",
                   scale=H.sigmoid_scales(held)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(settings.get_profile(PROFILE))
@given(inp=sigmoid_calls())
def test_alpha_one_keeps_only_positives(backend, inp):
    t = (inp.labels > 0.5).astype(float)
    kw = {k: v for k, v in inp.kwargs.items() if k not in ("alpha", "label_smoothing", "reduction")}
    per_class = tuple(k for k in inp.per_class if k != "alpha")
    full, gf = _run(backend, H.Inputs(inp.logits, t, dict(kw, reduction="none"), inp.dtype, per_class))
    pos, gp = _run(backend, H.Inputs(inp.logits, t, dict(kw, alpha=1.0, reduction="none"), inp.dtype, per_class))
    np.testing.assert_array_equal(pos[t == 0], 0.0)
    np.testing.assert_array_equal(gp[t == 0], 0.0)
    H.assert_close(pos[t == 1], full[t == 1], inp.dtype, "value")
    H.assert_close(gp[t == 1], gf[t == 1], inp.dtype, "gradient")
