"""PyTorch ``linear_softmax_focal_loss``: the softmax focal loss of ``F.linear``'s logits, computed in chunks.

By definition it is ``softmax_focal_loss(F.linear(input, weight, bias), target, weight=class_weight, dim=-1,
...)``. float64 runs check that identity for every option, in value and in the gradients for ``input``,
``weight``, ``bias`` and ``class_weight`` (autograd of the materialised loss, with a random cotangent);
float32, float16 and bfloat16 runs are held to the float64 reference (``focal_spec.reference`` on the logits of
the held inputs), with a bound that adds the matmul's rounding of the logits to the precision contract.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

import focal_spec

torch = pytest.importorskip("torch")
F = torch.nn.functional

import focal_torch  # noqa: E402

D, V = 6, 11


def _data(n=13, d=D, v=V, dtype=torch.float64, seed=0, ignore=(2, 9)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.5
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    y[[i for i in ignore if i < n]] = -100
    cw = torch.rand(v, generator=g, dtype=torch.float64) + 0.25
    where = torch.rand(n, generator=g) > 0.25
    return x.to(dtype), w.to(dtype), b.to(dtype), y, cw.to(dtype), where


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def _unfused(x, w, y, *, bias=None, class_weight=None, **kw):
    kw.pop("chunk_size", None)
    return focal_torch.softmax_focal_loss(F.linear(x, w, bias), y, weight=class_weight, dim=-1, **kw)


def _both(x, w, b, cw, y, cot_seed=1, **kw):
    """(value, gradients) of the fused and of the materialised loss, with one random cotangent."""
    out = []
    for fn in (focal_torch.linear_softmax_focal_loss, _unfused):
        xl, wl, bl, cwl = _leaves(x, w, b, cw)
        val = fn(xl, wl, y, bias=bl, class_weight=cwl, **kw)
        cot = torch.randn(val.shape, generator=torch.Generator().manual_seed(cot_seed), dtype=val.dtype)
        ins = [t for t in (xl, wl, bl, cwl) if t is not None]
        grads = torch.autograd.grad(val, ins, cot)
        out.append((val.detach(), grads))
    return out


def _assert_identity(fused, unfused, what):
    (v1, g1), (v2, g2) = fused, unfused
    np.testing.assert_allclose(v1.numpy(), v2.numpy(), rtol=1e-12, atol=1e-13, err_msg=f"{what}: value")
    for i, (a, b) in enumerate(zip(g1, g2, strict=True)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-11, atol=1e-13 * float(b.abs().max()) + 1e-300,
                                   err_msg=f"{what}: gradient {i}")


CASES = [dict(gamma=g, label_smoothing=e, reduction=r, cw=c, bias=bb, where=wh, chunk_size=cs)
         for (g, e, r, c), (bb, wh, cs) in zip(
             itertools.product((0.0, 0.5, 2.0), (0.0, 0.1), ("none", "sum", "mean"), (False, True)),
             itertools.cycle(itertools.product((False, True), (False, True), (None, 4, 5, 13, 64))), strict=False)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_identity_with_materialised_logits(case):
    """float64: value and every gradient equal the materialised loss's (chunks that divide 13 positions or not,
    more than the positions, one position)."""
    case = dict(case)
    x, w, b, y, cw, where = _data()
    b = b if case.pop("bias") else None
    cw = cw if case.pop("cw") else None
    where = where if case.pop("where") else None
    res = _both(x, w, b, cw, y, where=where, **case)
    _assert_identity(*res, str(case))


def test_identity_covers_every_option():
    seen = {k: {str(c[k]) for c in CASES} for k in CASES[0]}
    assert seen["gamma"] == {"0.0", "0.5", "2.0"} and seen["reduction"] == {"none", "sum", "mean"}
    assert seen["chunk_size"] == {"None", "4", "5", "13", "64"}
    assert all(len(seen[k]) == 2 for k in ("label_smoothing", "cw", "bias", "where"))


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_more_classes_than_a_chunk_and_fewer(reduction):
    """V larger than the chunk's positions and V smaller; a class weight with a gradient in the mean's
    denominator; a mean over nothing counted is 0 with zero gradients."""
    for v, cs in ((300, 3), (3, 64)):
        x, w, b, y, cw, _ = _data(n=10, v=v, seed=v)
        res = _both(x, w, b, cw, y, reduction=reduction, chunk_size=cs)
        _assert_identity(*res, f"V={v}")
    x, w, b, y, cw, _ = _data(n=4)
    y[:] = -100
    (v1, g1), _ = _both(x, w, b, cw, y, reduction="mean")
    assert float(v1) == 0.0 and all(float(g.abs().max()) == 0.0 for g in g1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [dict(), dict(label_smoothing=0.2), dict(weight=True, ignore_index=3),
                                dict(reduction="sum"), dict(reduction="none", label_smoothing=0.1, weight=True)])
def test_gamma_zero_is_fused_linear_cross_entropy(dtype, kw):
    kw = dict(kw)
    x, w, b, y, cw, _ = _data(n=17, dtype=dtype)
    cw = cw if kw.pop("weight", False) else None
    y[y == -100] = kw.get("ignore_index", -100)
    outs = []
    for fused in (True, False):
        xl, wl, bl = _leaves(x, w, b)
        if fused:
            val = focal_torch.linear_softmax_focal_loss(xl, wl, y, bias=bl, gamma=0.0, class_weight=cw,
                                                        chunk_size=5, **kw)
        else:
            val = F.cross_entropy(F.linear(xl, wl, bl), y, weight=cw, **kw)
        cot = torch.linspace(0.5, 1.5, val.numel(), dtype=dtype).reshape(val.shape)
        outs.append((val.detach(), torch.autograd.grad(val, (xl, wl, bl), cot)))
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][0], outs[1][0], **tol)
    for a, c in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(a, c, **tol)


# ----------------------------------------------------------------------------------------
# Precision: float32 and half precision against the float64 reference on the held inputs' logits.
# ----------------------------------------------------------------------------------------

RTOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _reference(x, w, b, y, *, reduction, **kw):
    """float64 reference (``focal_spec.reference``) on the materialised logits ``F.linear(x, w, b)`` in the held
    dtype: the reduced value, dℓ/dz of it, the per-position values, z, x, W and the softmax (float64)."""
    z = F.linear(x.detach(), w.detach(), None if b is None else b.detach()).double().reshape(-1, w.shape[0]).numpy()
    val, gz = focal_spec.reference.softmax_focal_loss(z, y.reshape(-1).numpy(), axis=-1, reduction=reduction, **kw)
    each, _ = focal_spec.reference.softmax_focal_loss(z, y.reshape(-1).numpy(), axis=-1, reduction="none", **kw)
    p = np.exp(z - z.max(-1, keepdims=True))
    x64 = x.detach().double().reshape(-1, x.shape[-1]).numpy()
    return val, gz, each, z, x64, w.detach().double().numpy(), p / p.sum(-1, keepdims=True)


def _check_precision(dtype, gamma, reduction, smoothing=0.0, n=40, d=16, v=37, seed=3):
    """|fused - reference| within the precision contract: rtol(float32) · K relative to cancellation-free
    magnitudes, carried through the gradient matmuls (float32 accumulation), plus for half precision one
    rounding of each result (and of dℓ/dz before its matmuls). float32: a chunk's matmul may round the logits
    differently from the whole matmul, by at most u·d·Σ|x||W| each; half precision: the logits are those of
    ``F.linear`` (float32 accumulation, one rounding), bit for bit."""
    x, w, b, y, _, _ = _data(n=n, d=d, v=v, seed=seed, ignore=(1, 5))
    x, w, b = (x * 0.7).to(dtype), w.to(dtype), b.to(dtype)
    xl, wl, bl = _leaves(x, w, b)
    val = focal_torch.linear_softmax_focal_loss(xl, wl, y, bias=bl, gamma=gamma, reduction=reduction,
                                                label_smoothing=smoothing, chunk_size=7)
    val.sum().backward()
    ref, gz, each, z, x64, w64, p = _reference(x, w, b, y, reduction=reduction, gamma=gamma,
                                               label_smoothing=smoothing)
    k = 1.0 + gamma
    r32, u32, u = RTOL[torch.float32], U[torch.float32], U[dtype]
    half = dtype != torch.float32
    dz = 0.0 * z if half else u32 * d * (np.abs(x64) @ np.abs(w64).T + np.abs(b.double().numpy()))
    g_abs = np.abs(gz) + p * np.abs(gz).sum(-1, keepdims=True)  # cancellation-free magnitude of dℓ/dz
    factor = 1.0 if reduction != "mean" else 1.0 / max((y != -100).sum().item(), 1)
    per = r32 * k * np.abs(each) * factor + (g_abs * dz).sum(-1)
    bound = (per if reduction == "none" else per.sum()) + RTOL[dtype] * np.abs(ref) * half
    err = np.abs(val.detach().double().numpy() - ref)
    assert np.all(err <= bound), f"value: worst error/bound {np.max(err / bound):.3g}"
    rel = r32 * k + 4 * (k + 1) * dz.max(-1, keepdims=True) + u * half
    for name, got, want, scale, terms in (
            ("input", xl.grad, gz @ w64, (rel * g_abs) @ np.abs(w64), v),
            ("weight", wl.grad, gz.T @ x64, (rel * g_abs).T @ np.abs(x64), n),
            ("bias", bl.grad, gz.sum(0), (rel * g_abs).sum(0), n)):
        tol = scale * (1 + u32 * terms / r32) + RTOL[dtype] * np.abs(want) * half
        e = np.abs(got.double().numpy() - want)
        assert np.all(e <= tol), f"{name}: worst error/bound {np.max(e / tol):.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gamma,reduction,smoothing", [(2.0, "mean", 0.0), (0.5, "none", 0.0), (0.0, "sum", 0.0),
                                                       (2.0, "sum", 0.1)])
def test_precision_against_float64_reference(dtype, gamma, reduction, smoothing):
    _check_precision(dtype, gamma, reduction, smoothing)


def test_confident_positions_keep_their_digits():
    """p_y -> 1: 1 - p_y is summed from the other classes, so the float32 loss is not 0 and keeps its digits."""
    x = torch.tensor([[20.0, 0.0]], requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    y = torch.tensor([0])
    val = focal_torch.linear_softmax_focal_loss(x, w, y, gamma=2.0)
    val.backward()
    r = 2.0 * np.exp(-20.0)
    want = r**2 * np.log1p(r)  # (1 - p)^2 · (-log p), 1 - p ≈ 2 e^-20
    assert abs(val.item() - want) <= 1e-5 * want
    assert x.grad[0, 0].item() < 0.0 and abs(x.grad[0, 0].item()) > 1e-30


# ----------------------------------------------------------------------------------------
# Inputs users pass.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64], ids=str)
def test_label_dtypes_and_layouts(label_dtype):
    """Every integer label dtype; the weight as ``w.t()`` of a (D, V) parameter; hidden states sliced (strided);
    3-d input (B, T, D)."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 5, 2 * D, dtype=torch.float64, generator=g)[..., ::2]  # (B, T, D), not contiguous
    w_dv = torch.randn(D, V, dtype=torch.float64, generator=g)
    y = torch.randint(0, V, (2, 5), generator=g).to(label_dtype)
    ii = 7 if label_dtype == torch.uint8 else -100
    y[0, 1] = ii
    for reduction in ("none", "mean"):
        h1, p1 = _leaves(hidden, w_dv)
        v1 = focal_torch.linear_softmax_focal_loss(h1, p1.t(), y, ignore_index=ii, reduction=reduction, chunk_size=3)
        h2, p2 = _leaves(hidden, w_dv)
        v2 = focal_torch.softmax_focal_loss(h2 @ p2, y.long(), ignore_index=ii, reduction=reduction, dim=-1)
        assert v1.shape == v2.shape == ((2, 5) if reduction == "none" else ())
        cot = torch.rand(v1.shape, dtype=torch.float64, generator=g)
        ga, gb = torch.autograd.grad(v1, (h1, p1), cot), torch.autograd.grad(v2, (h2, p2), cot)
        torch.testing.assert_close(v1, v2, rtol=1e-12, atol=0)
        for a, c in zip(ga, gb, strict=True):
            torch.testing.assert_close(a, c, rtol=1e-11, atol=1e-14)


def test_one_position_and_empty_batch():
    x, w, b, y, _, _ = _data(n=3)
    one = focal_torch.linear_softmax_focal_loss(x[0], w, y[0], bias=b, reduction="none")
    assert one.shape == ()
    torch.testing.assert_close(one, _unfused(x[0], w, y[0], bias=b, reduction="none"), rtol=1e-12, atol=0)
    for reduction, shape in (("none", (0,)), ("sum", ()), ("mean", ())):
        xe = x[:0].clone().requires_grad_()
        we = w.clone().requires_grad_()
        val = focal_torch.linear_softmax_focal_loss(xe, we, y[:0], reduction=reduction)
        assert val.shape == shape and float(val.detach().sum()) == 0.0
        val.sum().backward()
        assert xe.grad.shape == (0, D) and float(we.grad.abs().sum()) == 0.0


def test_where_false_positions_may_hold_nan():
    x, w, b, y, _, where = _data()
    x[~where] = float("nan")
    xl = x.clone().requires_grad_()
    val = focal_torch.linear_softmax_focal_loss(xl, w, y, bias=b, where=where)
    val.backward()
    assert torch.isfinite(val) and torch.isfinite(xl.grad).all() and float(xl.grad[~where].abs().sum()) == 0.0


@pytest.mark.parametrize("bias_dtype", [torch.float64, torch.bfloat16])
def test_bias_of_another_dtype_is_cast_to_the_inputs(bias_dtype):
    """A floating bias of another dtype gives the loss of ``bias.to(input.dtype)``, and its gradient in its own
    dtype (``F.linear`` itself would refuse the mix)."""
    x, w, b, y, _, _ = _data(dtype=torch.float32)
    b_other = b.to(bias_dtype)
    res = []
    for bias in (b_other, b_other.to(torch.float32)):
        xl, wl, bl = _leaves(x, w, bias)
        val = focal_torch.linear_softmax_focal_loss(xl, wl, y, bias=bl, chunk_size=4)
        res.append((val.detach(), torch.autograd.grad(val, (xl, wl, bl))))
    (v1, g1), (v2, g2) = res
    assert v1.dtype == torch.float32 and g1[2].dtype == bias_dtype
    torch.testing.assert_close(v1, v2, rtol=0, atol=0)
    for a, c in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, c.to(a.dtype), rtol=0, atol=0)


def test_backward_twice_and_scaled_cotangent():
    """The kept gradients are handed over only when the graph is freed: retain_graph and a cotangent other than 1
    give the right sums (also through a view: the weight as ``p.t()``)."""
    x, w, b, y, _, _ = _data()
    xl, wl = _leaves(x, w.t())
    val = focal_torch.linear_softmax_focal_loss(xl, wl.t(), y, bias=b)
    val.backward(retain_graph=True)
    first = (xl.grad.clone(), wl.grad.clone())
    (3.0 * val).backward()
    torch.testing.assert_close(xl.grad, 4.0 * first[0])
    torch.testing.assert_close(wl.grad, 4.0 * first[1])


def test_no_grad_and_frozen_weight():
    x, w, b, y, _, _ = _data()
    with torch.no_grad():
        v0 = focal_torch.linear_softmax_focal_loss(x.requires_grad_(), w, y, bias=b)
    assert not v0.requires_grad
    xl = x.detach().clone().requires_grad_()
    v1 = focal_torch.linear_softmax_focal_loss(xl, w, y, bias=b)  # the weight frozen: only dℓ/dx is formed
    v1.backward()
    xr = x.detach().clone().requires_grad_()
    _unfused(xr, w, y, bias=b).backward()
    torch.testing.assert_close(v0, v1.detach(), rtol=0, atol=0)
    torch.testing.assert_close(xl.grad, xr.grad, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------------
# torch.compile, torch.func.
# ----------------------------------------------------------------------------------------


def test_torch_compile_fullgraph_inductor():
    """float32 through inductor on the CPU (uncounted positions masked instead of removed) equals eager."""
    torch._dynamo.reset()
    x, w, b, y, cw, where = _data(n=9, dtype=torch.float32)

    def loss(x, w, b, y, where):
        return focal_torch.linear_softmax_focal_loss(x, w, y, bias=b, where=where, class_weight=cw, chunk_size=16)

    compiled = torch.compile(loss, fullgraph=True, backend="inductor")
    res = []
    for fn in (compiled, loss):
        xl, wl, bl = _leaves(x, w, b)
        val = fn(xl, wl, bl, y, where)
        res.append((val.detach(), torch.autograd.grad(val, (xl, wl, bl))))
    # the same chunked computation runs in both (the compiled graph calls it as an operator): equal up to the
    # order of the masked rows' zero terms in the sums
    torch.testing.assert_close(res[0][0], res[1][0], rtol=2e-6, atol=0)
    for a, c in zip(res[0][1], res[1][1], strict=True):
        torch.testing.assert_close(a, c, rtol=2e-6, atol=2e-6 * float(c.abs().max()))


COMPILED_CASES = [  # every branch of the operator: each reduction, smoothing, a class weight that wants its gradient
    dict(gamma=2.0, label_smoothing=0.0, reduction="mean", cw=True, bias=True, where=True, chunk_size=4),
    dict(gamma=0.5, label_smoothing=0.1, reduction="none", cw=True, bias=False, where=True, chunk_size=5),
    dict(gamma=3.0, label_smoothing=0.1, reduction="sum", cw=False, bias=True, where=False, chunk_size=None),
]


@pytest.mark.parametrize("case", COMPILED_CASES, ids=lambda c: f"{c['reduction']}-eps{c['label_smoothing']}")
def test_torch_compile_is_the_definition(case):
    """Compiled (inductor, fullgraph), float64: value and every gradient equal the materialised loss's, with a
    random cotangent (for ``"none"``, the backward operator's per-position path)."""
    torch._dynamo.reset()
    case = dict(case)
    x, w, b, y, cw, where = _data()
    b = b if case.pop("bias") else None
    cw = cw if case.pop("cw") else None
    where = where if case.pop("where") else None

    def fused(x, w, y, bias=None, class_weight=None, **kw):
        return focal_torch.linear_softmax_focal_loss(x, w, y, bias=bias, class_weight=class_weight, **kw)

    out = []
    for fn in (torch.compile(fused, fullgraph=True, backend="inductor"), _unfused):
        xl, wl, bl, cwl = _leaves(x, w, b, cw)
        val = fn(xl, wl, y, bias=bl, class_weight=cwl, where=where, **case)
        cot = torch.randn(val.shape, generator=torch.Generator().manual_seed(1), dtype=val.dtype)
        out.append((val.detach(), torch.autograd.grad(val, [t for t in (xl, wl, bl, cwl) if t is not None], cot)))
    _assert_identity(*out, f"compiled {case}")


def test_torch_compile_calls_the_chunked_operator():
    """The compiled graph holds the chunk loop as one operator call (so its memory stays one chunk's logits, and
    the compiler generates no code for it), not the loop's softmax traced op by op."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):  # a torch.compile backend: sees the captured graph, runs it as it is
        graphs.append(gm)
        return gm.forward

    x, w, b, y, cw, where = _data(n=9, dtype=torch.float32)
    fn = torch.compile(lambda x, w, y: focal_torch.linear_softmax_focal_loss(x, w, y, chunk_size=4),
                       fullgraph=True, backend=backend)
    xl, wl = _leaves(x, w)
    fn(xl, wl, y).backward()
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert any("focal_torch.linear_focal" in t for t in targets), targets
    assert not any("softmax" in t for t in targets), targets
    xr, wr = _leaves(x, w)
    _unfused(xr, wr, y).backward()
    torch.testing.assert_close(xl.grad, xr.grad, rtol=2e-6, atol=2e-6 * float(xr.grad.abs().max()))
    torch.testing.assert_close(wl.grad, wr.grad, rtol=2e-6, atol=2e-6 * float(wr.grad.abs().max()))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("masked_by", ["ignore_index", "where"])
def test_torch_compile_masked_positions_may_hold_nan(masked_by, reduction):
    """Compiled, the uncounted positions stay in the operator's rows with a weight of 0: NaN and inf held there
    (padding) give the eager results, finite, with an exactly zero gradient at those positions."""
    torch._dynamo.reset()
    x, w, b, y, _, where = _data()
    skipped = (y == -100) if masked_by == "ignore_index" else ~where
    kw = {} if masked_by == "ignore_index" else {"where": where}
    y = y if masked_by == "ignore_index" else y.clamp(min=0)
    x[skipped] = float("nan")
    x[torch.nonzero(skipped)[0]] = float("inf")

    def loss(x, w, y, bias):
        return focal_torch.linear_softmax_focal_loss(x, w, y, bias=bias, reduction=reduction, chunk_size=4, **kw)

    res = []
    for fn in (torch.compile(loss, fullgraph=True, backend="aot_eager"), loss):
        xl, wl, bl = _leaves(x, w, b)
        val = fn(xl, wl, y, bl)
        cot = torch.randn(val.shape, generator=torch.Generator().manual_seed(1), dtype=val.dtype)
        res.append((val.detach(), torch.autograd.grad(val, (xl, wl, bl), cot)))
    (v_c, g_c), (v_e, g_e) = res
    assert torch.isfinite(v_c).all() and all(torch.isfinite(g).all() for g in g_c)
    assert float(g_c[0][skipped].abs().sum()) == 0.0
    _assert_identity((v_c, g_c), (v_e, g_e), f"compiled, {masked_by} positions holding NaN")


def test_torch_compile_options_that_change_between_calls():
    """``dynamic=True``, and a gamma or label smoothing that changes from call to call (Dynamo traces the number
    symbolically on the second compilation): the compiled loss is the eager one for each value, and an invalid
    gamma raises the spec's error there too."""
    x, w, b, y, _, _ = _data()

    def loss(x, w, y, gamma, eps):
        return focal_torch.linear_softmax_focal_loss(x, w, y, gamma=gamma, label_smoothing=eps, chunk_size=4)

    for dynamic in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager", dynamic=dynamic)
        for gamma, eps in ((2.0, 0.0), (1.0, 0.0), (0.5, 0.1), (3.0, 0.2)):
            res = []
            for fn in (compiled, loss):
                xl, wl = _leaves(x, w)
                val = fn(xl, wl, y, gamma, eps)
                res.append((val.detach(), torch.autograd.grad(val, (xl, wl))))
            _assert_identity(*res, f"compiled (dynamic={dynamic}), gamma={gamma}, label_smoothing={eps}")
        with pytest.raises(Exception) as info:  # fullgraph: Dynamo reports the error it traced as its own
            compiled(x, w, y, -1.0, 0.0)
        chain, e = [], info.value
        while e is not None:
            chain.append(f"{type(e).__name__}: {e}")
            e = e.__cause__ or e.__context__
        # the spec's message (torch 2.8 reports only the class of the error it traced)
        assert any(("Invalid value for argument `gamma`" in m and "-1.0" in m)
                   or "ExceptionVariable(<class 'ValueError'>)" in m for m in chain), chain


def test_torch_func_transforms_use_the_definition():
    from torch.func import grad, vmap

    x, w, b, y, _, _ = _data()
    gx = grad(lambda x: focal_torch.linear_softmax_focal_loss(x, w, y, bias=b, chunk_size=4))(x)
    xr = x.detach().clone().requires_grad_()
    _unfused(xr, w, y, bias=b).backward()
    torch.testing.assert_close(gx, xr.grad, rtol=1e-12, atol=1e-15)
    batched = vmap(lambda xi: focal_torch.linear_softmax_focal_loss(xi, w, y, bias=b))(torch.stack([x, 2 * x]))
    want = torch.stack([_unfused(x, w, y, bias=b), _unfused(2 * x, w, y, bias=b)])
    torch.testing.assert_close(batched, want, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------
# Errors: the spec's messages.
# ----------------------------------------------------------------------------------------


def _spec_error(**over):
    """The exception the spec raises for a call of (13, 6) hidden states, a (11, 6) weight and (13,) labels with
    ``over`` changed."""
    args = dict(hidden_shape=(13, D), hidden_dtype="float32", weight_shape=(V, D), weight_dtype="float32",
                bias_shape=None, labels_shape=(13,), labels_dtype="int64", gamma=2.0, class_weight_shape=None,
                ignore_index=-100, label_smoothing=0.0, reduction="mean", chunk_size=None)
    args.update(over)
    positional = [args.pop(k) for k in ("hidden_shape", "hidden_dtype", "weight_shape", "weight_dtype", "bias_shape",
                                        "labels_shape", "labels_dtype")]
    with pytest.raises((TypeError, ValueError)) as info:
        focal_spec.linear_options(*positional, **args)
    return info.type, str(info.value)


@pytest.mark.parametrize("name", ["weight_d", "weight_1d", "bias", "target", "int_input", "weight_dtype",
                                  "chunk0", "chunk_float", "class_weight", "gamma", "smoothing", "reduction"])
def test_errors_are_the_specs(name):
    x, w, b, y, cw, _ = _data(dtype=torch.float32)
    call = dict(input=x, weight=w, target=y)
    spec = {}
    if name == "weight_d":
        call["weight"], spec["weight_shape"] = w[:, :4], (V, 4)
    elif name == "weight_1d":
        call["weight"], spec["weight_shape"] = w[0], (D,)
    elif name == "bias":
        call["bias"], spec["bias_shape"] = b[:5], (5,)
    elif name == "target":
        call["target"], spec["labels_shape"] = y[:4], (4,)
    elif name == "int_input":
        call["input"], spec["hidden_dtype"] = x.long(), "int64"
    elif name == "weight_dtype":
        call["weight"], spec["weight_dtype"] = w.double(), "float64"
    elif name == "chunk0":
        call["chunk_size"] = spec["chunk_size"] = 0
    elif name == "chunk_float":
        call["chunk_size"] = spec["chunk_size"] = 2.5
    elif name == "class_weight":
        call["class_weight"], spec["class_weight_shape"] = cw[:3], (3,)
    elif name == "gamma":
        call["gamma"] = spec["gamma"] = -1.0
    elif name == "smoothing":
        call["label_smoothing"] = spec["label_smoothing"] = 1.5
    elif name == "reduction":
        call["reduction"] = spec["reduction"] = "avg"
    kind, msg = _spec_error(**spec)
    if name == "gamma":  # the fused loss takes one number: its message offers no array
        assert msg == "Invalid value for argument `gamma`. Expected a finite number >= 0. Received: gamma=-1.0"
    with pytest.raises(kind, match=f"^{re.escape(msg)}$"):
        focal_torch.linear_softmax_focal_loss(**call)


@pytest.mark.parametrize("label", [V, -1])
def test_label_out_of_range(label):
    x, w, _, y, _, _ = _data(dtype=torch.float32)
    y[4] = label
    msg = focal_spec.label_out_of_range(label, V, -100)
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        focal_torch.linear_softmax_focal_loss(x, w, y)
    y[4] = -100
    focal_torch.linear_softmax_focal_loss(x, w, y)  # ignored: fine


# ----------------------------------------------------------------------------------------
# The module, the chunk choice.
# ----------------------------------------------------------------------------------------


def test_module():
    x, w, b, y, cw, _ = _data()
    m = focal_torch.LinearSoftmaxFocalLoss(gamma=0.5, class_weight=cw.float(), label_smoothing=0.1, chunk_size=4)
    assert "chunk_size=4" in repr(m) and "class_weight=tensor(shape=(11,)" in repr(m)
    m = m.double()  # the class weight is a buffer
    assert m.class_weight.dtype == torch.float64 and not list(m.parameters())
    got = m(x, w, y, bias=b)
    want = focal_torch.linear_softmax_focal_loss(x, w, y, bias=b, gamma=0.5, class_weight=cw.float().double(),
                                                 label_smoothing=0.1, chunk_size=4)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for bad in (dict(gamma=-1.0), dict(reduction="avg"), dict(chunk_size=0), dict(label_smoothing=2.0)):
        with pytest.raises((ValueError, TypeError)):
            focal_torch.LinearSoftmaxFocalLoss(**bad)
    # gamma: the function's own errors at construction (one number; an array of γ is refused there, not at call)
    for gamma, kind in ((-1.0, ValueError), (torch.tensor([1.0, 2.0]), TypeError)):
        with pytest.raises(kind) as at_call:
            focal_torch.linear_softmax_focal_loss(x, w, y, gamma=gamma)
        with pytest.raises(kind, match=f"^{re.escape(str(at_call.value))}$"):
            focal_torch.LinearSoftmaxFocalLoss(gamma=gamma)


def test_default_chunk():
    pick = focal_spec.pick_chunk_size
    assert pick(2048, 256, 32768, 4) == 224 and pick(512, 256, 131072, 4) == 56  # 1/9 of the logits, rows % 8 == 0
    assert pick(100, 16, 1000, 4) == 100 and pick(1, 16, 10**6, 4) == 1
    for n, v in ((2048, 32768), (512, 131072), (8192, 262144), (64, 10**6)):
        rows = pick(n, 256, v, 4)
        # one chunk's float32 logits stay under 1/8 of all of them (the benchmark's memory target)
        assert 1 <= rows <= n and (rows * v * 4 <= n * v * 4 / 9 < n * v * 4 / 8 or rows == min(n, 8))


# ----------------------------------------------------------------------------------------
# process_group: two gloo ranks (file store), each with half of the batch and unequal ignored positions.
# ----------------------------------------------------------------------------------------


def _pg_batch():
    x, w, b, y, cw, _ = _data(n=12, seed=11, ignore=(0, 7, 8, 10))
    return x, w, b, y, cw


def _pg_worker(rank: int, store: str, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        x, w, b, y, cw = _pg_batch()
        rows = slice(rank * 6, rank * 6 + 6)
        out = {}
        for name, fn in (("fused", focal_torch.linear_softmax_focal_loss), ("unfused", _unfused)):
            xl, wl, bl = _leaves(x[rows], w, b)
            val = fn(xl, wl, y[rows], bias=bl, class_weight=cw, gamma=2.0, process_group=dist.group.WORLD,
                     chunk_size=4)
            val.backward()
            out[name] = (val.detach(), xl.grad, wl.grad, bl.grad)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_process_group_global_mean(tmp_path):
    """Each rank's value and gradients equal the unfused loss's with the same group, and the ranks' average of the
    weight's gradient (what DDP applies) is the gradient of the global-batch mean."""
    import torch.multiprocessing as mp

    mp.spawn(_pg_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        for a, c in zip(r["fused"], r["unfused"], strict=True):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-15)
    x, w, b, y, cw = _pg_batch()
    wl = w.clone().requires_grad_()
    focal_torch.linear_softmax_focal_loss(x, wl, y, bias=b, class_weight=cw, gamma=2.0).backward()
    torch.testing.assert_close((ranks[0]["fused"][2] + ranks[1]["fused"][2]) / 2, wl.grad, rtol=1e-12, atol=1e-15)
