"""Values and gradients: each backend against the float64 reference, and the backends against each other."""

from __future__ import annotations

import pytest

from parity_tests import _harness as H

BACKENDS = ("jax", "torch")


def _dtype(cid: str) -> str:
    return "float64" if "dtype=float64" in cid else "float32"


GRID = [pytest.param(loss, H.case_id(c), id=f"{loss}-{H.case_id(c)}")
        for loss, cases in (("sigmoid", H.SIGMOID_CASES), ("softmax", H.SOFTMAX_CASES)) for c in cases]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,cid", GRID)
def test_matches_reference(backend, loss, cid):
    ref_v, ref_g = H.cached("reference", loss, cid)
    v, g = H.cached(backend, loss, cid)
    assert v.shape == ref_v.shape and g.shape == ref_g.shape
    H.assert_close(v, ref_v, _dtype(cid), "value")
    H.assert_close(g, ref_g, _dtype(cid), "gradient")


@pytest.mark.parametrize("loss,cid", GRID)
def test_jax_equals_torch(loss, cid):
    jv, jg = H.cached("jax", loss, cid)
    tv, tg = H.cached("torch", loss, cid)
    H.assert_close(jv, tv, _dtype(cid), "value")
    H.assert_close(jg, tg, _dtype(cid), "gradient")


@pytest.mark.parametrize("case", [pytest.param(c, id=H.case_id(c)) for c in H.ORIGINAL_CASES])
@pytest.mark.parametrize("backend", ["jax", "jax-channels-last", "torch"])
def test_original_modules_match_reference(backend, case):
    inp, ctor = H.original_inputs(case)
    ref_v, ref_g = H.run_original("reference", inp, ctor, case["module"])
    with _maybe_warns(case, ctor):
        if backend == "jax-channels-last":
            v, g = H.run_original("jax", inp, ctor, case["module"], jax_axis=-1)
        else:
            v, g = H.run_original(backend, inp, ctor, case["module"])
    H.assert_close(v, ref_v, case["dtype"], "value")
    H.assert_close(g, ref_g, case["dtype"], "gradient")


def _maybe_warns(case, ctor):
    import contextlib
    import warnings

    if not case["logits"] and ctor.get("weights") is not None:
        return pytest.warns(RuntimeWarning, match="logits=False")
    ctx = contextlib.ExitStack()
    ctx.enter_context(warnings.catch_warnings())
    warnings.simplefilter("error")  # no other warning (no deprecated reduce=, no dtype downcasts)
    return ctx


def test_grids_cover_every_option_value():
    """The covering grids reach every value of every axis (the full product with FOCAL_SLOW=1)."""
    for axes, cases in ((H.SIGMOID_AXES, H.SIGMOID_CASES), (H.SOFTMAX_AXES, H.SOFTMAX_CASES)):
        for name, values in axes.items():
            seen = {repr(c[name]) for c in cases}
            assert seen == {repr(v) for v in values}, name
        assert len({H.case_id(c) for c in cases}) == len(cases)
