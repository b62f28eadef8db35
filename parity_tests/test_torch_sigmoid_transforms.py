"""torch ``sigmoid_focal_loss`` under every transform: torch.func (grad, vmap, jacrev, jacfwd, hessian,
per-sample gradients), forward-mode AD, torch.compile with a changing gamma, gradients and second
derivatives of every input, the general (tensor gamma) path, the fast path for whole gammas, and the
accelerator code paths exercised on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from focal_spec import reference
from parity_tests import _harness as H

torch = pytest.importorskip("torch")
F = torch.nn.functional
func = torch.func


def _ft():
    import focal_torch

    return focal_torch


def plain_formula(x, t, gamma=2.0, alpha=0.25, reduction="mean"):
    """The torchvision formula, written out (float64 autograd is the yardstick here)."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def _inputs(shape=(5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2
    t = (torch.rand(*shape, generator=g) < 0.4).double()
    return x, t


def _close(a, b, what=""):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=what)


# ----------------------------------------------------------------------------------------
# torch.func and forward-mode AD equal autograd of the plain formula.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd"])
def test_func_gradients_equal_the_plain_formula(transform, reduction):
    ft = _ft()
    x, t = _inputs()
    ours = getattr(func, transform)(lambda z: ft.sigmoid_focal_loss(z, t, alpha=0.25, reduction=reduction))(x)
    theirs = func.grad(lambda z: plain_formula(z, t, reduction=reduction))(x)
    _close(ours, theirs)


@pytest.mark.parametrize("gamma", [2.0, 1.5, 0.0], ids=lambda g: f"gamma={g}")
def test_func_hessian_equals_the_plain_formula(gamma):
    ft = _ft()
    x, t = _inputs((6,))
    ours = func.hessian(lambda z: ft.sigmoid_focal_loss(z, t, gamma=gamma, alpha=0.25))(x)
    theirs = func.hessian(lambda z: plain_formula(z, t, gamma=gamma))(x)
    _close(ours, theirs)


@pytest.mark.parametrize("reduction", H.REDUCTIONS)
def test_vmap_equals_a_loop(reduction):
    ft = _ft()
    x, t = _inputs((4, 6, 3))
    out = func.vmap(lambda a, b: ft.sigmoid_focal_loss(a, b, alpha=0.25, reduction=reduction))(x, t)
    loop = torch.stack([plain_formula(x[i], t[i], reduction=reduction) for i in range(4)])
    _close(out, loop)


def test_per_sample_gradients():
    ft = _ft()
    x, t = _inputs((8, 5))
    per_sample = func.vmap(func.grad(lambda a, b: ft.sigmoid_focal_loss(a, b, alpha=0.25)))(x, t)
    loop = torch.stack([func.grad(plain_formula)(x[i], t[i]) for i in range(8)])
    _close(per_sample, loop)


def test_per_sample_gradients_of_a_model():
    """The snippet of docs/guide/transforms.md: per-sample gradients of a linear model's parameters."""
    ft = _ft()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    feats = torch.randn(6, 3, dtype=torch.float64)
    targets = (torch.rand(6, 4) < 0.3).double()

    def loss(p, f, y):
        return ft.sigmoid_focal_loss(func.functional_call(model, p, (f,)), y, alpha=0.25)

    per_sample = func.vmap(func.grad(loss), in_dims=(None, 0, 0))(params, feats, targets)

    def plain(p, f, y):
        return plain_formula(func.functional_call(model, p, (f,)), y)

    for i in range(6):
        expected = func.grad(plain)(params, feats[i], targets[i])
        for k in params:
            _close(per_sample[k][i], expected[k], k)


@pytest.mark.parametrize("reduction", H.REDUCTIONS)
def test_forward_mode_ad(reduction):
    import torch.autograd.forward_ad as fwAD

    ft = _ft()
    x, t = _inputs()
    v = torch.randn_like(x)
    with fwAD.dual_level():
        out = ft.sigmoid_focal_loss(fwAD.make_dual(x, v), t, alpha=0.25, reduction=reduction)
        tangent = fwAD.unpack_dual(out).tangent
    _, expected = func.jvp(lambda z: plain_formula(z, t, reduction=reduction), (x,), (v,))
    _close(tangent, expected)


@pytest.mark.parametrize("arg", ["target", "alpha", "weight", "pos_weight", "gamma"])
def test_func_grad_of_every_option(arg):
    ft = _ft()
    x, t = _inputs((5, 3))
    opts = {"target": t * 0.8 + 0.1, "alpha": torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64),
            "weight": torch.tensor([[1.0], [2.0], [0.5], [1.5], [1.0]], dtype=torch.float64),
            "pos_weight": torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64),
            "gamma": torch.tensor([1.5, 2.0, 0.5], dtype=torch.float64)}

    def ours(value):
        kw = dict(opts, **{arg: value})
        return ft.sigmoid_focal_loss(x, kw.pop("target"), **kw)

    def theirs(value):
        kw = dict(opts, **{arg: value})
        tt, a, w, pw, g = kw["target"], kw["alpha"], kw["weight"], kw["pos_weight"], kw["gamma"]
        ce = -(pw * tt * F.logsigmoid(x) + (1 - tt) * F.logsigmoid(-x))
        q = tt * torch.sigmoid(-x) + (1 - tt) * torch.sigmoid(x)
        return ((a * tt + (1 - a) * (1 - tt)) * w * q ** g * ce).mean()

    _close(func.grad(ours)(opts[arg]), func.grad(theirs)(opts[arg]))


# ----------------------------------------------------------------------------------------
# torch.compile: defaults, a gamma that changes every step, the module.
# ----------------------------------------------------------------------------------------


def _counting_backend():
    import torch._dynamo.testing

    return torch._dynamo.testing.CompileCounterWithBackend("aot_eager")


@pytest.mark.parametrize("kind", ["float", "tensor", "per-class-tensor"])
def test_compiled_gamma_schedule_compiles_once(kind):
    ft = _ft()
    counter = _counting_backend()
    x = torch.randn(8, 3, requires_grad=True)
    t = (torch.rand(8, 3) < 0.4).float()

    @torch.compile(backend=counter, dynamic=True, fullgraph=True)
    def step(z, y, g):
        return ft.sigmoid_focal_loss(z, y, gamma=g, alpha=0.25)

    frames = None
    for gamma in [2.0, 1.5, 0.5, 3.0, 0.0, 2.5]:
        if kind == "float":
            g = gamma
        elif kind == "tensor":
            g = torch.tensor(gamma)
        else:
            g = torch.tensor([gamma, 1.0, 0.5])
        out = step(x, t, g)
        (grad,) = torch.autograd.grad(out, x)
        eager = ft.sigmoid_focal_loss(x, t, gamma=g, alpha=0.25)
        (eager_grad,) = torch.autograd.grad(eager, x)
        torch.testing.assert_close(out, eager, rtol=2e-6, atol=0)
        torch.testing.assert_close(grad, eager_grad, rtol=2e-6, atol=1e-9)
        if frames is None:
            frames = counter.frame_count
        assert counter.frame_count == frames, f"recompiled for gamma={gamma}"


def test_compiled_module_with_defaults():
    ft = _ft()
    x = torch.randn(16, 5, requires_grad=True)
    t = (torch.rand(16, 5) < 0.3).float()
    loss = torch.compile(ft.SigmoidFocalLoss(), dynamic=True, fullgraph=True)
    out = loss(x, t)
    (grad,) = torch.autograd.grad(out, x)
    ref_v, ref_g = reference.sigmoid_focal_loss(x.detach().double().numpy(), t.numpy())
    np.testing.assert_allclose(out.item(), ref_v, rtol=1e-6)
    np.testing.assert_allclose(grad.numpy(), ref_g, rtol=1e-5, atol=1e-9)


def test_compiled_functional_inductor_matches_reference():
    ft = _ft()
    x = torch.randn(6, 4) * 4
    t = torch.rand(6, 4)
    fn = torch.compile(lambda z, y: ft.sigmoid_focal_loss(z, y, gamma=2.0, alpha=0.25, label_smoothing=0.1),
                       dynamic=True, fullgraph=True)
    z = x.clone().requires_grad_()
    out = fn(z, t)
    out.backward()
    ref_v, ref_g = reference.sigmoid_focal_loss(x.double().numpy(), t.double().numpy(), alpha=0.25,
                                                label_smoothing=0.1)
    np.testing.assert_allclose(out.item(), ref_v, rtol=1e-6)
    np.testing.assert_allclose(z.grad.numpy(), ref_g, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------------------
# Second derivatives, the general path, the fast path.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", H.REDUCTIONS)
@pytest.mark.parametrize("gamma", [2.0, 0.5, "tensor"])
def test_gradgradcheck_logits(gamma, reduction):
    ft = _ft()
    x, _ = _inputs((3, 4), seed=4)
    t = torch.rand(3, 4, dtype=torch.float64)
    g = torch.tensor([1.5, 0.0, 2.0, 0.7], dtype=torch.float64) if gamma == "tensor" else gamma
    fn = lambda z: ft.sigmoid_focal_loss(z, t, gamma=g, alpha=0.3, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x.requires_grad_(),))


def test_double_backward_after_the_logits_are_gone_raises_clearly():
    """The kernels keep dℓ/dx in place of the logits, which a double backward finds by a weak reference."""
    ft = _ft()
    x, t = _inputs()
    w = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    loss = ft.sigmoid_focal_loss(x @ w, t, reduction="mean")  # the logits are an intermediate nobody holds
    with pytest.raises(RuntimeError, match="double backward needs the logits"):
        torch.autograd.grad(loss, w, create_graph=True)
    z = x @ w
    loss = ft.sigmoid_focal_loss(z, t, reduction="mean")
    with torch.no_grad():
        z.add_(1.0)  # modified in place after the call
    with pytest.raises(RuntimeError, match="double backward needs the logits"):
        torch.autograd.grad(loss, w, create_graph=True)
    (g,) = torch.autograd.grad(ft.sigmoid_focal_loss(x @ w, t, reduction="mean"), w)  # first order is fine
    assert torch.isfinite(g).all()


def test_double_backward_with_a_temporary_target():
    """The targets are saved (not held weakly): a target built in the call still serves a double backward."""
    ft = _ft()
    x, t = _inputs((3, 4), seed=5)
    z = x.clone().requires_grad_()
    loss = ft.sigmoid_focal_loss(z, (t > 0.5).double(), alpha=0.3, reduction="sum")
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), z)
    ref = torch.autograd.functional.hessian(lambda v: plain_formula(v, t, 2.0, 0.3, "sum"), x).reshape(12, 12)
    _close(h.reshape(-1), ref.sum(0), "Hessian row sums")


SATURATED = torch.tensor([100.0, -100.0, 80.0, -80.0, 30.0, -30.0, 0.0, 2.0])


@pytest.mark.parametrize("target", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0, 1.5, 2.0], ids=lambda g: f"gamma={g}")
def test_tensor_gamma_is_finite_at_saturated_logits(gamma, dtype, target):
    ft = _ft()
    dt = getattr(torch, dtype)
    x = SATURATED.to(dt)
    t = torch.full_like(x, target)
    g = torch.tensor(gamma, dtype=dt, requires_grad=True)
    z = x.clone().requires_grad_()
    out = ft.sigmoid_focal_loss(z, t, gamma=g, reduction="sum")
    gx, gg = torch.autograd.grad(out, (z, g), create_graph=True)
    hess = torch.stack([torch.autograd.grad(gx[i], z, retain_graph=True)[0] for i in range(len(x))])
    assert torch.isfinite(out) and torch.isfinite(gx).all() and torch.isfinite(gg)
    assert torch.isfinite(hess).all()
    hessian = func.hessian(lambda z_: ft.sigmoid_focal_loss(z_, t, gamma=g.detach(), reduction="sum"))(x)
    assert torch.isfinite(hessian).all()
    ref_g = reference.sigmoid_focal_loss(x.double().numpy(), t.double().numpy(), gamma=gamma, reduction="sum")[1]
    np.testing.assert_allclose(gx.detach().double().numpy(), ref_g, rtol=1e-5, atol=float(torch.finfo(dt).tiny))


@pytest.mark.parametrize("reduction", H.REDUCTIONS)
def test_tensor_gamma_zero_is_the_bce_gradient(reduction):
    ft = _ft()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, generator=g) * 5
    t = torch.rand(300, generator=g)
    z = x.clone().requires_grad_()
    gamma = torch.zeros((), requires_grad=True)
    out = ft.sigmoid_focal_loss(z, t, gamma=gamma, reduction=reduction)
    gx, gg = torch.autograd.grad(out.sum(), (z, gamma))
    bx = x.clone().requires_grad_()
    (bce,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(bx, t, reduction=reduction).sum(), bx)
    torch.testing.assert_close(gx, bce, rtol=1e-6, atol=1e-6 * float(bce.abs().max()))
    number = x.clone().requires_grad_()
    (gn,) = torch.autograd.grad(ft.sigmoid_focal_loss(number, t, gamma=0.0, reduction=reduction).sum(), number)
    assert torch.equal(gx, gn)
    ref = reference.sigmoid_focal_loss(x.double().numpy(), t.double().numpy(), gamma=0.0, reduction="none")[0]
    xd, td = x.double().numpy(), t.double().numpy()
    lq = np.log((1 - td) / (1 + np.exp(-xd)) + td / (1 + np.exp(xd)))  # log(1 - p_t)
    expected = (ref * lq).sum() / (300 if reduction == "mean" else 1)
    np.testing.assert_allclose(gg.item(), expected, rtol=1e-5)


def _count_pieces(monkeypatch):
    from focal_torch import _sigmoid

    calls = {"loss": 0, "grad": 0}
    piece = _sigmoid._piece

    def counted(*a, **k):  # the eager kernels: the loss, dℓ/dx or both in one pass
        calls["loss"] += bool(k.get("loss", True))
        calls["grad"] += bool(k.get("grad", False))
        return piece(*a, **k)

    monkeypatch.setattr(_sigmoid, "_piece", counted)
    return calls


@pytest.mark.parametrize("gamma", ["2.0", "2", "tensor(2.)", "tensor(1.5)", "per-class", "requires-grad"])
def test_whole_number_gamma_keeps_the_fast_path(gamma, monkeypatch):
    ft = _ft()
    calls = _count_pieces(monkeypatch)
    g = {"2.0": 2.0, "2": 2, "tensor(2.)": torch.tensor(2.0), "tensor(1.5)": torch.tensor(1.5),
         "per-class": torch.tensor([2.0, 1.0, 0.5]), "requires-grad": torch.tensor(2.0, requires_grad=True)}[gamma]
    x = torch.randn(4, 3, requires_grad=True)
    t = (torch.rand(4, 3) < 0.5).float()
    out = ft.sigmoid_focal_loss(x, t, gamma=g)
    out.backward()
    fast = gamma in ("2.0", "2", "tensor(2.)", "tensor(1.5)")
    assert (calls["loss"] > 0) == fast and (calls["grad"] > 0) == fast
    ref_g = reference.sigmoid_focal_loss(x.detach().double().numpy(), t.numpy(), gamma=g.detach().numpy()
                                         if isinstance(g, torch.Tensor) else g)[1]
    np.testing.assert_allclose(x.grad.numpy(), ref_g, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------------------
# The accelerator code paths, on the CPU: whole-tensor kernels, no value reads.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", H.REDUCTIONS)
def test_accelerator_paths_read_no_values_and_match_reference(reduction, monkeypatch):
    ft = _ft()
    from focal_torch import _common

    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 3, 5, generator=g) * 3
    t = torch.rand(6, 3, 5, generator=g) < 0.4  # bool: no target check, the documented sync
    alpha = torch.tensor([0.2, 0.5, 0.8]).view(3, 1)
    where = torch.rand(6, 1, 5, generator=g) < 0.7
    calls = _count_pieces(monkeypatch)
    monkeypatch.setattr(_common, "ACCELERATOR_PATHS", True)

    def no_read(*args, **kwargs):
        raise AssertionError("a value was read on the accelerator path")

    z = x.clone().requires_grad_()
    monkeypatch.setattr(torch.Tensor, "item", no_read)
    monkeypatch.setattr(torch.Tensor, "__float__", no_read)
    monkeypatch.setattr(torch.Tensor, "numpy", no_read)
    out = ft.sigmoid_focal_loss(z, t, gamma=2.0, alpha=alpha, where=where, reduction=reduction)
    out.sum().backward()
    monkeypatch.undo()
    # the eager kernels, in one piece: the loss and dℓ/dx in one pass, the backward one multiplication
    assert calls == {"loss": 1, "grad": 1}
    ref_v, ref_g = reference.sigmoid_focal_loss(x.double().numpy(), t.numpy(), alpha=alpha.double().numpy(),
                                                where=where.numpy(), reduction=reduction)
    np.testing.assert_allclose(out.detach().numpy(), ref_v, rtol=2e-6, atol=1e-30)
    np.testing.assert_allclose(z.grad.numpy(), ref_g, rtol=2e-6, atol=1e-30)


def test_accelerator_paths_skip_alpha_range_check(monkeypatch):
    """On an accelerator an alpha tensor is checked by shape only (reading it would sync)."""
    ft = _ft()
    from focal_torch import _common

    monkeypatch.setattr(_common, "ACCELERATOR_PATHS", True)
    out = ft.sigmoid_focal_loss(torch.zeros(2, 3), torch.zeros(2, 3), alpha=torch.tensor([0.5, 1.5, 0.5]))
    assert out.shape == ()
    with pytest.raises(ValueError):
        ft.sigmoid_focal_loss(torch.zeros(2, 3), torch.zeros(2, 3), alpha=torch.tensor([0.5, 0.5]))
