"""The benchmark's ``--smoke`` run: every case and implementation is timed, every number is sane, every
correctness check runs and passes, and a broken implementation makes the run fail.

Timings are not gated here (tiny sizes on a shared machine say nothing about speed). The GPU case list
runs at tiny sizes on the CPU, so the code path of ``--device cuda`` (bandwidth against a copy) runs too.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
HAS_KORNIA = importlib.util.find_spec("kornia") is not None


def load_benchmark():
    spec = importlib.util.spec_from_file_location("_example_benchmark", EXAMPLES / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = load_benchmark()
TORCHVISION_FORMULA = BENCH.torchvision_formula


FAMILY_PEER = {"asl": "timm ASL formula", "qfl": "mmdet QFL formula"}  # the same name in both frameworks


def expected_impls(backend: str, kind: str) -> set[str]:
    if backend == "torch":
        peers = {"sigmoid": ["torchvision formula"], "softmax": ["naive formula"], **{
            k: [v] for k, v in FAMILY_PEER.items()}}[kind]
        peers += [BENCH.KORNIA[kind]] if HAS_KORNIA and kind in BENCH.KORNIA else []
        return {"ours", BENCH.TORCH_CE[kind], "copy", *peers}
    peer = {"sigmoid": "optax.sigmoid_focal_loss", "softmax": "naive formula", **FAMILY_PEER}[kind]
    return {"ours", BENCH.JAX_CE[kind], "copy", peer}


def expected_traffic(kind: str, backend: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(focal loss, copy) bytes: forward reads logits and targets, backward reads them again and writes
    the gradient; a copy reads and writes the logits."""
    logits = 4 * math.prod(shape)
    if kind != "softmax":
        targets = logits  # float32 targets: 0/1, multi-hot or soft
    else:
        positions = math.prod(shape) // shape[1]
        targets = positions * (8 if backend == "torch" else 4)  # int64 labels in torch, int32 in JAX
    return 2 * (logits + targets) + logits, 2 * logits


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    folder = tmp_path_factory.mktemp("benchmark")
    path, markdown = folder / "smoke.json", folder / "smoke.md"
    returned = BENCH.main(["--smoke", "--json", str(path), "--markdown", str(markdown)])
    assert path.is_file(), "--json did not write its file"
    result = json.loads(path.read_text())
    result["markdown"] = markdown.read_text()
    return result, returned


def test_smoke_runs_both_case_lists_at_tiny_sizes(smoke):
    result, returned = smoke
    assert returned["passed"] is True and result["passed"] is True
    assert result["smoke"] is True and result["suite"] == "all" and result["sizes"] == "tiny"
    ran = {(r["case"], tuple(r["shape"])) for r in result["rows"]}
    assert ran == {(case.id, case.tiny) for case in BENCH.CASES}
    assert {case.suite for case in BENCH.CASES} == {"cpu", "gpu"}


def test_every_implementation_is_timed(smoke):
    result, _ = smoke
    for case in BENCH.CASES:
        for backend in ("torch", "jax"):
            impls = {r["impl"] for r in result["rows"] if r["case"] == case.id and r["backend"] == backend}
            assert impls == expected_impls(backend, case.kind), (case.id, backend)
    for row in result["rows"]:
        where = (row["case"], row["backend"], row["impl"])
        assert row["rounds"] == result["rounds"] == len(row["times_s"]) >= 1, where
        assert all(math.isfinite(t) and t > 0 for t in row["times_s"]), where
        assert row["min_s"] == min(row["times_s"]) and row["median_s"] >= row["min_s"], where
        assert isinstance(row["calls_per_timing"], int) and row["calls_per_timing"] >= 1, where


def test_ratios_are_taken_against_the_framework_cross_entropy(smoke):
    result, _ = smoke
    for row in result["rows"]:
        group = {r["impl"]: r for r in result["rows"] if r["case"] == row["case"] and r["backend"] == row["backend"]}
        ce = group[(BENCH.TORCH_CE if row["backend"] == "torch" else BENCH.JAX_CE)[row["kind"]]]
        assert row["vs_ce"] == pytest.approx(row["min_s"] / ce["min_s"], rel=1e-12), row["impl"]
        assert row["vs_ce_median"] == pytest.approx(row["median_s"] / ce["median_s"], rel=1e-12), row["impl"]
        peers = [r for r in group.values() if r["role"] == "peer"]
        best = min(peers, key=lambda r: r["min_s"])
        assert row["best_peer"] == best["impl"]
        assert row["vs_best_peer"] == pytest.approx(row["min_s"] / best["min_s"], rel=1e-12), row["impl"]


def test_bandwidth_is_minimal_traffic_over_time_against_a_copy(smoke):
    result, _ = smoke
    for row in result["rows"]:
        focal, copy = expected_traffic(row["kind"], row["backend"], tuple(row["shape"]))
        assert row["traffic_bytes"] == (copy if row["role"] == "copy" else focal), (row["case"], row["impl"])
        assert row["gbps"] == pytest.approx(row["traffic_bytes"] / row["min_s"] / 1e9, rel=1e-12)
        copy_row = next(r for r in result["rows"]
                        if r["case"] == row["case"] and r["backend"] == row["backend"] and r["role"] == "copy")
        assert row["of_copy"] == pytest.approx(row["gbps"] / copy_row["gbps"], rel=1e-12)


def test_memory_counters(smoke):
    result, _ = smoke
    for row in result["rows"]:
        if row["role"] == "copy":
            assert row["memory_bytes"] is None
            continue
        assert isinstance(row["memory_bytes"], int) and row["memory_bytes"] >= 0, (row["case"], row["impl"])
        if row["impl"] == "F.binary_cross_entropy_with_logits":  # it keeps its two inputs
            assert row["memory_bytes"] == 2 * 4 * math.prod(row["shape"]), row["case"]


def test_correctness_checks_ran_and_passed(smoke):
    result, _ = smoke
    ran = {(c["backend"], c["case"], c["check"]) for c in result["checks"]}
    for case in BENCH.CASES:
        for backend in ("torch", "jax"):
            assert (backend, case.id, "ours vs float64 reference") in ran, (backend, case.id)
            ce = (BENCH.TORCH_CE if backend == "torch" else BENCH.JAX_CE)[case.kind]
            zero = f"ours({BENCH.GAMMA0_LABEL[case.kind]})"
            assert any(b == backend and c == case.id and name.startswith(zero) and name.endswith(ce)
                       for b, c, name in ran), (backend, case.id)
            for impl in expected_impls(backend, case.kind) - {"ours", "copy", ce}:
                assert any(b == backend and c == case.id and name.startswith(f"ours vs {impl}")
                           for b, c, name in ran), (backend, case.id, impl)
        assert ("jax/torch", case.id, "ours: JAX vs PyTorch") in ran
    for check in result["checks"]:
        assert check["passed"] and check["finite"], check
        assert check["value_rel_err"] <= check["rtol"] and check["grad_rel_err"] <= check["rtol"], check


def test_targets_are_reported_but_not_meaningful_at_smoke_sizes(smoke):
    result, _ = smoke
    first = [t for t in result["targets"] if t["target"] == "first call / later calls"]
    focal = [t for t in result["targets"] if t not in first]
    # a target against the fastest peer names that peer: "ours / fastest peer (naive formula)"
    reported = {(t["case"], t["backend"], t["target"].split(" (")[0]) for t in focal}
    assert reported == {(t.case, t.backend, f"ours / {t.against}") for t in BENCH.TARGETS}
    assert {t["case"] for t in first} == {c.id for c in BENCH.CASES if c.kind in ("sigmoid", "softmax")}
    assert all(t["backend"] == "torch" and t["limit"] == BENCH.FIRST_CALL_LIMIT for t in first)
    assert {t.backend for t in BENCH.TARGETS} == {"torch", "jax"}
    for target in result["targets"]:
        assert target["meaningful"] is False
        assert math.isfinite(target["value"]) and target["value"] > 0, target
        assert target["met"] == (target["value"] < target["limit"] if target["comparison"] == "<"
                                 else target["value"] <= target["limit"])
    for row in result["rows"]:
        if row["targets"]:
            assert row["impl"] == "ours"
            assert {t["backend"] for t in row["targets"]} == {row["backend"]}
            assert row["met"] == all(t["met"] for t in row["targets"])


def test_header_describes_the_run(smoke):
    result, _ = smoke
    env = result["environment"]
    for key in ("date", "command", "source", "cpu_model", "cpu_count", "torch", "jax", "optax", "numpy"):
        assert env.get(key), key
    assert env["command"].startswith("python examples/benchmark.py --smoke --json ")


def test_markdown_table_has_one_line_per_case_and_framework(smoke):
    result, _ = smoke
    lines = result["markdown"].splitlines()
    assert lines[0].startswith("| case | framework | path | ours |") and set(lines[1]) <= set("|-:")
    body = [line.split(" | ") for line in lines[2:]]
    assert {(cells[0].lstrip("| "), cells[1]) for cells in body} == {
        (case.id, backend) for case in BENCH.CASES for backend in ("torch", "jax")}
    assert len(body) == 2 * len(BENCH.CASES)
    assert {cells[2] for cells in body} == {"eager", "jit"}  # the path that served ours, per framework


# A plausible defect in one implementation must make the run fail: exit status 1 and a failed check.


def torchvision_without_alpha(x, t, gamma, alpha):
    return TORCHVISION_FORMULA(x, t, gamma, None)


def naive_with_p_for_one_minus_p(x, y, gamma):
    import torch.nn.functional as F

    lpy = F.log_softmax(x, 1).gather(1, y[:, None]).squeeze(1)
    return -(lpy.exp() ** gamma * lpy).mean()


@pytest.mark.parametrize("attribute, broken, case, check", [
    ("torchvision_formula", torchvision_without_alpha, "sigmoid-8x4-g2", "ours vs torchvision formula"),
    ("naive_softmax_focal", naive_with_p_for_one_minus_p, "softmax-256x10-g2", "ours vs naive formula"),
], ids=["torchvision-formula-without-alpha", "naive-formula-p-for-1-p"])
def test_a_broken_peer_fails_the_run(tmp_path, monkeypatch, attribute, broken, case, check):
    monkeypatch.setattr(BENCH, attribute, broken)
    path = tmp_path / "broken.json"
    assert BENCH.cli(["--smoke", "--only", "torch", "--cases", case, "--rounds", "1", "--json", str(path)]) == 1
    failed = [c["check"] for c in json.loads(path.read_text())["checks"] if not c["passed"]]
    assert failed == [check]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_wrong_gamma_in_ours_fails_the_run(tmp_path, monkeypatch, backend):
    module = pytest.importorskip(f"focal_{backend}")
    right = module.softmax_focal_loss
    monkeypatch.setattr(module, "softmax_focal_loss", lambda *a, gamma, **k: right(*a, gamma=gamma + 1.0, **k))
    path = tmp_path / "broken.json"
    assert BENCH.cli(["--smoke", "--only", backend, "--cases", "softmax-8x4-g2", "--rounds", "1",
                      "--json", str(path)]) == 1
    failed = {c["check"] for c in json.loads(path.read_text())["checks"] if not c["passed"]}
    assert "ours vs float64 reference" in failed and "ours vs naive formula" in failed


def timm_without_clip(backend):
    right = BENCH.timm_asl_formula if backend == "torch" else BENCH.timm_asl_formula_jax
    return lambda x, y, gamma_pos, gamma_neg, clip: right(x, y, gamma_pos, gamma_neg, 0.0)


def mmdet_without_positives(backend):
    right = BENCH.mmdet_qfl_formula if backend == "torch" else BENCH.mmdet_qfl_formula_jax
    return lambda x, score, beta: right(x, 0 * score, beta)


FAMILY_PEERS = {"torch": ("timm_asl_formula", "mmdet_qfl_formula"),
                "jax": ("timm_asl_formula_jax", "mmdet_qfl_formula_jax")}


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("which, breaker, case", [
    (0, timm_without_clip, "asl-256x9605-g4"),
    (1, mmdet_without_positives, "qfl-8192x1024-b2"),
], ids=["timm-asl-formula-without-clip", "mmdet-qfl-formula-without-positives"])
def test_a_broken_family_peer_fails_the_run(tmp_path, monkeypatch, backend, which, breaker, case):
    monkeypatch.setattr(BENCH, FAMILY_PEERS[backend][which], breaker(backend))
    path = tmp_path / "broken.json"
    assert BENCH.cli(["--smoke", "--only", backend, "--cases", case, "--rounds", "1", "--json", str(path)]) == 1
    failed = [c["check"] for c in json.loads(path.read_text())["checks"] if not c["passed"]]
    assert failed == [f"ours vs {FAMILY_PEER[case.split('-')[0]]}"]


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("function, exponent, case", [
    ("asymmetric_loss", "gamma_neg", "asl-256x9605-g4"),
    ("quality_focal_loss", "beta", "qfl-8192x1024-b2"),
], ids=["asl-gamma-neg", "qfl-beta"])
def test_a_wrong_exponent_in_ours_fails_the_family_run(tmp_path, monkeypatch, backend, function, exponent, case):
    module = pytest.importorskip(f"focal_{backend}")
    right = getattr(module, function)

    def wrong(*a, **k):
        return right(*a, **dict(k, **{exponent: k[exponent] + 1.0}))

    monkeypatch.setattr(module, function, wrong)
    path = tmp_path / "broken.json"
    assert BENCH.cli(["--smoke", "--only", backend, "--cases", case, "--rounds", "1", "--json", str(path)]) == 1
    failed = {c["check"] for c in json.loads(path.read_text())["checks"] if not c["passed"]}
    assert "ours vs float64 reference" in failed and f"ours vs {FAMILY_PEER[case.split('-')[0]]}" in failed


def test_float32_gradient_error_is_measured_against_the_scale_of_the_reference():
    """The check's error measure: max |a - b| / max |b|, NaN counted as an infinite error."""
    b = np.array([1.0, -4.0, 2.0], np.float32)
    assert BENCH.rel_err(b, b) == 0.0
    assert BENCH.rel_err(b + np.float32(1e-3), b) == pytest.approx(1e-3 / 4.0, rel=1e-3)
    assert BENCH.rel_err(np.array([1.0, np.nan, 2.0]), b) == math.inf
    assert BENCH.rel_err(b, np.array([1.0, np.nan, 2.0])) == math.inf
    big = np.ones(5 << 22, np.float32)  # more than one chunk; the difference sits in the last one
    other = big.copy()
    other[-1] = 1.5
    assert BENCH.rel_err(other, big) == 0.5


def test_device_cuda_without_a_gpu_is_a_usage_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as exit_info:
        BENCH.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda" in capsys.readouterr().err


def test_a_warning_of_the_library_marks_its_path_a_fallback():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("focal_torch: the kernels are unavailable; using the plain formulas", RuntimeWarning,
                      stacklevel=1)
        warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
    assert BENCH.served_by(caught, "focal_torch", "eager") == (
        "fallback: focal_torch: the kernels are unavailable; using the plain formulas")
    assert BENCH.served_by(caught[1:], "focal_torch", "eager") == "eager"
