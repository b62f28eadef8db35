"""torch's compiled kernels (``focal_torch._compiled``): large inputs run the eager kernels' own code compiled by
inductor (its CPU backend here, the code a GPU gets from Triton). Which inputs take them, that they meet the
precision contract against the float64 reference, keep the memory of the eager path, need no new kernel for a new
γ, and fall back to the eager kernels, with a warning, where compiling fails."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from focal_spec import reference
from parity_tests import _harness as H

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.fixture
def compiled(monkeypatch):
    """Every input takes the compiled kernels (the threshold lowered to 0)."""
    from focal_torch import _compiled

    monkeypatch.setattr(_compiled, "COMPILE_MIN", 0)
    monkeypatch.setattr(_compiled, "_enabled", True)
    monkeypatch.setattr(_compiled, "_failed", None)
    monkeypatch.setattr(_compiled, "_seen", {})
    return _compiled


def _spy(monkeypatch, module):
    """Counts the calls of ``module.run`` that returned a result (a compiled kernel ran)."""
    calls = []
    real = module.run

    def run(name, *args, **kw):
        out = real(name, *args, **kw)
        if out is not None:
            calls.append(name)
        return out

    monkeypatch.setattr(module, "run", run)
    return calls


def test_large_inputs_take_the_compiled_kernels_and_small_ones_do_not(monkeypatch):
    import focal_torch as ft
    from focal_torch import _compiled

    monkeypatch.setattr(_compiled, "_failed", None)
    calls = _spy(monkeypatch, _compiled)
    n = _compiled.COMPILE_MIN
    for size in (n - 1, n):
        x = torch.randn(size, requires_grad=True)
        torch.autograd.grad(ft.sigmoid_focal_loss(x, torch.rand(size)), x)
        xs = torch.randn(size // 4, 4, requires_grad=True)
        torch.autograd.grad(ft.softmax_focal_loss(xs, torch.randint(0, 4, (size // 4,))), xs)
    assert calls == ["sigmoid", "softmax"]
    monkeypatch.setattr(_compiled, "_enabled", False)
    x = torch.randn(n, requires_grad=True)
    torch.autograd.grad(ft.sigmoid_focal_loss(x, torch.rand(n)), x)
    assert calls == ["sigmoid", "softmax"]


# ----------------------------------------------------------------------------------------
# The precision contract, through the compiled kernels.
# ----------------------------------------------------------------------------------------

SIGMOID_CASES = [
    dict(gamma=2.0, reduction="none", alpha=0.25, weight=None, label_smoothing=0.0, targets="hard", where=None),
    dict(gamma=0.5, reduction="mean", alpha=None, weight="per_class", label_smoothing=0.1, targets="soft",
         where="mask"),
    dict(gamma=0.0, reduction="sum", alpha="per_class", weight=None, label_smoothing=0.0, targets="soft",
         where=None),
]


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("case", range(len(SIGMOID_CASES)))
def test_sigmoid_compiled_meets_the_contract(compiled, monkeypatch, case, dtype):
    calls = _spy(monkeypatch, compiled)
    inp = H.sigmoid_inputs({**SIGMOID_CASES[case], "dtype": dtype, "shape": (64, 5, 3, 2)})
    v, g = H.run_torch("sigmoid", inp)
    H.expected("sigmoid", inp).check(v, g, dtype, "torch compiled")
    assert calls and set(calls) == {"sigmoid"}


SOFTMAX_CASES = [
    dict(gamma=2.0, reduction="mean", weight=None, shape=(64, 7)),
    dict(gamma=0.5, reduction="none", weight="per_class", shape=(4, 5, 3, 6)),
    dict(gamma=0.0, reduction="sum", weight=None, shape=(4, 5, 3, 6)),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", range(len(SOFTMAX_CASES)))
def test_softmax_compiled_meets_the_contract(compiled, monkeypatch, case, dtype):
    calls = _spy(monkeypatch, compiled)
    spec = {**SOFTMAX_CASES[case], "dtype": dtype, "labels": "index", "label_smoothing": 0.0, "ignore": None,
            "where": None}
    inp = H.softmax_inputs(spec)
    v, g = H.run_torch("softmax", inp)
    H.expected("softmax", inp).check(v, g, dtype, "torch compiled")
    assert calls == ["softmax"]


@pytest.mark.parametrize("label_dtype", ["uint8", "int32", "int64"])
@pytest.mark.parametrize("axis", [0, 2, -1])
def test_softmax_compiled_class_axes_and_label_dtypes(compiled, monkeypatch, axis, label_dtype):
    """The kernel on a class dim other than 1, with small integer label dtypes, against the reference."""
    import focal_torch as ft
    from parity_tests.test_torch_softmax_inputs import _label_entry_exact

    calls = _spy(monkeypatch, compiled)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 6, 7, generator=g) * 4
    c = x.shape[axis]
    y = torch.randint(0, c, tuple(s for i, s in enumerate(x.shape) if i != axis % 3), generator=g)
    y = y.to(getattr(torch, label_dtype))
    for gamma in (2.0, 0.5):
        v, grad = H.torch_value_and_grad(lambda z, gamma=gamma: ft.softmax_focal_loss(z, y, gamma=gamma, dim=axis,
                                                                                    reduction="none"), x)
        ref_v, ref_g = reference.softmax_focal_loss(x.double().numpy(), y.long().numpy(), axis=axis, gamma=gamma,
                                                    reduction="none")
        H.assert_close(v, ref_v, "float32", f"axis={axis} gamma={gamma} value")
        H.assert_close(grad, _label_entry_exact(ref_g, y.long().numpy(), axis), "float32",
                       f"axis={axis} gamma={gamma} gradient")
    assert calls == ["softmax", "softmax"]


PREC_X = np.float32(np.concatenate([np.linspace(-100, 100, 401), [15.0, 30.0, 60.0, 87.0, 88.5]]))


@pytest.mark.parametrize("target", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 1.5], ids=lambda g: f"gamma={g}")
def test_sigmoid_compiled_keeps_float32_digits_at_any_logit(compiled, gamma, target):
    """Confident predictions keep their loss and gradient to a few ulps (inductor's own exp, log1p and sigmoid)."""
    import focal_torch as ft

    x = torch.tensor(PREC_X)
    t = torch.full_like(x, target)
    v, g = H.torch_value_and_grad(lambda z: ft.sigmoid_focal_loss(z, t, gamma=gamma, reduction="none"), x)
    ref_v, ref_g = reference.sigmoid_focal_loss(x.double().numpy(), t.double().numpy(), gamma=gamma,
                                                reduction="none")
    held = H.Inputs(x.double().numpy(), t.double().numpy(), {"gamma": gamma, "reduction": "none", "alpha": 0.25,
                                                             "label_smoothing": 0.0}, "float32")
    sv, sg = H.sigmoid_scales(held)
    H.assert_close(v, ref_v, "float32", "value", scale=sv)
    H.assert_close(g, ref_g, "float32", "gradient", scale=sg)


@pytest.mark.parametrize("gamma", [0.0, 2.0, 0.5], ids=lambda g: f"gamma={g}")
def test_softmax_compiled_keeps_digits_of_dominant_classes(compiled, gamma):
    import focal_torch as ft

    rows = []
    for m in (0.0, 1.0, 10.0, 17.0, 20.0, 50.0, 87.0, 100.0):
        rows += [[m, 0, 0, 0], [0, m, 0, 0], [m, m, 0, -m], [m, m / 2, -m / 2, 0]]
    x = np.float32(rows).astype(np.float64)
    y = np.zeros(len(rows), np.int64)
    ref_v, ref_g = reference.softmax_focal_loss(x, y, axis=1, gamma=gamma, reduction="none")
    v, g = H.torch_value_and_grad(lambda z: ft.softmax_focal_loss(z, torch.as_tensor(y), gamma=gamma,
                                                                  reduction="none"),
                                  torch.tensor(x, dtype=torch.float32))
    from parity_tests.test_torch_softmax_inputs import _label_entry_exact

    H.assert_close(v, ref_v, "float32", "value")
    H.assert_close(g, _label_entry_exact(ref_g, y), "float32", "gradient")


# ----------------------------------------------------------------------------------------
# What the eager kernels promise, kept: equal results, memory, layouts, no kernel per γ value.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_and_eager_kernels_agree(monkeypatch, reduction):
    import focal_torch as ft
    from focal_torch import _compiled

    monkeypatch.setattr(_compiled, "_failed", None)
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(256, 80, generator=g) * 4).requires_grad_()
    t = (torch.rand(256, 80, generator=g) < 0.3).float()  # hard targets: every gradient is relative-accurate
    xs = (torch.randn(512, 40, generator=g) * 4).requires_grad_()
    y = torch.randint(0, 40, (512,), generator=g)
    out = {}
    for on in (True, False):
        monkeypatch.setattr(_compiled, "_enabled", on)
        out[on] = [H.torch_value_and_grad(lambda z: ft.sigmoid_focal_loss(z, t, reduction=reduction), x),
                   H.torch_value_and_grad(lambda z: ft.softmax_focal_loss(z, y, reduction=reduction), xs)]
    bound = 2 * 2e-6 * 3  # each within the float32 contract (K = 1 + γ) of the reference
    for (va, ga), (vb, gb) in zip(out[True], out[False], strict=True):
        np.testing.assert_allclose(va, vb, rtol=bound, atol=0)
        np.testing.assert_allclose(ga, gb, rtol=bound, atol=float(np.finfo(np.float32).tiny))


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_a_new_gamma_or_batch_size_needs_no_new_kernel(compiled, loss):
    import focal_torch as ft

    def inputs(n):
        x = torch.randn(n, 10, requires_grad=True)
        return x, (torch.rand(n, 10) if loss == "sigmoid" else torch.randint(0, 10, (n,)))

    fn = ft.sigmoid_focal_loss if loss == "sigmoid" else ft.softmax_focal_loss
    x, t = inputs(64)
    torch.autograd.grad(fn(x, t, gamma=0.7, reduction="mean"), x)
    kernels = len(compiled._kernels)
    for gamma, n in ((0.5, 64), (1.3, 33), (2.5, 7), (0.25, 1000)):
        x, t = inputs(n)
        v, g = H.torch_value_and_grad(lambda z, gamma=gamma, t=t: fn(z, t, gamma=gamma, reduction="mean"), x)
        kw = {"axis": 1} if loss == "softmax" else {}
        ref_v, ref_g = getattr(reference, f"{loss}_focal_loss")(x.detach().double().numpy(), t.double().numpy()
                                                               if loss == "sigmoid" else t.numpy(),
                                                               gamma=gamma, reduction="mean", **kw)
        H.assert_close(v, ref_v, "float32", f"gamma={gamma}", scale=np.abs(ref_v) * 4)
        H.assert_close(g, ref_g, "float32", f"gamma={gamma}", scale=np.abs(ref_g).max() * 4)
    assert len(compiled._kernels) == kernels


def test_small_inputs_compile_after_warm_calls(monkeypatch):
    """Below COMPILE_MIN the eager kernels serve the first WARM_CALLS - 1 calls of a key; that call compiles."""
    import focal_torch as ft
    from focal_torch import _compiled

    monkeypatch.setattr(_compiled, "_enabled", True)
    monkeypatch.setattr(_compiled, "_failed", None)
    monkeypatch.setattr(_compiled, "_kernels", {})
    monkeypatch.setattr(_compiled, "_seen", {})
    monkeypatch.setattr(_compiled, "_calls", {})
    calls = _spy(monkeypatch, _compiled)
    x = torch.randn(6, 5, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    for i in range(_compiled.WARM_CALLS):
        v, g = H.torch_value_and_grad(lambda z: ft.softmax_focal_loss(z, y), x)
        assert calls == ([] if i < _compiled.WARM_CALLS - 1 else ["softmax"])
        ref_v, ref_g = reference.softmax_focal_loss(x.detach().double().numpy(), y.numpy(), axis=1)
        H.assert_close(v, ref_v, "float32", "value")
        H.assert_close(g, ref_g, "float32", "gradient", scale=np.abs(ref_g).max() * 4)
    assert len(_compiled._kernels) == 1


def test_sizes_of_one_and_layouts_select_their_own_kernel(compiled, monkeypatch):
    """Which sizes are 1 and which are equal is part of a kernel's key (tracing specialises 1 and gives equal sizes
    one symbol); a layout other than contiguous or channels_last runs the eager kernels, without a warning."""
    import warnings

    import focal_torch as ft

    monkeypatch.setattr(compiled, "_kernels", {})
    calls = _spy(monkeypatch, compiled)
    for shape in ((5, 7), (1, 7), (5, 1), (3, 7), (7, 7), (4, 9)):
        x = (torch.randn(shape) * 3).requires_grad_()
        t = (torch.rand(shape) < 0.3).float()
        v, g = H.torch_value_and_grad(lambda z, t=t: ft.sigmoid_focal_loss(z, t, reduction="none"), x)
        ref_v, ref_g = reference.sigmoid_focal_loss(x.detach().double().numpy(), t.double().numpy(),
                                                    reduction="none")
        H.assert_close(v, ref_v, "float32", f"{shape} value")
        H.assert_close(g, ref_g, "float32", f"{shape} gradient")
    assert calls == ["sigmoid"] * 6 and len(compiled._kernels) == 4
    x = torch.randn(7, 5).t().requires_grad_()  # neither layout
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.autograd.grad(ft.sigmoid_focal_loss(x, torch.rand(5, 7)), x)
    assert calls == ["sigmoid"] * 6 and compiled.compiled_kernels_enabled()


def test_the_thread_count_is_part_of_the_key_and_of_inductors_cache_key(compiled, monkeypatch):
    """OpenMP code bakes the thread count in: a process that compiled with one thread (a DDP worker) must not leave
    a serial kernel in inductor's disk cache for processes with more."""
    import torch._inductor.compile_fx as cfx
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(compiled, "_kernels", {})
    seen = []
    real = cfx.compile_fx_inner

    def spy(*a, **kw):
        seen.append(inductor_config.cpp.threads)
        return real(*a, **kw)

    monkeypatch.setattr(cfx, "compile_fx_inner", spy)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for size in (compiled.PARALLEL_MIN, 64):  # a small input gets a single-threaded kernel of its own
                out = compiled.run("probe", lambda v: v * 2.0, torch.ones(size))
                assert torch.equal(out, torch.full((size,), 2.0))
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 2] and len(compiled._kernels) == 2


def test_a_kernel_that_branches_on_a_size_is_refused(compiled):
    """Kernels run without guards: a trace that assumed anything of the sizes but their equality is refused."""
    def branchy(x):
        return x * 2.0 if x.shape[0] > 3 else x * 3.0

    with pytest.warns(RuntimeWarning, match="assumes"):
        assert compiled.run("probe", branchy, torch.randn(5, 2)) is None
    assert not compiled.compiled_kernels_enabled()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_sigmoid_saves_at_most_two_input_sized_arrays_above_fuse_max(compiled, monkeypatch, reduction):
    import focal_torch as ft
    from focal_torch import _sigmoid
    from parity_tests.test_torch_specific import _saved_bytes

    x = torch.randn(64, 32, requires_grad=True)
    t = torch.rand(64, 32)
    size = x.numel() * x.element_size()
    monkeypatch.setattr(_sigmoid, "FUSE_MAX", x.numel() - 1)
    calls = _spy(monkeypatch, compiled)
    assert _saved_bytes(lambda: ft.sigmoid_focal_loss(x, t, reduction=reduction)) <= 2 * size + 64
    assert calls == ["sigmoid"]


def test_compiled_softmax_saves_no_more_than_cross_entropy(compiled):
    import focal_torch as ft
    from parity_tests.test_torch_specific import _saved_bytes

    x = torch.randn(2, 21, 8, 8, requires_grad=True)
    y = torch.randint(0, 21, (2, 8, 8))
    assert _saved_bytes(lambda: ft.softmax_focal_loss(x, y)) <= _saved_bytes(lambda: F.cross_entropy(x, y))


def test_compiled_channels_last_input(compiled):
    import focal_torch as ft

    x = (torch.randn(4, 6, 5, 5) * 3).to(memory_format=torch.channels_last)
    t = (torch.rand(4, 6, 5, 5) < 0.3).double()
    y = torch.randint(0, 6, (4, 5, 5))
    from parity_tests.test_torch_softmax_inputs import _label_entry_exact

    xd = x.double()
    assert not xd.is_contiguous() and xd.is_contiguous(memory_format=torch.channels_last)
    for fn, target, kw in ((ft.sigmoid_focal_loss, t, {}), (ft.softmax_focal_loss, y, {"axis": 1})):
        v, g = H.torch_value_and_grad(lambda z, fn=fn, target=target: fn(z, target, reduction="none"), xd)
        ref_v, ref_g = getattr(reference, fn.__name__)(xd.numpy(), target.numpy(), reduction="none", **kw)
        if fn is ft.softmax_focal_loss:
            ref_g = _label_entry_exact(ref_g, y.numpy())
        H.assert_close(v, ref_v, "float64", fn.__name__)
        H.assert_close(g, ref_g, "float64", fn.__name__)


# ----------------------------------------------------------------------------------------
# The switch, and the fallback where compiling fails.
# ----------------------------------------------------------------------------------------


def test_failed_compilation_warns_once_and_runs_the_eager_kernels(monkeypatch):
    import focal_torch as ft
    from focal_torch import _compiled

    def broken(*args):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(_compiled, "COMPILE_MIN", 0)
    monkeypatch.setattr(_compiled, "_enabled", True)
    monkeypatch.setattr(_compiled, "_failed", None)
    monkeypatch.setattr(_compiled, "_kernels", {})
    monkeypatch.setattr(_compiled, "_seen", {})
    monkeypatch.setattr(_compiled, "_compile", broken)
    x = torch.randn(40, 3, dtype=torch.float64)
    t = torch.rand(40, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"compiled kernels are unavailable \(RuntimeError: no C\+\+ compiler\)"):
        v, g = H.torch_value_and_grad(lambda z: ft.sigmoid_focal_loss(z, t, reduction="sum"), x)
    assert not ft.compiled_kernels_enabled()
    ref_v, ref_g = reference.sigmoid_focal_loss(x.numpy(), t.numpy(), reduction="sum")
    H.assert_close(v, ref_v, "float64", "value")
    H.assert_close(g, ref_g, "float64", "gradient")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ft.softmax_focal_loss(x, torch.zeros(40, dtype=torch.long))  # no second attempt, no second warning


def test_set_compiled_kernels_returns_the_previous_setting(monkeypatch):
    import focal_torch as ft
    from focal_torch import _compiled

    monkeypatch.setattr(_compiled, "_enabled", True)
    monkeypatch.setattr(_compiled, "_failed", None)
    assert ft.set_compiled_kernels(False) is True
    assert not ft.compiled_kernels_enabled()
    assert ft.set_compiled_kernels(True) is False
    assert ft.compiled_kernels_enabled()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        ft.set_compiled_kernels(1)


def test_environment_variable_turns_them_off():
    code = "import focal_torch as ft; print(ft.compiled_kernels_enabled())"
    env = {**os.environ, "FOCAL_TORCH_COMPILE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
