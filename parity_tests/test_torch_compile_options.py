"""Every torch loss under ``torch.compile(fullgraph=True)`` with the option values users pass as Python numbers.

A float option that changes between calls of a compiled step, or any float under ``dynamic=True``, is traced
symbolically: code that inspects it (``math.isfinite``, attributes) breaks the graph, and a range check that is
skipped lets an invalid value through. Each case compiles (``aot_eager``: the tracing is what is tested) and gives
the eager value and gradient for each value; an invalid value raises the spec's error, as in eager mode.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import focal_torch as ft  # noqa: E402

_G = torch.Generator().manual_seed(0)
X = torch.randn(8, 4, generator=_G, dtype=torch.float64) * 2
T = (torch.rand(8, 4, generator=_G, dtype=torch.float64) < 0.4).double()
Y = torch.randint(0, 4, (8,), generator=_G)

# name: (loss of (x, value), two valid values, one invalid value or None)
OPTIONS = {
    "sigmoid-gamma": (lambda x, v: ft.sigmoid_focal_loss(x, T, gamma=v), (2.0, 0.5), -1.0),
    "sigmoid-alpha": (lambda x, v: ft.sigmoid_focal_loss(x, T, alpha=v), (0.25, 0.75), 1.5),
    "sigmoid-label_smoothing": (lambda x, v: ft.sigmoid_focal_loss(x, T, label_smoothing=v), (0.0, 0.1), 2.0),
    "sigmoid-poly1": (lambda x, v: ft.sigmoid_focal_loss(x, T, poly1=v), (1.0, -0.5), float("inf")),
    "sigmoid-reduced_threshold": (lambda x, v: ft.sigmoid_focal_loss(x, T, reduced_threshold=v), (0.5, 0.25), 0.0),
    "softmax-gamma": (lambda x, v: ft.softmax_focal_loss(x, Y, gamma=v), (2.0, 1.5), -1.0),
    "softmax-label_smoothing": (lambda x, v: ft.softmax_focal_loss(x, Y, label_smoothing=v), (0.0, 0.2), -0.1),
    "softmax-poly1": (lambda x, v: ft.softmax_focal_loss(x, Y, poly1=v), (1.0, 2.0), float("nan")),
    "asymmetric-gamma_neg": (lambda x, v: ft.asymmetric_loss(x, T, gamma_neg=v), (4.0, 2.5), -1.0),
    "asymmetric-clip": (lambda x, v: ft.asymmetric_loss(x, T, clip=v), (0.05, 0.1), None),
    "asymmetric-label_smoothing": (lambda x, v: ft.asymmetric_loss(x, T, label_smoothing=v), (0.0, 0.1), 2.0),
    "quality-beta": (lambda x, v: ft.quality_focal_loss(x, T * 0.7, beta=v), (2.0, 1.5), -1.0),
    "varifocal-alpha": (lambda x, v: ft.varifocal_loss(x, T * 0.7, alpha=v), (0.75, 0.5), None),
    "varifocal-gamma": (lambda x, v: ft.varifocal_loss(x, T * 0.7, gamma=v), (2.0, 1.0), -1.0),
}


def _value_and_grad(fn, v):
    x = X.clone().requires_grad_()
    out = fn(x, v)
    return out.detach(), torch.autograd.grad(out, x)[0]


def _error_chain(exc: BaseException) -> list[str]:
    chain: list[str] = []
    e: BaseException | None = exc
    while e is not None:
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return chain


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_compiled_number_option_matches_eager_and_is_checked(name, dynamic):
    fn, values, invalid = OPTIONS[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    # dynamic: the number is symbolic from the start; static: a constant of the graph (the first value only)
    for v in values if dynamic else values[:1]:
        got, expected = _value_and_grad(compiled, v), _value_and_grad(fn, v)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=1e-300)
    if invalid is not None:
        option = name.split("-", 1)[1]
        with pytest.raises(ValueError):
            fn(X, invalid)
        with pytest.raises(Exception) as info:  # fullgraph: Dynamo reports the error it traced as its own
            compiled(X, invalid)
        chain = _error_chain(info.value)
        # the spec's message (torch 2.8 reports only the class of the error it traced)
        assert any(f"Invalid value for argument `{option}`" in m or "ExceptionVariable(<class 'ValueError'>)" in m
                   for m in chain), chain


def test_compiled_sigmoid_with_one_tensor_as_two_options():
    """The same tensor as ``weight`` and ``pos_weight`` (and requiring grad): compiled, the values and both
    gradients are eager's."""
    w = torch.rand(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    res = []
    torch._dynamo.reset()
    for fn in (torch.compile(ft.sigmoid_focal_loss, backend="aot_eager", fullgraph=True), ft.sigmoid_focal_loss):
        x, wl = X.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(x, T, weight=wl, pos_weight=wl)
        res.append((out.detach(), *torch.autograd.grad(out, (x, wl))))
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
