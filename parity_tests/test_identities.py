"""Identities: γ=0 is the framework's own cross-entropy (value and gradient), alpha=1 keeps only
positives, the focal/CE ratio is the modulator, and the soft-target convention is pinned."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from focal_spec import reference
from parity_tests import _harness as H

SIG_OPTS = [
    dict(reduction=r, weight=w, label_smoothing=e, where=m)
    for r, w, e, m in itertools.product(H.REDUCTIONS, (None, "w"), (0.0, 0.1), (None, "mask"))
]


def _sig_inputs(opts, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=3.0, size=(5, 4))
    t = rng.uniform(size=(5, 4))
    w = rng.uniform(0.5, 2.0, size=(4,)) if opts["weight"] else None
    m = (rng.uniform(size=(5, 4)) < 0.7) if opts["where"] else None
    return x, t, w, m


def _opt_id(o):
    return "-".join(f"{k}={v}" for k, v in o.items())


@pytest.mark.parametrize("opts", SIG_OPTS, ids=_opt_id)
def test_torch_sigmoid_gamma0_is_bce_with_logits(opts):
    import torch
    import torch.nn.functional as F

    import focal_torch

    x, t, w, m = _sig_inputs(opts)
    eps = opts["label_smoothing"]
    xa = torch.tensor(x, requires_grad=True)
    xb = torch.tensor(x, requires_grad=True)
    tt = torch.tensor(t)
    ours = focal_torch.sigmoid_focal_loss(
        xa, tt, gamma=0.0, weight=None if w is None else torch.tensor(w), label_smoothing=eps,
        where=None if m is None else torch.tensor(m), reduction=opts["reduction"])
    # BCE with weight = where-mask * weight, on the smoothed target; mean over the counted elements.
    full_w = torch.ones_like(xb) if w is None else torch.tensor(w).expand_as(xb)
    if m is not None:
        full_w = full_w * torch.tensor(m)
    theirs = F.binary_cross_entropy_with_logits(xb, tt * (1 - eps) + eps / 2, weight=full_w, reduction="none")
    if opts["reduction"] == "sum":
        theirs = theirs.sum()
    elif opts["reduction"] == "mean":
        theirs = theirs.sum() / (full_w.numel() if m is None else float(m.sum()))
    H.assert_close(ours.detach(), theirs.detach(), "float64", "value")
    ours.sum().backward()
    theirs.sum().backward()
    H.assert_close(xa.grad, xb.grad, "float64", "gradient")


def test_torch_sigmoid_gamma0_mean_is_bce_mean_exactly():
    """With no options, 'mean' is exactly F.binary_cross_entropy_with_logits' own mean, in float32."""
    import torch
    import torch.nn.functional as F

    import focal_torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=g) * 4
    t = (torch.rand(64, 10, generator=g) < 0.2).float()
    for red in H.REDUCTIONS:
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a = focal_torch.sigmoid_focal_loss(xa, t, gamma=0, reduction=red)
        b = F.binary_cross_entropy_with_logits(xb, t, reduction=red)
        H.assert_close(a.detach(), b.detach(), "float32", red)
        a.sum().backward()
        b.sum().backward()
        H.assert_close(xa.grad, xb.grad, "float32", red)


SOFT_OPTS = [
    dict(reduction=r, weight=w, label_smoothing=e, labels=lab, ignore=i)
    for r, w, e, lab, i in itertools.product(H.REDUCTIONS, (None, "w"), (0.0, 0.1), ("index", "probs"), (False, True))
    if not (lab == "probs" and i)
]


@pytest.mark.parametrize("opts", SOFT_OPTS, ids=_opt_id)
def test_torch_softmax_gamma0_is_cross_entropy(opts):
    import torch
    import torch.nn.functional as F

    import focal_torch

    rng = np.random.default_rng(1)
    x = rng.normal(scale=3.0, size=(6, 5, 3))
    if opts["labels"] == "index":
        y = torch.tensor(rng.integers(0, 5, size=(6, 3)))
        if opts["ignore"]:
            y[0, 0] = y[3, 2] = 7
    else:
        y = torch.tensor(np.moveaxis(rng.dirichlet(np.ones(5), size=(6, 3)), -1, 1))
    w = torch.tensor(rng.uniform(0.5, 2.0, size=5)) if opts["weight"] else None
    kw = dict(weight=w, label_smoothing=opts["label_smoothing"], reduction=opts["reduction"])
    if opts["ignore"]:
        kw["ignore_index"] = 7
    xa = torch.tensor(x, requires_grad=True)
    xb = torch.tensor(x, requires_grad=True)
    a = focal_torch.softmax_focal_loss(xa, y, gamma=0.0, **kw)
    b = F.cross_entropy(xb, y, **kw)
    H.assert_close(a.detach(), b.detach(), "float64", "value")
    a.sum().backward()
    b.sum().backward()
    H.assert_close(xa.grad, xb.grad, "float64", "gradient")


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_jax_gamma0_is_optax_cross_entropy(soft):
    import jax
    import jax.numpy as jnp
    import optax

    import focal_jax

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(scale=3.0, size=(8, 5)), jnp.float32)
    t = jnp.asarray(rng.uniform(size=(8, 5)) if soft else rng.uniform(size=(8, 5)) < 0.3, jnp.float32)
    ours = jax.value_and_grad(lambda z: focal_jax.sigmoid_focal_loss(z, t, gamma=0.0))(x)
    theirs = jax.value_and_grad(lambda z: optax.sigmoid_binary_cross_entropy(z, t).mean())(x)
    H.assert_close(ours[0], theirs[0], "float32", "sigmoid value")
    H.assert_close(ours[1], theirs[1], "float32", "sigmoid gradient")
    y = jnp.asarray(rng.integers(0, 5, size=(8,)))
    ours = jax.value_and_grad(lambda z: focal_jax.softmax_focal_loss(z, y, gamma=0.0))(x)
    theirs = jax.value_and_grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y).mean())(x)
    H.assert_close(ours[0], theirs[0], "float32", "softmax value")
    H.assert_close(ours[1], theirs[1], "float32", "softmax gradient")
    q = jax.nn.softmax(jnp.asarray(rng.normal(size=(8, 5)), jnp.float32))
    ours = jax.value_and_grad(lambda z: focal_jax.softmax_focal_loss(z, q, gamma=0.0))(x)
    theirs = jax.value_and_grad(lambda z: optax.softmax_cross_entropy(z, q).mean())(x)
    H.assert_close(ours[0], theirs[0], "float32", "probabilities value")
    H.assert_close(ours[1], theirs[1], "float32", "probabilities gradient")


def test_alpha_one_keeps_only_positives_and_zero_only_negatives():
    rng = np.random.default_rng(3)
    x = rng.normal(scale=3.0, size=(50,))
    t = (rng.uniform(size=50) < 0.4).astype(float)
    full, _ = reference.sigmoid_focal_loss(x, t, reduction="none")
    pos, _ = reference.sigmoid_focal_loss(x, t, alpha=1.0, reduction="none")
    neg, _ = reference.sigmoid_focal_loss(x, t, alpha=0.0, reduction="none")
    np.testing.assert_array_equal(pos, np.where(t == 1, full, 0.0))
    np.testing.assert_array_equal(neg, np.where(t == 0, full, 0.0))


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("gamma", H.GAMMAS)
def test_focal_over_ce_is_the_modulator(backend, gamma):
    """For hard targets, FL / CE = (1 - p_t)^γ with p_t = σ(x) for t=1 and 1-σ(x) for t=0."""
    rng = np.random.default_rng(4)
    x = rng.normal(scale=2.0, size=(40,))
    t = (rng.uniform(size=40) < 0.5).astype(float)
    case = H.Inputs(x, t, {"gamma": gamma, "reduction": "none"}, "float64")
    fl, _ = (H.run_jax if backend == "jax" else H.run_torch)("sigmoid", case)
    ce, _ = (H.run_jax if backend == "jax" else H.run_torch)("sigmoid", H.Inputs(x, t, {"gamma": 0.0,
                                                                                      "reduction": "none"}, "float64"))
    p = 1 / (1 + np.exp(-x))
    one_minus_pt = np.where(t == 1, 1 - p, p)
    H.assert_close(fl / ce, one_minus_pt ** gamma, "float64")


def test_soft_target_convention_is_linear_and_differs_from_peers():
    """The modulator uses the linear 1-p_t = t'σ(-x) + (1-t')σ(x) (torchvision, optax). kornia's split
    terms, MONAI's σ(x(1-2t))^γ and segmentation_models_pytorch's geometric exp(-CE) agree with it only
    for 0/1 targets."""
    x = np.array([-2.0, 0.5, 3.0])
    gamma = 2.0
    s = 1 / (1 + np.exp(-x))
    ce = lambda t: -(t * np.log(s) + (1 - t) * np.log1p(-s))
    linear = lambda t: (t * (1 - s) + (1 - t) * s) ** gamma * ce(t)
    kornia = lambda t: -(t * (1 - s) ** gamma * np.log(s) + (1 - t) * s ** gamma * np.log1p(-s))
    monai = lambda t: (1 / (1 + np.exp(-x * (1 - 2 * t)))) ** gamma * ce(t)
    geometric = lambda t: (1 - np.exp(-ce(t))) ** gamma * ce(t)
    for t in (0.0, 1.0):
        tt = np.full(3, t)
        ours, _ = reference.sigmoid_focal_loss(x, tt, gamma=gamma, reduction="none")
        for peer in (linear, kornia, monai, geometric):
            np.testing.assert_allclose(ours, peer(tt), rtol=1e-12)
    for t in (0.3, 0.9):  # (at t = 0.5 MONAI's modulator is 0.5^γ, as is ours)
        tt = np.full(3, t)
        ours, _ = reference.sigmoid_focal_loss(x, tt, gamma=gamma, reduction="none")
        np.testing.assert_allclose(ours, linear(tt), rtol=1e-12)
        for peer in (kornia, monai, geometric):
            assert np.abs(ours - peer(tt)).max() > 1e-3


def test_kornia_migration_rows_hold():
    """The README's migration table: kornia's binary loss equals ours for 0/1 targets, and its softmax
    focal_loss(alpha=a, reduction="mean") equals our sum with weight [1-a, a, ...] over numel."""
    kornia = pytest.importorskip("kornia")
    import torch

    import focal_torch

    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) * 3
    t = (torch.rand(4, 3, 5, 5, generator=g) < 0.3).double()
    theirs = kornia.losses.binary_focal_loss_with_logits(x, t, alpha=0.25, gamma=2.0, reduction="none")
    ours = focal_torch.sigmoid_focal_loss(x, t, alpha=0.25, reduction="none")
    H.assert_close(ours, theirs, "float64")
    y = torch.randint(0, 3, (4, 5, 5), generator=g)
    a = 0.25
    theirs = kornia.losses.focal_loss(x, y, alpha=a, gamma=2.0, reduction="mean")
    ours = focal_torch.softmax_focal_loss(x, y, weight=torch.tensor([1 - a] + [a] * 2, dtype=torch.float64),
                                          reduction="sum") / x.numel()
    H.assert_close(ours, theirs, "float64")
