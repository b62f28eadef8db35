"""The focal loss's family options (``poly1``, ``normalized``, ``reduced_threshold``, a ``GammaSchedule``) give
the same values and gradients in both backends, on the same inputs, as the float64 reference: each backend's own
grid is in ``test_family_options_jax.py`` / ``test_family_options_torch.py``; this is the side-by-side check
that would catch the two drifting apart (for example one deciding p_t < th differently)."""

from __future__ import annotations

import numpy as np
import pytest

import focal_spec
from focal_spec import reference
from parity_tests import _harness as H

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import focal_jax  # noqa: E402
import focal_torch  # noqa: E402

OPTIONS = {
    "poly1": {"gamma": 2.0, "alpha": 0.25, "poly1": 1.0},
    "poly1-frac": {"gamma": 0.5, "poly1": 2.0},
    "normalized": {"gamma": 2.0, "normalized": True},
    "reduced": {"gamma": 2.0, "reduced_threshold": 0.5},
    "flsd53": {"gamma": focal_spec.FLSD_53, "alpha": 0.25},
    "all": {"gamma": focal_spec.FLSD_53, "poly1": 0.5, "normalized": True, "reduced_threshold": 0.4},
}


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((16, 5)) * 3).astype(np.float32)
    t = (rng.random((16, 5)) < 0.3).astype(np.float32)
    # keep p_t away from the decision points (0.2 for FLSD-53, the thresholds) by more than rounding
    p_t = np.where(t == 1, 1 / (1 + np.exp(-x.astype(np.float64))), 1 / (1 + np.exp(x.astype(np.float64))))
    for edge in (0.2, 0.4, 0.5):
        x = np.where(np.abs(p_t - edge) < 1e-3, x + np.float32(0.05), x)
    return x, t


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_sigmoid_options_agree_across_backends(name, reduction):
    kw = OPTIONS[name]
    x, t = _inputs(H.seed_of(name))
    ref_v, ref_g = reference.sigmoid_focal_loss(x.astype(np.float64), t.astype(np.float64), reduction=reduction, **kw)

    xt = torch.from_numpy(x).requires_grad_()
    vt = focal_torch.sigmoid_focal_loss(xt, torch.from_numpy(t), reduction=reduction, **kw)
    vt.sum().backward()

    def jloss(z):
        return focal_jax.sigmoid_focal_loss(z, jnp.asarray(t), reduction=reduction, **kw)

    vj, gj = jax.value_and_grad(lambda z: jnp.sum(jloss(z)))(jnp.asarray(x))
    vj = jloss(jnp.asarray(x))
    # hard targets, moderate logits and p_t off the decision points: |reference| is the condition scale, up to
    # the modulator's factor (γ + 1, and γ|log q| for a fractional γ)
    cond = 8.0
    for what, a, b, e in (("value", vt.detach().numpy(), np.asarray(vj), ref_v),
                          ("gradient", xt.grad.numpy(), np.asarray(gj), ref_g)):
        H.assert_close(a, e, "float32", f"torch {what}", scale=cond * np.abs(e))
        H.assert_close(b, e, "float32", f"jax {what}", scale=cond * np.abs(e))
        H.assert_close(a, b, "float32", f"torch vs jax {what}", scale=2 * cond * np.abs(e))


@pytest.mark.parametrize("labels", ["index", "probs"])
def test_softmax_poly1_agrees_across_backends(labels):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((12, 4)) * 3).astype(np.float32)
    y = rng.integers(0, 4, 12)
    lab = y if labels == "index" else np.eye(4, dtype=np.float32)[y] * 0.9 + 0.025
    ref_v, ref_g = reference.softmax_focal_loss(x.astype(np.float64), lab, gamma=1.5, poly1=1.0, axis=-1,
                                                reduction="none")
    xt = torch.from_numpy(x).requires_grad_()
    vt = focal_torch.softmax_focal_loss(xt, torch.from_numpy(np.asarray(lab)), gamma=1.5, poly1=1.0,
                                        reduction="none")
    vt.sum().backward()

    def jloss(z):
        return focal_jax.softmax_focal_loss(z, jnp.asarray(lab), gamma=1.5, poly1=1.0, reduction="none")

    gj = jax.grad(lambda z: jnp.sum(jloss(z)))(jnp.asarray(x))
    vj = jloss(jnp.asarray(x))
    H.assert_close(vt.detach().numpy(), ref_v, "float32", "torch value", scale=8 * np.abs(ref_v))
    H.assert_close(np.asarray(vj), ref_v, "float32", "jax value", scale=8 * np.abs(ref_v))
    gscale = 8 * np.abs(ref_g).max(axis=-1, keepdims=True)  # a row's entries sum to about 0: scale by the row
    H.assert_close(xt.grad.numpy(), ref_g, "float32", "torch gradient", scale=gscale)
    H.assert_close(np.asarray(gj), ref_g, "float32", "jax gradient", scale=gscale)
