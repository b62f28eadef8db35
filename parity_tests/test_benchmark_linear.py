"""examples/benchmark_linear.py at small sizes: its rows, and its check of the fused loss against the unfused one
(which must reject a fused loss that is off)."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import benchmark_linear as B  # noqa: E402


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_rows_match_and_time_every_loss(dtype):
    pytest.importorskip("torch")
    rows, errors = B.torch_rows(64, 16, 512, 1, dtype=dtype, memory=False)
    assert errors == []
    names = {r["impl"] for r in rows}
    assert {"fused", "unfused", "framework CE", "fused γ=0"} <= names
    assert all(r["seconds"] > 0 and r["dtype"] == dtype for r in rows)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_rows_match_and_report_temporaries(dtype):
    pytest.importorskip("jax")
    rows, errors = B.jax_rows(64, 16, 512, 1, dtype=dtype)
    assert errors == []
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"fused", "unfused", "framework CE"}
    assert by["fused"]["memory_bytes"] < by["unfused"]["memory_bytes"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_fused_loss_that_is_off_is_reported(monkeypatch, dtype):
    """A fused loss 1 % off the definition (10 % in bfloat16, whose bound is 3 %) is a mismatch, in the value and
    in the gradients."""
    pytest.importorskip("torch")
    import focal_torch

    fused = focal_torch.linear_softmax_focal_loss
    factor = 1.01 if dtype == "float32" else 1.1
    monkeypatch.setattr(focal_torch, "linear_softmax_focal_loss", lambda *a, **k: fused(*a, **k) * factor)
    _, errors = B.torch_rows(64, 16, 512, 1, dtype=dtype, memory=False)
    assert any("value unfused" in e for e in errors) and any("d weight unfused" in e for e in errors), errors


def test_targets_read_the_rows():
    rows = [dict(framework="torch", impl=i, n=8, d=2, v=16, dtype="float32", seconds=s, memory_bytes=m)
            for i, s, m in (("fused", 1.2, 100), ("unfused", 1.0, 1000), ("framework CE", 1.0, 1000))]
    got = {t["target"]: (round(t["ratio"], 6), t["status"]) for t in B.targets(rows)}
    assert got == {"memory <= 1/8 of the logits' bytes": (round(100 / (4 * 8 * 16), 6), "MISSED"),
                   "time <= 1.15x unfused softmax_focal_loss": (1.2, "MISSED"),
                   "time <= 1.3x framework CE": (1.2, "MET")}
