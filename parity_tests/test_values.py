"""Values and gradients: each backend against the float64 reference, and the backends against each other,
under the precision contract of ``_harness`` (relative to each quantity's condition scale)."""

from __future__ import annotations

import contextlib
import math
import warnings

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
    v, g = H.cached(backend, loss, cid)
    H.cached("expected", loss, cid).check(v, g, _dtype(cid), backend)


@pytest.mark.parametrize("loss,cid", GRID)
def test_jax_equals_torch(loss, cid):
    """Each backend within the contract of the reference puts them within twice of each other."""
    jv, jg = H.cached("jax", loss, cid)
    tv, tg = H.cached("torch", loss, cid)
    exp = H.cached("expected", loss, cid)
    scaled = H.Expected(tv, tg, exp.value_scale, exp.grad_scale, exp.grad_scale_ref)
    scaled.check(jv, jg, _dtype(cid), "jax vs torch", factor=2.0)


@pytest.mark.parametrize("case", [pytest.param(c, id=H.case_id(c)) for c in H.ORIGINAL_CASES])
@pytest.mark.parametrize("backend", ["jax", "jax-channels-last", "torch"])
def test_original_modules_match_reference(backend, case):
    inp, ctor = H.original_inputs(case)
    ref_v, ref_g = H.run_original("reference", inp, ctor, case["module"])
    sv, sg, sg_ref = H.original_scales(H.as_held(inp), ctor)
    with _maybe_warns(case, ctor):
        if backend == "jax-channels-last":
            v, g = H.run_original("jax", inp, ctor, case["module"], jax_axis=-1)
        else:
            v, g = H.run_original(backend, inp, ctor, case["module"])
    H.Expected(ref_v, ref_g, sv, sg, sg_ref).check(v, g, case["dtype"], backend)


def _maybe_warns(case, ctor):
    if not case["logits"] and ctor.get("weights") is not None:
        return pytest.warns(RuntimeWarning, match="logits=False")
    ctx = contextlib.ExitStack()
    ctx.enter_context(warnings.catch_warnings())
    warnings.simplefilter("error")  # no other warning (no deprecated reduce=, no dtype downcasts)
    return ctx


@pytest.mark.parametrize("grid", list(H.GRIDS))
def test_grid_covers_every_pair_of_option_values(grid):
    """All-pairs: every allowed pair of values of every two axes is in some case (the full product with
    FOCAL_SLOW=1), the full axes run their whole product, no case holds a forbidden pair, ids are unique."""
    axes, full, forbidden, cases = H.GRIDS[grid]
    required = H.required_pairs(axes, forbidden)
    covered = H.covered_pairs(axes, cases)
    missing = sorted(required - covered)
    assert not missing, f"{len(missing)} pairs never tested, e.g. {missing[:5]}"
    assert not covered & H._forbidden_pairs(axes, forbidden)
    full_rows = {tuple(repr(c[n]) for n in full) for c in cases}
    assert len(full_rows) == math.prod(len(axes[n]) for n in full)
    assert len({H.case_id(c) for c in cases}) == len(cases)
    if not H.SLOW:  # small enough for CI: within a few rows of the full axes' product
        n_full = len(full_rows)
        assert len(cases) <= n_full + 12, len(cases)


def test_covering_array_holds_pairs_that_cycling_misses():
    """The generator on a toy grid where one row per full-axis value cannot hold every pair: it adds rows."""
    axes = {"a": (0, 1), "b": ("x", "y", "z"), "c": (None, 1.5, 2.5), "d": (True, False)}
    cases = H.covering_array(axes, full=("a",))
    assert not H.required_pairs(axes) - H.covered_pairs(axes, cases)
    assert len(cases) >= 9  # b × c alone needs 9 rows
    forbidden = ({"b": "x", "c": None},)
    cases = H.covering_array(axes, full=("a",), forbidden=forbidden)
    assert not H.required_pairs(axes, forbidden) - H.covered_pairs(axes, cases)
    assert not any(c["b"] == "x" and c["c"] is None for c in cases)
