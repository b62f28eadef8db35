"""``focal_jax.linear_softmax_focal_loss`` is ``softmax_focal_loss`` on ``hidden @ weight.T + bias``: values and
the gradients wrt hidden, weight, bias and class_weight against the float64 reference on the materialised
logits, for every option, chunking, dtype and transform.

Tolerances follow the precision contract (``_harness.TOLERANCES``, relative to condition scales), with two
terms the fused loss adds over a loss given its logits: the logits themselves are a float32 matmul (error
relative to E = |h| @ |W|.T + |b|, propagated through the gradient), and the two gradient matmuls sum over V
or N terms (relative to |G| @ |W| and |G|.T @ |h|, times the number of terms over 16).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import focal_jax
import focal_spec
from focal_spec import reference
from parity_tests import _harness as H

ROOT = pathlib.Path(__file__).resolve().parents[1]
N, D, V = 23, 8, 37


def make(seed: int, n: int = N, d: int = D, v: int = V, ignore: float = 0.15) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, v, size=n)
    y[rng.random(n) < ignore] = -100
    return dict(h=rng.normal(size=(n, d)), w=rng.normal(size=(v, d)) * 0.7, b=rng.normal(size=v) * 0.5,
                cw=rng.uniform(0.3, 2.0, size=v), y=y, where=rng.random(n) > 0.2)


def materialised_f64(inp: dict, kw: dict, bias: bool, cw: bool):
    """Value and gradients (h, w, b, cw) of the materialised loss in float64, and the logits' gradient G
    from the NumPy reference."""
    h, w = inp["h"], inp["w"]
    b = inp["b"] if bias else np.zeros(w.shape[0])
    x = h @ w.T + b
    opts = dict(gamma=kw["gamma"], weight=inp["cw"] if cw else None, ignore_index=-100,
                label_smoothing=kw["label_smoothing"], where=kw["where"], reduction=kw["reduction"])
    value, g = reference.softmax_focal_loss(x, inp["y"], axis=-1, **opts)
    grads = dict(h=g @ w, w=g.T @ h, b=g.sum(0))
    with jax.enable_x64(True):
        def f(c):
            o = dict(opts, weight=c)
            return jnp.sum(focal_jax.softmax_focal_loss(jnp.asarray(x), jnp.asarray(inp["y"]), **o))

        if cw:
            grads["cw"] = np.asarray(jax.grad(f)(jnp.asarray(inp["cw"])))
            # the sum of the terms' magnitudes: Σ loss and the mean's denominator differentiated apart
            num = jax.grad(lambda c: jnp.sum(focal_jax.softmax_focal_loss(
                jnp.asarray(x), jnp.asarray(inp["y"]), **dict(opts, weight=c, reduction="sum"))))(
                jnp.asarray(inp["cw"]))
            grads["cw_scale"] = np.abs(np.asarray(num))
            if kw["reduction"] == "mean":  # Σℓ / Σw[y]: both terms of the quotient's derivative
                y, valid = inp["y"], (inp["y"] != -100) & (True if kw["where"] is None else kw["where"])
                c = float(np.where(valid, inp["cw"][np.maximum(y, 0)], 0.0).sum())
                dc = np.bincount(np.maximum(y, 0)[valid], minlength=w.shape[0])
                total = float(reference.softmax_focal_loss(x, y, axis=-1, **dict(opts, reduction="sum"))[0])
                grads["cw_scale"] = grads["cw_scale"] / c + abs(total) / c**2 * dc
    return np.asarray(value), g, grads, x


def scales(inp: dict, kw: dict, bias: bool, cw: bool, x: np.ndarray, g: np.ndarray) -> dict[str, np.ndarray]:
    held = H.Inputs(logits=x, labels=inp["y"], kwargs=dict(gamma=kw["gamma"], weight=inp["cw"] if cw else None,
                    ignore_index=-100, label_smoothing=kw["label_smoothing"], where=kw["where"],
                    reduction=kw["reduction"]), dtype="float64")
    sv, sg, _ = H.softmax_scales(held)
    e = np.abs(inp["h"]) @ np.abs(inp["w"]).T + (np.abs(inp["b"]) if bias else 0.0)
    ag = np.abs(g)
    # the logits' own rounding, through the loss (value) and through the gradient (its Hessian ~ |G|, p Σ|G|)
    if kw["reduction"] == "none":
        sv = sv + (ag * e).sum(-1)
    else:
        sv = sv + (ag * e).sum()
    sgx = sg + (1.0 + kw["gamma"]) * 2.0 * (ag + ag.sum(-1, keepdims=True)) * e.max(-1, keepdims=True)
    aw, ah = np.abs(inp["w"]), np.abs(inp["h"])
    n, v = x.shape
    return dict(value=sv, h=sgx @ aw + (v / 16) * (ag @ aw), w=sgx.T @ ah + (n / 16) * (ag.T @ ah),
                b=sgx.sum(0) + (n / 16) * ag.sum(0))


CASES = [
    dict(gamma=2.0, reduction="mean", label_smoothing=0.0, bias=True, cw=False, where=False, block=16, chunk=None),
    dict(gamma=2.0, reduction="sum", label_smoothing=0.1, bias=True, cw=True, where=True, block=5, chunk=7),
    dict(gamma=0.5, reduction="none", label_smoothing=0.0, bias=False, cw=True, where=True, block=16, chunk=None),
    dict(gamma=0.5, reduction="mean", label_smoothing=0.2, bias=False, cw=False, where=False, block=37, chunk=4),
    dict(gamma=0.0, reduction="sum", label_smoothing=0.0, bias=True, cw=False, where=True, block=64, chunk=None),
    dict(gamma=0.0, reduction="mean", label_smoothing=0.1, bias=True, cw=True, where=False, block=16, chunk=23),
    dict(gamma=2.0, reduction="none", label_smoothing=0.1, bias=False, cw=False, where=True, block=37, chunk=1),
    dict(gamma=0.5, reduction="sum", label_smoothing=0.0, bias=True, cw=True, where=False, block=5, chunk=100),
    dict(gamma=2.0, reduction="mean", label_smoothing=0.0, bias=False, cw=True, where=True, block=8, chunk=5),
    dict(gamma=0.0, reduction="none", label_smoothing=0.0, bias=False, cw=False, where=False, block=5, chunk=None),
    dict(gamma=2.0, reduction="sum", label_smoothing=0.1, bias=True, cw=True, where=False, block=16, chunk=None, v=64),
]


@pytest.fixture
def blocks(monkeypatch):
    """Sets the class block size: ``class_block`` returns it (or a divisor of V at most 2× below, or V)."""
    def set_block(size: int) -> None:
        monkeypatch.setattr(focal_spec.linear, "BLOCK_BYTES", 0)
        monkeypatch.setattr(focal_spec.linear, "MIN_BLOCK_CLASSES", size)
    return set_block


def call(inp: dict, case: dict, dtype: str = "float32"):
    """Value and gradients (h, w, b, cw) of the fused loss, as float64 NumPy arrays."""
    dt = jnp.dtype(dtype)
    kw = dict(gamma=case["gamma"], ignore_index=-100, label_smoothing=case["label_smoothing"],
              where=jnp.asarray(inp["where"]) if case["where"] else None, reduction=case["reduction"],
              chunk_size=case["chunk"])
    cdt = jnp.dtype(H.compute_dtype(dtype))
    args = (jnp.asarray(inp["h"], dt), jnp.asarray(inp["w"], dt), jnp.asarray(inp["b"], cdt),
            jnp.asarray(inp["cw"], cdt))

    def f(h, w, b, c):
        out = focal_jax.linear_softmax_focal_loss(h, w, jnp.asarray(inp["y"]), bias=b if case["bias"] else None,
                                                  class_weight=c if case["cw"] else None, **kw)
        return jnp.sum(out.astype(jnp.float32 if dtype != "float64" else jnp.float64)), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(*args)
    return (np.asarray(out, np.float64), *[np.asarray(gr.astype(cdt), np.float64) for gr in grads])


def held(inp: dict, dtype: str) -> dict:
    """The inputs as the backend holds them (rounded to ``dtype``; b and cw to the compute dtype)."""
    out = dict(inp)
    for k in ("h", "w"):
        out[k] = H.round_to(inp[k], dtype).astype(np.float64)
    for k in ("b", "cw"):
        out[k] = H.round_to(inp[k], H.compute_dtype(dtype)).astype(np.float64)
    return out


def check(case: dict, dtype: str, inp: dict) -> None:
    hi = held(inp, dtype)
    kw = dict(case, where=inp["where"] if case["where"] else None)
    value, g, grads, x = materialised_f64(hi, kw, case["bias"], case["cw"])
    sc = scales(hi, kw, case["bias"], case["cw"], x, g)
    v, dh, dw, db, dcw = call(inp, case, dtype)
    half = dtype in H.HALF
    what = f"{case} {dtype}"
    if half:  # computed in float32, rounded once; the hidden states' gradient from a gradient rounded to dtype
        ag = np.abs(g)
        H.assert_close(v, value, dtype, what + " value", scale=np.abs(value), scale_compute=sc["value"])
        H.assert_close(dh, grads["h"], dtype, what + " d hidden", scale=np.abs(grads["h"]) + ag @ np.abs(hi["w"]),
                       scale_compute=sc["h"])
        H.assert_close(dw, grads["w"], dtype, what + " d weight", scale=np.abs(grads["w"]), scale_compute=sc["w"])
    else:
        H.assert_close(v, value, dtype, what + " value", scale=sc["value"])
        H.assert_close(dh, grads["h"], dtype, what + " d hidden", scale=sc["h"])
        H.assert_close(dw, grads["w"], dtype, what + " d weight", scale=sc["w"])
    cdt = H.compute_dtype(dtype)
    if case["bias"]:
        H.assert_close(db, grads["b"], cdt, what + " d bias", scale=sc["b"])
    else:
        assert not db.any()
    if case["cw"]:
        e = np.abs(hi["h"]) @ np.abs(hi["w"]).T
        H.assert_close(dcw, grads["cw"], cdt, what + " d class_weight",
                       scale=grads["cw_scale"] * (1.0 + 4.0 * (1.0 + case["gamma"]) * e.max()))
    else:
        assert not dcw.any()


@pytest.mark.parametrize("case", CASES, ids=H.case_id)
def test_matches_float64_reference(case, blocks):
    blocks(case["block"])
    check(case, "float32", make(H.seed_of(H.case_id(case)), v=case.get("v", V)))


@pytest.mark.parametrize("case", CASES[:3], ids=H.case_id)
def test_float64_is_the_reference(case, blocks, x64):
    blocks(case["block"])
    check(case, "float64", make(H.seed_of(H.case_id(case))))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=H.case_id)
def test_half_precision(case, dtype, blocks):
    blocks(case["block"])
    check(case, dtype, make(H.seed_of(H.case_id(case) + dtype)))


def test_gamma_0_is_optax_cross_entropy(blocks):
    import optax

    blocks(16)
    inp = make(3)
    y = inp["y"]
    h, w, b = (jnp.asarray(inp[k], jnp.float32) for k in ("h", "w", "b"))
    counted = jnp.asarray(y != -100)

    def fused(h, w, b):
        return focal_jax.linear_softmax_focal_loss(h, w, jnp.asarray(y), bias=b, gamma=0.0, chunk_size=6)

    def ce(h, w, b):
        ls = optax.softmax_cross_entropy_with_integer_labels(h @ w.T + b, jnp.asarray(np.maximum(y, 0)))
        return jnp.sum(jnp.where(counted, ls, 0.0)) / jnp.sum(counted)

    a, ga = jax.value_and_grad(fused, argnums=(0, 1, 2))(h, w, b)
    e, ge = jax.value_and_grad(ce, argnums=(0, 1, 2))(h, w, b)
    np.testing.assert_allclose(a, e, rtol=1e-5)
    for x, z in zip(ga, ge, strict=True):
        np.testing.assert_allclose(x, z, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(z))))


def test_jit_grad_checkpoint_equal_materialised(blocks):
    blocks(8)
    inp = make(5)
    h, w = jnp.asarray(inp["h"], jnp.float32), jnp.asarray(inp["w"], jnp.float32)
    y = jnp.asarray(inp["y"])

    def f(h, w, e=0.1):
        return focal_jax.linear_softmax_focal_loss(h, w, y, gamma=2.0, label_smoothing=e, chunk_size=9)

    def mat(h, w, e=0.1):
        return focal_jax.softmax_focal_loss(h @ w.T, y, gamma=2.0, label_smoothing=e)

    v, g = jax.value_and_grad(mat, argnums=(0, 1))(h, w)
    vj, gj = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, w)
    vc, gc = jax.jit(jax.value_and_grad(jax.checkpoint(f), argnums=(0, 1)))(h, w)
    for a in (vj, vc):
        np.testing.assert_allclose(a, v, rtol=1e-5)
    for gg in (gj, gc):
        for a, e in zip(gg, g, strict=True):
            np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(e))))
    # a traced label_smoothing: the same value, and its gradient that of the materialised loss
    ve, de = jax.jit(jax.value_and_grad(f, argnums=2))(h, w, 0.1)
    np.testing.assert_allclose(ve, v, rtol=1e-5)
    np.testing.assert_allclose(de, jax.grad(mat, argnums=2)(h, w, 0.1), rtol=1e-4)


def test_vmap_over_a_batch(blocks):
    blocks(16)
    inps = [make(10 + i) for i in range(3)]
    hs = jnp.asarray(np.stack([i["h"] for i in inps]), jnp.float32)
    ys = jnp.asarray(np.stack([i["y"] for i in inps]))
    w = jnp.asarray(inps[0]["w"], jnp.float32)

    def f(h, y, w):
        return focal_jax.linear_softmax_focal_loss(h, w, y, gamma=2.0, chunk_size=10)

    batched = jax.jit(jax.vmap(jax.value_and_grad(f, argnums=(0, 2)), in_axes=(0, 0, None)))(hs, ys, w)
    for i in range(3):
        v, (gh, gw) = jax.value_and_grad(lambda h, w, y: focal_jax.softmax_focal_loss(h @ w.T, y),
                                         argnums=(0, 1))(hs[i], w, ys[i])
        np.testing.assert_allclose(batched[0][i], v, rtol=1e-5)
        np.testing.assert_allclose(batched[1][0][i], gh, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(batched[1][1][i], gw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "int32", "int64"])
def test_every_integer_label_dtype(dtype):
    inp = make(7, v=20)
    y = np.where(inp["y"] < 0, 3, inp["y"]).astype(dtype)
    h, w = jnp.asarray(inp["h"], jnp.float32), jnp.asarray(inp["w"], jnp.float32)
    a = focal_jax.linear_softmax_focal_loss(h, w, y, reduction="none", chunk_size=5)
    e = focal_jax.softmax_focal_loss(h @ w.T, jnp.asarray(y.astype(np.int32)), reduction="none")
    np.testing.assert_allclose(a, e, rtol=1e-5)


def test_numpy_inputs_and_leading_axes():
    inp = make(8, n=24)
    h, w, y = inp["h"].astype(np.float32).reshape(2, 3, 4, D), inp["w"].astype(np.float32), inp["y"].reshape(2, 3, 4)
    a = focal_jax.linear_softmax_focal_loss(h, w, y, bias=inp["b"].astype(np.float32), reduction="none")
    assert a.shape == (2, 3, 4) and a.dtype == jnp.float32
    e = focal_jax.softmax_focal_loss(jnp.asarray(h) @ w.T + inp["b"].astype(np.float32), jnp.asarray(y),
                                     reduction="none")
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-30)


def test_masked_positions_take_no_part():
    inp = make(9)
    h = inp["h"].astype(np.float32).copy()
    where = inp["where"].copy()
    h[~where] = np.nan
    h[inp["y"] == -100] = np.inf
    w = jnp.asarray(inp["w"], jnp.float32)
    v, (gh, gw) = jax.value_and_grad(lambda h, w: focal_jax.linear_softmax_focal_loss(
        h, w, jnp.asarray(inp["y"]), where=jnp.asarray(where), chunk_size=4), argnums=(0, 1))(jnp.asarray(h), w)
    assert np.isfinite(v) and np.isfinite(gw).all()
    dropped = ~where | (inp["y"] == -100)
    assert (np.asarray(gh)[dropped] == 0).all() and np.isfinite(gh).all()


def test_label_out_of_range_is_nan():
    inp = make(11, ignore=0.0)
    y = inp["y"].copy()
    y[2] = V
    h, w = jnp.asarray(inp["h"], jnp.float32), jnp.asarray(inp["w"], jnp.float32)
    out = np.asarray(focal_jax.linear_softmax_focal_loss(h, w, y, reduction="none"))
    assert np.isnan(out[2]) and np.isfinite(np.delete(out, 2)).all()
    assert np.isnan(focal_jax.linear_softmax_focal_loss(h, w, y))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_input(reduction):
    h, w = jnp.zeros((0, D), jnp.float32), jnp.ones((V, D), jnp.float32)
    f = lambda h, w: jnp.sum(focal_jax.linear_softmax_focal_loss(h, w, jnp.zeros((0,), jnp.int32),  # noqa: E731
                                                                  reduction=reduction))
    v, (gh, gw) = jax.value_and_grad(f, argnums=(0, 1))(h, w)
    assert float(v) == 0.0 and gh.shape == (0, D) and not np.asarray(gw).any()


def _expect(exc, text):
    return pytest.raises(exc, match="^" + __import__("re").escape(text) + "$")


def test_errors_are_the_spec_messages():
    h, w, y = jnp.ones((4, 3)), jnp.ones((5, 3)), jnp.zeros((4,), jnp.int32)
    L = focal_jax.linear_softmax_focal_loss
    lg = (4, 5)
    with _expect(TypeError, focal_spec.invalid_dtype("hidden", "a floating dtype " + str(focal_spec.FLOAT_DTYPES),
                                                      "int32")):
        L(jnp.ones((4, 3), jnp.int32), w, y)
    with _expect(TypeError, focal_spec.invalid_dtype("weight", "the hidden states' dtype, float32", "float16")):
        L(h, w.astype(jnp.float16), y)
    with _expect(ValueError, focal_spec.invalid_shape("weight", "(num_classes, 3), one row of D=3 features per class",
                                                       (5, 2), lg)):
        L(h, jnp.ones((5, 2)), y)
    with _expect(ValueError, focal_spec.invalid_shape("bias", "one bias per class, shape (5,)", (4,), lg)):
        L(h, w, y, bias=jnp.ones(4))
    with _expect(ValueError, focal_spec.invalid_shape(
            "labels", "class indices of the hidden states' shape without the feature axis, (4,)", (3,), lg)):
        L(h, w, y[:3])
    with _expect(TypeError, focal_spec.invalid_dtype("labels", "integer class indices", "float32")):
        L(h, w, y.astype(jnp.float32))
    with _expect(ValueError, focal_spec.invalid_shape("class_weight", "one weight per class, shape (5,)", (4,), lg)):
        L(h, w, y, class_weight=jnp.ones(4))
    for bad, exc in ((0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError), ("8", TypeError)):
        with _expect(exc, focal_spec.invalid_value("chunk_size", focal_spec.linear.CHUNK_EXPECTED, bad)):
            L(h, w, y, chunk_size=bad)
    with _expect(TypeError, focal_spec.invalid_dtype("where", "bool (a boolean mask)", "float32")):
        L(h, w, y, where=jnp.ones(4))
    with pytest.raises(ValueError, match="reduction"):
        L(h, w, y, reduction="avg")


def test_chunk_choice():
    assert focal_spec.pick_blocks(2048, 256, 32768, 4) == (2048, 512)
    assert focal_spec.class_block(8, 10) == 10  # V smaller than a block: one block
    assert focal_spec.pick_chunk_size(0, 8, 10, 4) == 1
    o = focal_spec.linear_options((6, 2), "float32", (3, 2), "float32", None, (6,), "int32", gamma=2.0,
                                  class_weight_shape=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                                  chunk_size=4)
    assert o.chunk_size == 4 and o.num_classes == 3 and o.positions == (6,)


SCRIPT = r'''
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
import focal_jax
jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
n, d, v = 64, 6, 29
h = jnp.asarray(rng.normal(size=(n, d))); w = jnp.asarray(rng.normal(size=(v, d)))
y = rng.integers(0, v, size=n); y[rng.random(n) < 0.2] = -100; y = jnp.asarray(y)
cw = jnp.asarray(rng.uniform(0.5, 2.0, size=v))
mesh = Mesh(np.array(jax.devices()), ("data",))
kw = dict(gamma=2.0, label_smoothing=0.1, class_weight=cw)
def local(h, y, w):
    return focal_jax.linear_softmax_focal_loss(h, w, y, axis_name="data", chunk_size=3, **kw)
sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P()), out_specs=P())
full = lambda h, y, w: focal_jax.softmax_focal_loss(h @ w.T, y, weight=cw, gamma=2.0, label_smoothing=0.1)
a, ga = jax.jit(jax.value_and_grad(sharded, argnums=(0, 2)))(h, y, w)
e, ge = jax.value_and_grad(full, argnums=(0, 2))(h, y, w)
rel = lambda a, e: float(jnp.max(jnp.abs(a - e)) / jnp.max(jnp.abs(e)))
print(json.dumps(dict(devices=len(jax.devices()), value=rel(a, e), dh=rel(ga[0], ge[0]), dw=rel(ga[1], ge[1]))))
'''


def test_shard_map_axis_name_is_the_global_mean(tmp_path):
    out = H.run_on_host_devices(SCRIPT, tmp_path / "linear_shard_map.py")
    for k in ("value", "dh", "dw"):
        assert out[k] < 1e-12, (k, out)
