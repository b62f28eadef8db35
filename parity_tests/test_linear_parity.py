"""The fused linear + softmax focal loss agrees across backends: ``focal_jax`` and ``focal_torch`` give the same
values and gradients (hidden, weight, bias, class_weight) on the same inputs, and raise the same exception with
the same text on the same bad input."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import focal_torch  # noqa: E402

if not hasattr(focal_torch, "linear_softmax_focal_loss"):
    pytest.skip("focal_torch.linear_softmax_focal_loss is not there yet", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import focal_jax  # noqa: E402

N, D, V = 19, 6, 41

CASES = [
    dict(gamma=2.0, reduction="mean", label_smoothing=0.0, bias=True, cw=False, where=False, chunk_size=None),
    dict(gamma=0.0, reduction="sum", label_smoothing=0.1, bias=True, cw=True, where=True, chunk_size=4),
    dict(gamma=0.5, reduction="none", label_smoothing=0.0, bias=False, cw=True, where=True, chunk_size=7),
    dict(gamma=2.0, reduction="mean", label_smoothing=0.2, bias=False, cw=True, where=False, chunk_size=1),
    dict(gamma=1.0, reduction="mean", label_smoothing=0.0, bias=True, cw=True, where=True, chunk_size=100),
]


def make(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, V, size=N)
    y[rng.random(N) < 0.15] = -100
    return dict(h=rng.normal(size=(N, D)), w=rng.normal(size=(V, D)), b=rng.normal(size=V),
                cw=rng.uniform(0.3, 2.0, size=V), y=y, where=rng.random(N) > 0.2, g=rng.normal(size=N))


def run_jax(inp: dict, case: dict) -> list[np.ndarray]:
    kw = dict(gamma=case["gamma"], label_smoothing=case["label_smoothing"], reduction=case["reduction"],
              chunk_size=case["chunk_size"], where=jnp.asarray(inp["where"]) if case["where"] else None)
    def f(h, w, b, cw):
        ct = jnp.asarray(inp["g"]) if case["reduction"] == "none" else 1.0
        out = focal_jax.linear_softmax_focal_loss(h, w, jnp.asarray(inp["y"]), bias=b if case["bias"] else None,
                                                  class_weight=cw if case["cw"] else None, **kw)
        return jnp.sum(out * ct), out

    with jax.enable_x64(True):
        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(
            *(jnp.asarray(inp[k]) for k in ("h", "w", "b", "cw")))
        return [np.asarray(out)] + [np.asarray(g) for g in grads]


def run_torch(inp: dict, case: dict) -> list[np.ndarray]:
    t = {k: torch.tensor(inp[k], dtype=torch.float64, requires_grad=True) for k in ("h", "w", "b", "cw")}
    out = focal_torch.linear_softmax_focal_loss(
        t["h"], t["w"], torch.tensor(inp["y"]), bias=t["b"] if case["bias"] else None,
        class_weight=t["cw"] if case["cw"] else None, gamma=case["gamma"], label_smoothing=case["label_smoothing"],
        reduction=case["reduction"], chunk_size=case["chunk_size"],
        where=torch.tensor(inp["where"]) if case["where"] else None)
    ct = torch.tensor(inp["g"]) if case["reduction"] == "none" else 1.0
    (out * ct).sum().backward()
    return [out.detach().numpy()] + [np.zeros(inp[k].shape) if t[k].grad is None else t[k].grad.numpy()
                                     for k in ("h", "w", "b", "cw")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_values_and_gradients_agree(case):
    inp = make(CASES.index(case))
    a, e = run_jax(inp, case), run_torch(inp, case)
    for what, x, z in zip(("value", "d hidden", "d weight", "d bias", "d class_weight"), a, e, strict=True):
        np.testing.assert_allclose(x, z, rtol=1e-10, atol=1e-12 * max(float(np.max(np.abs(z), initial=0)), 1e-300),
                                   err_msg=f"{case} {what}")


def test_float32_agrees():
    inp = make(1)
    h, w = inp["h"].astype(np.float32), inp["w"].astype(np.float32)
    a = focal_jax.linear_softmax_focal_loss(h, w, inp["y"], reduction="none", chunk_size=5)
    e = focal_torch.linear_softmax_focal_loss(torch.from_numpy(h), torch.from_numpy(w), torch.from_numpy(inp["y"]),
                                              reduction="none", chunk_size=5)
    np.testing.assert_allclose(np.asarray(a), e.numpy(), rtol=2e-5, atol=1e-30)


BAD = [
    dict(h=(4, 3), hdt="int32"),
    dict(w=(5, 2)),
    dict(wdt="float16"),
    dict(b=(4,)),
    dict(y=(3,)),
    dict(ydt="float32"),
    dict(cw=(6,)),
    dict(cw_values=[True, False, True, True, False]),  # booleans are not the weights 1 and 0
    dict(cw_values=[1.0, float("nan"), 1.0, 1.0, 1.0]),
    dict(cw_values=[1.0, 1.0, float("inf"), 1.0, 1.0]),
    dict(chunk_size=0),
    dict(chunk_size=2.0),
    dict(reduction="avg"),
]


def _error(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - any exception is compared
        return type(exc), str(exc)
    return None


@pytest.mark.parametrize("bad", BAD, ids=str)
def test_same_errors(bad):
    hs, ws, ys = bad.get("h", (4, 3)), bad.get("w", (5, 3)), bad.get("y", (4,))
    hdt, wdt, ydt = bad.get("hdt", "float32"), bad.get("wdt", "float32"), bad.get("ydt", "int64")
    bs, cws = bad.get("b"), bad.get("cw")
    kw = dict(chunk_size=bad.get("chunk_size"), reduction=bad.get("reduction", "mean"))
    h, w, y = np.ones(hs, hdt), np.ones(ws, wdt), np.zeros(ys, ydt)
    b = None if bs is None else np.ones(bs, np.float32)
    cw = None if cws is None else np.ones(cws, np.float32)
    if "cw_values" in bad:
        cw = np.asarray(bad["cw_values"])
    ej = _error(lambda: focal_jax.linear_softmax_focal_loss(h, w, y, bias=b, class_weight=cw, **kw))
    et = _error(lambda: focal_torch.linear_softmax_focal_loss(
        torch.from_numpy(h), torch.from_numpy(w), torch.from_numpy(y), bias=None if b is None else torch.from_numpy(b),
        class_weight=None if cw is None else torch.from_numpy(cw), **kw))
    assert ej is not None and ej == et
    if "cw_values" in bad:  # the message softmax_focal_loss gives for the same weight, named class_weight
        assert ej[1].startswith("Invalid value for argument `class_weight`"), ej
