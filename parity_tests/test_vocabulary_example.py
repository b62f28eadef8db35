"""``examples/vocabulary_scale.py --quick`` trains with the fused and the unfused loss, finds their curves equal,
draws the memory against V (the fused loss far below the unfused one) and writes a PNG and a table."""

from __future__ import annotations

import pytest

from parity_tests.test_examples import MIN_SIDE, load_example, png_size


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocabulary_scale")
    return load_example("vocabulary_scale").main(["--quick", "--out", str(out)]), out


def test_curves_coincide(result):
    res, _ = result
    assert res["gaps"]["jax"] < 1e-4
    if "torch" in res["gaps"]:
        assert res["gaps"]["torch"] < 1e-4
    losses = res["curves"]["jax fused"]
    assert losses[-1] < losses[0]  # it trains


def test_memory_falls_far_below_the_unfused_loss(result):
    res, _ = result
    assert len(res["memory"]) >= 2
    for m in res["memory"]:
        assert m["jax_fused"] * 4 < m["jax_unfused"], m
    # the unfused loss grows with V; the fused one much less
    first, last = res["memory"][0], res["memory"][-1]
    assert last["jax_unfused"] > 2 * first["jax_unfused"]


def test_writes_png_and_table(result):
    res, out = result
    w, h = png_size(res["png"])
    assert min(w, h) >= MIN_SIDE
    table = (out / "vocabulary_scale.md").read_text()
    assert "| V |" in table and "JAX fused" in table
