"""The benchmark's ``--quick`` run is a correctness smoke test: every case runs, every number is sane.

Timings are not gated here (tiny sizes on a shared machine say nothing about speed); the targets are
only checked to be reported.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
HAS_KORNIA = importlib.util.find_spec("kornia") is not None


def load_benchmark():
    spec = importlib.util.spec_from_file_location("_example_benchmark", EXAMPLES / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_rows() -> set[tuple[str, str, str]]:
    sigmoid = {
        "jax": ["ours", "optax.sigmoid_focal_loss", "optax.sigmoid_binary_cross_entropy"],
        "torch": ["ours", "torchvision formula", "F.binary_cross_entropy_with_logits"]
        + (["kornia.binary_focal_loss_with_logits"] if HAS_KORNIA else []),
    }
    softmax = {
        "jax": ["ours", "optax.softmax_cross_entropy_with_integer_labels"],
        "torch": ["ours", "F.cross_entropy"] + (["kornia.focal_loss"] if HAS_KORNIA else []),
    }
    cases = {"sigmoid-2^20": sigmoid, "sigmoid-2^23": sigmoid,
             "softmax-segmentation": softmax, "softmax-1000-classes": softmax}
    return {(backend, case, impl) for case, impls in cases.items() for backend, names in impls.items()
            for impl in names}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("benchmark") / "b.json"
    returned = load_benchmark().main(["--quick", "--json", str(path)])
    assert path.is_file(), "--json did not write its file"
    return json.loads(path.read_text()), returned


def test_every_case_is_timed_and_measured(quick_run):
    result, _ = quick_run
    rows = {(r["backend"], r["case"], r["impl"]): r for r in result["rows"]}
    assert set(rows) == expected_rows()
    for key, row in rows.items():
        assert len(row["times_ms"]) == result["repeats"] >= 1, key
        assert all(math.isfinite(t) and t > 0 for t in row["times_ms"]), key
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0, key
        assert isinstance(row["memory_bytes"], int) and row["memory_bytes"] > 0, key
        assert row["memory_kind"] == ("temp_size_in_bytes" if key[0] == "jax" else "saved_for_backward_bytes")
        assert math.isfinite(row["ratio_ce"]) and row["ratio_ce"] > 0, key
        assert math.isfinite(row["memory_ratio_ce"]) and row["memory_ratio_ce"] > 0, key


def test_cross_entropy_ratios_are_one(quick_run):
    result, _ = quick_run
    for row in result["rows"]:
        if row["role"] == "ce":
            assert row["ratio_ce"] == 1.0 and row["memory_ratio_ce"] == 1.0, row["impl"]


def test_torch_cross_entropy_saves_what_autograd_is_known_to_save(quick_run):
    """BCE-with-logits keeps its two inputs: a check of the saved-bytes counter itself."""
    result, _ = quick_run
    for row in result["rows"]:
        if row["backend"] == "torch" and row["impl"] == "F.binary_cross_entropy_with_logits":
            assert row["memory_bytes"] == 2 * row["input_bytes"], row["case"]


def test_correctness_checks_ran_and_passed(quick_run):
    result, _ = quick_run
    checks = result["checks"]
    ran = {(c["backend"], c["case"], c["check"]) for c in checks}
    for case in ("sigmoid-2^20", "sigmoid-2^23", "softmax-segmentation", "softmax-1000-classes"):
        for backend in ("jax", "torch", "jax/torch"):
            assert any(b == backend and c == case for b, c, _ in ran), f"no {backend} check for {case}"
        assert ("jax", case, "ours vs optax.sigmoid_focal_loss") in ran or case.startswith("softmax")
        assert ("torch", case, "ours vs torchvision formula") in ran or case.startswith("softmax")
    for check in checks:
        assert check["passed"], check
        assert check["value_rel_err"] <= check["rtol"] and check["grad_rel_err"] <= check["rtol"], check


def test_targets_are_reported_but_not_gated(quick_run):
    result, returned = quick_run
    assert result["quick"] is True and returned["quick"] is True
    assert result["targets"], "no target was checked"
    seen = {(t["backend"], t["target"].split(" / ")[0]) for t in result["targets"]}
    assert {("jax", "time"), ("jax", "memory"), ("torch", "time"), ("torch", "memory"),
            ("torch", "saved for backward")} <= seen
    for target in result["targets"]:
        assert target["timing_gate"] is False
        assert math.isfinite(target["value"]) and target["value"] > 0, target
