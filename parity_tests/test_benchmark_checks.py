"""The benchmark's correctness verdict (``examples/benchmark.py``: ``compare``, ``rel_err``, ``CHECK_RTOL``).

``test_benchmark.py`` runs the whole benchmark with grossly broken implementations (a wrong γ, a dropped
factor). These tests hold the verdict itself to errors of the size a subtle bug gives: a value or a gradient
off by 1e-4 relative, one gradient element with its sign flipped. Each must fail the check on its own (so
that neither the value nor the gradient can be left out of the verdict), while ours as it is, against the
float64 reference, passes. And the tolerance may be no looser than the float32 agreement needs.
"""

from __future__ import annotations

import numpy as np
import pytest

from parity_tests import _harness as H
from parity_tests.test_benchmark import load_benchmark

torch = pytest.importorskip("torch")

BENCH = load_benchmark()

# One case per kind, at its tiny size (the reference is cheap there).
CASES = [next(c for c in BENCH.CASES if c.kind == kind and c.suite == "cpu") for kind in ("sigmoid", "softmax",
                                                                                           "asl", "qfl")]


def _ours(case) -> tuple[tuple[float, np.ndarray], tuple[float, np.ndarray]]:
    """(ours in float32, the float64 reference) on the benchmark's own inputs for ``case``: (value, gradient)."""
    import focal_torch

    logits, targets = BENCH.make_inputs(case.kind, case.tiny, BENCH.SEED)
    x = torch.tensor(logits, requires_grad=True)
    t = torch.as_tensor(targets)
    if case.kind == "sigmoid":
        out = focal_torch.sigmoid_focal_loss(x, t, gamma=case.gamma, alpha=BENCH.ALPHA)
    elif case.kind == "softmax":
        out = focal_torch.softmax_focal_loss(x, t, gamma=case.gamma)
    elif case.kind == "asl":
        out = focal_torch.asymmetric_loss(x, t, gamma_pos=BENCH.ASL_GAMMA_POS, gamma_neg=case.gamma,
                                          clip=BENCH.ASL_CLIP)
    else:
        out = focal_torch.quality_focal_loss(x, t, beta=case.gamma)
    out.backward()
    ref = BENCH.reference_result(case, logits, targets)
    assert ref is not None
    return (float(out.detach()), x.grad.numpy()), ref


def _verdict(got: tuple[float, np.ndarray], want: tuple[float, np.ndarray]) -> dict:
    checks: list[dict] = []
    BENCH.compare(checks, "torch", "case", "ours vs float64 reference", got, want)
    assert len(checks) == 1
    return checks[0]


def _largest(g: np.ndarray) -> int:
    return int(np.argmax(np.abs(g).reshape(-1)))


def _typical(g: np.ndarray) -> int:
    """An element of median magnitude among the non-zero ones."""
    a = np.abs(g).reshape(-1)
    nz = np.flatnonzero(a)
    return int(nz[np.argsort(a[nz])[nz.size // 2]])


def _with(g: np.ndarray, index: int, factor: float) -> np.ndarray:
    out = g.copy().reshape(-1)
    out[index] = out[index] * factor
    return out.reshape(g.shape)


# Errors a real bug gives, each alone: (name, f(value) -> value, f(grad) -> grad).
ERRORS = {
    "value-1e-4": (lambda v: v * (1 + 1e-4), lambda g: g),
    "value-minus-1e-4": (lambda v: v * (1 - 1e-4), lambda g: g),
    "gradient-1e-4": (lambda v: v, lambda g: (g.astype(np.float64) * (1 + 1e-4)).astype(g.dtype)),
    "largest-gradient-element-1e-4": (lambda v: v, lambda g: _with(g, _largest(g), 1 + 1e-4)),
    "gradient-sign-flip-in-one-element": (lambda v: v, lambda g: _with(g, _typical(g), -1.0)),
    "gradient-nan-in-one-element": (lambda v: v, lambda g: _with(g, _typical(g), np.nan)),
}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_ours_passes_against_the_float64_reference(case):
    """The control: without an error the verdict is a pass (the checks below fail for the error alone)."""
    got, want = _ours(case)
    check = _verdict(got, want)
    assert check["passed"], check
    assert check["rtol"] == BENCH.CHECK_RTOL


@pytest.mark.parametrize("error", list(ERRORS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_an_error_of_a_real_bug_fails_the_check(case, error):
    got, want = _ours(case)
    on_value, on_grad = ERRORS[error]
    broken = (float(on_value(got[0])), on_grad(got[1]))
    check = _verdict(broken, want)
    assert not check["passed"], (error, check)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_an_error_in_the_expected_side_fails_the_check_too(case):
    """A wrong expected gradient (a broken peer, compared as ``want``) fails as a wrong ``got`` does."""
    got, want = _ours(case)
    check = _verdict(got, (want[0], _with(np.asarray(want[1]), _typical(np.asarray(want[1])), -1.0)))
    assert not check["passed"], check


def test_check_rtol_is_no_looser_than_the_float32_contract():
    """The parity suite's float32 contract is 2e-6 (17 ulps) of the condition scale, times the modulator's
    condition number 1 + γ (γ up to 4 in the benchmark's cases, the asymmetric loss's γ₋). That is 1e-5: a
    correct float32 implementation never needs more, and the agreement measured on the benchmark's inputs
    (test_measured_disagreement_is_far_below_check_rtol) is near 1e-6. A tolerance 100 times looser (1e-3)
    would pass a value or a gradient off by 1e-4, which is a bug, not rounding."""
    max_gamma = max(case.gamma for case in BENCH.CASES)
    bound = H.TOLERANCES["float32"]["rtol"] * (1.0 + max_gamma) * (1.0 + 1e-12)  # 2e-6 x 5, rounded up
    assert max_gamma <= 4.0
    assert 0.0 < BENCH.CHECK_RTOL <= bound, (BENCH.CHECK_RTOL, bound)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_measured_disagreement_is_far_below_check_rtol(case):
    """Ours against the float64 reference disagrees by a few float32 ulps; CHECK_RTOL sits above that with
    room (a correct run never fails), and the 1e-4 errors above sit 10 times above CHECK_RTOL."""
    got, want = _ours(case)
    value_err = BENCH.rel_err(np.asarray([got[0]]), np.asarray([want[0]]))
    grad_err = BENCH.rel_err(got[1], want[1])
    assert max(value_err, grad_err) <= BENCH.CHECK_RTOL / 4, (value_err, grad_err)
    assert 1e-4 >= 10 * BENCH.CHECK_RTOL
