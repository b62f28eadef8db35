"""Transforms: jit equals eager, vmap equals a loop, Module equals functional, gradient checks in float64,
and a second jit call does not recompile."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from parity_tests import _harness as H

JIT_CASES = [c for i, c in enumerate(H.SIGMOID_CASES) if i % 6 == 0]
JIT_SOFT = [c for i, c in enumerate(H.SOFTMAX_CASES) if i % 5 == 0]


@pytest.mark.parametrize("loss,case", [pytest.param("sigmoid", c, id="sigmoid-" + H.case_id(c)) for c in JIT_CASES]
                         + [pytest.param("softmax", c, id="softmax-" + H.case_id(c)) for c in JIT_SOFT])
def test_jit_equals_eager(loss, case):
    inp = (H.sigmoid_inputs if loss == "sigmoid" else H.softmax_inputs)(case)
    ev, eg = H.run_jax(loss, inp)
    jv, jg = H.run_jax(loss, inp, transform="jit")
    # jit and eager may round differently; each meets the contract, so they are within twice of each other,
    # on the condition scales of the quantity (a soft-label gradient is a difference of terms)
    exp = H.expected(loss, inp)
    H.Expected(ev, eg, exp.value_scale, exp.grad_scale, exp.grad_scale_ref).check(
        jv, jg, case["dtype"], "jit vs eager", factor=2.0)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("reduction", H.REDUCTIONS)
def test_vmap_equals_loop(loss, reduction):
    import jax
    import jax.numpy as jnp

    import focal_jax

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)
    if loss == "sigmoid":
        y = jnp.asarray(rng.uniform(size=(4, 6, 3)), jnp.float32)
        fn = lambda a, b: focal_jax.sigmoid_focal_loss(a, b, alpha=0.25, reduction=reduction)
    else:
        y = jnp.asarray(rng.integers(0, 3, size=(4, 6)))
        y = y.at[1, 2].set(-100)
        fn = lambda a, b: focal_jax.softmax_focal_loss(a, b, gamma=1.5, reduction=reduction)
    batched = jax.vmap(jax.value_and_grad(lambda a, b: jnp.sum(fn(a, b))))(x, y)
    for i in range(x.shape[0]):
        v, g = jax.value_and_grad(lambda a, b: jnp.sum(fn(a, b)))(x[i], y[i])
        H.assert_close(batched[0][i], v, "float32", f"value {i}")
        H.assert_close(batched[1][i], g, "float32", f"gradient {i}")


def test_second_jit_call_does_not_recompile():
    import jax
    import jax.numpy as jnp

    import focal_jax

    traces = []

    @jax.jit
    def step(x, t):
        traces.append(1)
        return jax.grad(lambda z: focal_jax.sigmoid_focal_loss(z, t, gamma=2.0, alpha=0.25))(x)

    x = jnp.ones((8, 3))
    step(x, jnp.zeros((8, 3)))
    step(x + 1, jnp.ones((8, 3)))
    assert len(traces) == 1


@pytest.mark.parametrize("name", ["SegmentationFocalLoss", "ClassificationFocalLoss"])
def test_jax_original_modules_are_hashable_static_arguments(name):
    import jax
    import jax.numpy as jnp

    import focal_jax

    args = (3,) if name == "ClassificationFocalLoss" else ()
    a = getattr(focal_jax, name)(*args, gamma=2, weights=[1.0, 2.0, 0.5])
    b = getattr(focal_jax, name)(*args, gamma=2, weights=[1.0, 2.0, 0.5])
    assert a == b and hash(a) == hash(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.gamma = 3  # immutable
    shape = (2, 3) if args else (2, 3, 4, 4)
    pred = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    teacher = jax.nn.one_hot(jnp.array([0, 2] if args else np.zeros((2, 4, 4), int)), 3, axis=1)
    f = jax.jit(lambda loss, p, t: loss(p, t), static_argnums=0)
    H.assert_close(f(a, pred, teacher), a(pred, teacher), "float32")


SIG_MODULE_KW = [
    dict(gamma=2.0, alpha=None, reduction="mean"),
    dict(gamma=0.5, alpha=0.25, label_smoothing=0.1, reduction="sum"),
    dict(gamma=1.0, alpha="per_class", weight="per_class", reduction="none"),
]


@pytest.mark.parametrize("kw", SIG_MODULE_KW, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_torch_sigmoid_module_equals_functional(kw):
    import torch

    import focal_torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, generator=g)
    t = torch.rand(4, 3, 5, generator=g)
    kw = dict(kw)
    for k in ("alpha", "weight"):
        if kw.get(k) == "per_class":
            kw[k] = torch.rand(3, 1, generator=g)
    module = focal_torch.SigmoidFocalLoss(**kw)
    for k in ("alpha", "weight"):
        if isinstance(kw.get(k), torch.Tensor):
            assert any(b is not None and b.shape == (3, 1) for b in module.buffers()), k
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = module(xa, t)
    b = focal_torch.sigmoid_focal_loss(xb, t, **kw)
    assert torch.equal(a, b)
    a.sum().backward()
    b.sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    assert "gamma=" in repr(module)


def test_torch_softmax_module_equals_functional():
    import torch

    import focal_torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 6, generator=g)
    y = torch.randint(0, 5, (4, 6), generator=g)
    w = torch.rand(5, generator=g)
    module = focal_torch.SoftmaxFocalLoss(gamma=1.5, weight=w, ignore_index=3, label_smoothing=0.05)
    assert "weight" in dict(module.named_buffers())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = module(xa, y)
    b = focal_torch.softmax_focal_loss(xb, y, gamma=1.5, weight=w, ignore_index=3, label_smoothing=0.05)
    assert torch.equal(a, b)
    a.backward()
    b.backward()
    assert torch.equal(xa.grad, xb.grad)
    module = module.to(torch.float64)
    assert module.weight.dtype == torch.float64


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.5])
def test_torch_gradcheck(loss, gamma):
    import torch

    import focal_torch

    g = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 4, 2, generator=g, dtype=torch.float64) * 2).requires_grad_()
    if loss == "sigmoid":
        t = torch.rand(3, 4, 2, generator=g, dtype=torch.float64)
        fn = lambda z: focal_torch.sigmoid_focal_loss(z, t, gamma=gamma, alpha=0.3, label_smoothing=0.1,
                                                      reduction="none")
    else:
        y = torch.randint(0, 4, (3, 2), generator=g)
        fn = lambda z: focal_torch.softmax_focal_loss(z, y, gamma=gamma, label_smoothing=0.1, reduction="none")
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.5])
def test_jax_check_grads(loss, gamma, x64):
    import jax.numpy as jnp
    from jax.test_util import check_grads

    import focal_jax

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(scale=2.0, size=(3, 2, 4)), jnp.float64)
    if loss == "sigmoid":
        t = jnp.asarray(rng.uniform(size=(3, 2, 4)), jnp.float64)
        fn = lambda z: focal_jax.sigmoid_focal_loss(z, t, gamma=gamma, alpha=0.3, label_smoothing=0.1,
                                                    reduction="none")
    else:
        y = jnp.asarray(rng.integers(0, 4, size=(3, 2)))
        fn = lambda z: focal_jax.softmax_focal_loss(z, y, gamma=gamma, label_smoothing=0.1, reduction="none")
    check_grads(fn, (x,), order=2 if loss == "sigmoid" else 1, modes=("fwd", "rev"))
