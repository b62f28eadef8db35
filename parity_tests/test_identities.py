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
    denom = {"none": 1.0, "sum": 1.0, "mean": float(full_w.numel() if m is None else m.sum())}[opts["reduction"]]
    value_terms = _bce_value_terms(x, full_w.numpy()) / denom
    value_terms = value_terms if opts["reduction"] == "none" else value_terms.sum()
    H.assert_close(ours.detach(), theirs.detach(), "float64", "value", scale=value_terms)
    ours.sum().backward()
    theirs.sum().backward()
    scale = _bce_grad_terms(x, t * (1 - eps) + eps / 2, full_w.numpy()) / denom
    H.assert_close(xa.grad, xb.grad, "float64", "gradient", scale=scale)


def _bce_value_terms(x, w=1.0):
    """A bound on the terms of F.binary_cross_entropy_with_logits' value, (1-t')x + m + log(e^-m + e^(-x-m))
    with m = relu(-x): |x| + 1 (times |w|). Its log(1 + e^-|x|) rounds 1 + e^-|x| first, so its error is
    relative to 1, not to the (tiny) loss of a confident prediction."""
    return np.abs(w) * (np.abs(np.asarray(x, np.float64)) + 1.0)


def _bce_grad_terms(x, tp, w=1.0):
    """The magnitude of the terms of σ(x) - t' (times |w|): the scale of a BCE gradient's rounding."""
    return np.abs(w) * (1.0 / (1.0 + np.exp(-np.asarray(x, np.float64))) + np.asarray(tp, np.float64))


def _ce_grad_terms(x, q, w=None):
    """The magnitude of the terms of the softmax cross-entropy gradient p_k Σ_c w_c q_c - w_k q_k, class
    axis 1 (q is 0 at uncounted positions)."""
    x = np.asarray(x, np.float64)
    p = np.exp(x - np.logaddexp.reduce(x, axis=1, keepdims=True))
    wq = np.abs(q) if w is None else np.abs(q) * np.asarray(w).reshape((1, -1) + (1,) * (x.ndim - 2))
    return p * wq.sum(1, keepdims=True) + wq


def test_torch_sigmoid_gamma0_mean_is_bce_mean_exactly():
    """With no options, every reduction is F.binary_cross_entropy_with_logits', in float32, within that
    function's own rounding."""
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
        value_terms = _bce_value_terms(x.numpy()) / (x.numel() if red == "mean" else 1.0)
        value_terms = value_terms if red == "none" else value_terms.sum()
        H.assert_close(a.detach(), b.detach(), "float32", red, scale=value_terms)
        a.sum().backward()
        b.sum().backward()
        scale = _bce_grad_terms(x.numpy(), t.numpy()) / (x.numel() if red == "mean" else 1.0)
        H.assert_close(xa.grad, xb.grad, "float32", red, scale=scale)


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
    eps = opts["label_smoothing"]
    if opts["labels"] == "index":
        counted = (y != 7).numpy()
        q = np.moveaxis(np.eye(5)[np.where(counted, y.numpy(), 0)], -1, 1) * (1 - eps) + eps / 5
        q = q * counted[:, None]
        wy = np.ones(5) if w is None else w.numpy()
        denom = float((wy[np.where(counted, y.numpy(), 0)] * counted).sum())
    else:
        q = y.numpy() * (1 - eps) + eps / 5
        denom = float(q[:, 0].size)
    scale = _ce_grad_terms(x, q, None if w is None else w.numpy())
    H.assert_close(xa.grad, xb.grad, "float64", "gradient", scale=scale / (denom if opts["reduction"] == "mean" else 1))


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
    H.assert_close(ours[0], theirs[0], "float32", "sigmoid value", scale=np.mean(_bce_value_terms(x)))
    H.assert_close(ours[1], theirs[1], "float32", "sigmoid gradient", scale=_bce_grad_terms(x, t) / x.size)
    y = jnp.asarray(rng.integers(0, 5, size=(8,)))
    ours = jax.value_and_grad(lambda z: focal_jax.softmax_focal_loss(z, y, gamma=0.0))(x)
    theirs = jax.value_and_grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y).mean())(x)
    H.assert_close(ours[0], theirs[0], "float32", "softmax value")
    H.assert_close(ours[1], theirs[1], "float32", "softmax gradient", scale=_ce_grad_terms(x, np.eye(5)[y]) / 8)
    q = jax.nn.softmax(jnp.asarray(rng.normal(size=(8, 5)), jnp.float32))
    ours = jax.value_and_grad(lambda z: focal_jax.softmax_focal_loss(z, q, gamma=0.0))(x)
    theirs = jax.value_and_grad(lambda z: optax.softmax_cross_entropy(z, q).mean())(x)
    H.assert_close(ours[0], theirs[0], "float32", "probabilities value")
    H.assert_close(ours[1], theirs[1], "float32", "probabilities gradient", scale=_ce_grad_terms(x, q) / 8)


IDENTITY_LOGITS = np.array([-100.0, -30.0, -17.3, -5.0, -1.0, -0.25, 0.0, 0.25, 1.0, 5.0, 17.3, 30.0, 100.0])


def _hard_grid():
    x, t = np.meshgrid(IDENTITY_LOGITS, [0.0, 1.0], indexing="ij")
    return x.ravel(), t.ravel()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0], ids=lambda g: f"gamma={g}")
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_alpha_one_keeps_only_positives_and_zero_only_negatives(backend, gamma, dtype):
    """For 0/1 targets, alpha=1 is the loss on positives only and alpha=0 on negatives only, in value and
    gradient; the others are exactly 0."""
    x, t = _hard_grid()
    run = H.RUNNERS[backend]
    full = run("sigmoid", H.Inputs(x, t, {"gamma": gamma, "reduction": "none"}, dtype))
    pos = run("sigmoid", H.Inputs(x, t, {"gamma": gamma, "alpha": 1.0, "reduction": "none"}, dtype))
    neg = run("sigmoid", H.Inputs(x, t, {"gamma": gamma, "alpha": 0.0, "reduction": "none"}, dtype))
    for k, what in ((0, "value"), (1, "gradient")):
        np.testing.assert_array_equal(pos[k][t == 0], 0.0)
        np.testing.assert_array_equal(neg[k][t == 1], 0.0)
        H.assert_close(pos[k][t == 1], full[k][t == 1], dtype, f"alpha=1 {what}")
        H.assert_close(neg[k][t == 0], full[k][t == 0], dtype, f"alpha=0 {what}")
        assert np.any(full[k][t == 0] != 0) and np.any(full[k][t == 1] != 0)  # both halves carry a loss


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0, 2.0, 5.0, 8.0], ids=lambda g: f"gamma={g}")
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_focal_is_at_most_cross_entropy(backend, gamma, dtype):
    """FL <= CE elementwise (the modulator is at most 1), for hard and soft targets, every logit."""
    x, t = np.meshgrid(IDENTITY_LOGITS, [0.0, 1.0, 0.25, 0.5, 0.9], indexing="ij")
    x, t = x.ravel(), t.ravel()
    run = H.RUNNERS[backend]
    kw = {"alpha": 0.25, "label_smoothing": 0.1, "reduction": "none"}
    fl, _ = run("sigmoid", H.Inputs(x, t, dict(kw, gamma=gamma), dtype))
    ce, _ = run("sigmoid", H.Inputs(x, t, dict(kw, gamma=0.0), dtype))
    # (the modulator is below 1: strictly, since 1 - p_t <= max(t', 1 - t') = 0.95 here)
    assert np.all(fl < ce), np.flatnonzero(fl >= ce)
    rng = np.random.default_rng(9)
    y = rng.integers(0, 4, size=20)
    logits = rng.normal(scale=5.0, size=(20, 4))
    fl, _ = run("softmax", H.Inputs(logits, y, {"gamma": gamma, "reduction": "none"}, dtype))
    ce, _ = run("softmax", H.Inputs(logits, y, {"gamma": 0.0, "reduction": "none"}, dtype))
    assert np.all(fl <= ce * (1 + H.TOLERANCES[dtype]["rtol"])), np.flatnonzero(fl > ce)  # equal where p_y -> 0
    assert np.any(fl < 0.5 * ce)


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("gamma", H.GAMMAS)
def test_focal_over_ce_is_the_modulator(backend, gamma):
    """For hard targets, FL = (1 - p_t)^γ · CE with p_t = σ(x) for t=1 and 1-σ(x) for t=0, and CE the
    closed form log(1 + e^{-|x|}) + relu((1-2t)x), computed here independently of both the backend and
    the reference."""
    rng = np.random.default_rng(4)
    x = rng.normal(scale=2.0, size=(40,))
    t = (rng.uniform(size=40) < 0.5).astype(float)
    fl, _ = H.RUNNERS[backend]("sigmoid", H.Inputs(x, t, {"gamma": gamma, "reduction": "none"}, "float64"))
    ce = np.log1p(np.exp(-np.abs(x))) + np.maximum((1 - 2 * t) * x, 0.0)
    one_minus_pt = 1 / (1 + np.exp(np.where(t == 1, x, -x)))
    H.assert_close(fl, one_minus_pt ** gamma * ce, "float64")


SOFT_X = np.array([-2.0, 0.5, 3.0])


def _peers(t: np.ndarray, gamma: float) -> dict:
    """The four soft-target conventions in use, in float64 NumPy."""
    s = 1 / (1 + np.exp(-SOFT_X))
    ce = -(t * np.log(s) + (1 - t) * np.log1p(-s))
    return {
        "linear": (t * (1 - s) + (1 - t) * s) ** gamma * ce,
        "kornia": -(t * (1 - s) ** gamma * np.log(s) + (1 - t) * s ** gamma * np.log1p(-s)),
        "monai": (1 / (1 + np.exp(-SOFT_X * (1 - 2 * t)))) ** gamma * ce,
        "geometric": (1 - np.exp(-ce)) ** gamma * ce,
    }


@pytest.mark.parametrize("backend", ["reference", "jax", "torch"])
def test_soft_target_convention_is_linear_and_differs_from_peers(backend):
    """The modulator uses the linear 1-p_t = t'σ(-x) + (1-t')σ(x) (torchvision, optax). kornia's split
    terms, MONAI's σ(x(1-2t))^γ and segmentation_models_pytorch's geometric exp(-CE) agree with it only
    for 0/1 targets."""
    gamma = 2.0

    def ours(t):
        inp = H.Inputs(SOFT_X, np.full(3, t), {"gamma": gamma, "reduction": "none"}, "float64")
        if backend == "reference":
            return reference.sigmoid_focal_loss(inp.logits, inp.labels, gamma=gamma, reduction="none")[0]
        return H.RUNNERS[backend]("sigmoid", inp)[0]

    for t in (0.0, 1.0):
        for name, peer in _peers(np.full(3, t), gamma).items():
            H.assert_close(ours(t), peer, "float64", name)
    for t in (0.3, 0.9):  # (at t = 0.5 MONAI's modulator is 0.5^γ, as is ours)
        peers = _peers(np.full(3, t), gamma)
        H.assert_close(ours(t), peers.pop("linear"), "float64", "linear")
        for name, peer in peers.items():
            assert np.abs(ours(t) - peer).max() > 1e-3, name


SMOOTHING_CASES = [
    pytest.param("sigmoid", "hard", None, id="sigmoid-hard"),
    pytest.param("sigmoid", "soft", 0.25, id="sigmoid-soft-alpha=0.25"),
    pytest.param("sigmoid", "hard", "per_class", id="sigmoid-hard-alpha=per_class"),
    pytest.param("softmax", "index", None, id="softmax-index"),
    pytest.param("softmax", "index", "weight", id="softmax-index-weight"),
    pytest.param("softmax", "probs", "weight", id="softmax-probs-weight"),
]


def _smoothing_pair(loss, labels, option, eps, reduction, dtype):
    """(call with label_smoothing=eps, the same call with eps=0 on pre-smoothed targets)."""
    rng = np.random.default_rng(11)
    if loss == "sigmoid":
        x = rng.normal(scale=4.0, size=(6, 4))
        t = (rng.uniform(size=(6, 4)) < 0.3).astype(float) if labels == "hard" else rng.uniform(size=(6, 4))
        t = H.round_to(t, dtype)  # as handed over
        kw = {"gamma": 2.0, "reduction": reduction}
        per_class = ()
        if option == "per_class":
            kw["alpha"], per_class = rng.uniform(0.1, 0.9, size=4), ("alpha",)
        elif option is not None:
            kw["alpha"] = option
        smoothed = t * (1 - eps) + eps / 2
        return (H.Inputs(x, t, dict(kw, label_smoothing=eps), dtype, per_class),
                H.Inputs(x, smoothed, dict(kw, label_smoothing=0.0), dtype, per_class))
    c = 5
    x = rng.normal(scale=4.0, size=(8, c, 3))
    kw = {"gamma": 2.0, "reduction": reduction}
    if option == "weight":
        kw["weight"] = rng.uniform(0.5, 2.0, size=c)
    if labels == "index":
        y = rng.integers(0, c, size=(8, 3))
        q = np.moveaxis(np.eye(c)[y], -1, 1)
    else:
        y = H.round_to(np.moveaxis(rng.dirichlet(np.ones(c), size=(8, 3)), -1, 1), dtype)
        q = y
    smoothed = q * (1 - eps) + eps / c
    return (H.Inputs(x, y, dict(kw, label_smoothing=eps), dtype),
            H.Inputs(x, smoothed, dict(kw, label_smoothing=0.0), dtype))


# Class-index labels become probabilities, whose mean divides by the number of positions rather than
# Σ w[y]: with a class weight, the index 'mean' is not this identity.
SMOOTHING_PARAMS = [pytest.param(*p.values, r, id=f"{p.id}-{r}") for p in SMOOTHING_CASES for r in H.REDUCTIONS
                    if not (p.id == "softmax-index-weight" and r == "mean")]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss,labels,option,reduction", SMOOTHING_PARAMS)
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_label_smoothing_is_pre_smoothed_targets(backend, loss, labels, option, reduction, dtype):
    """loss(t, ε) = loss(t', ε=0) with t' = t(1-ε) + ε/2 (sigmoid, α_t included) or q(1-ε) + ε/C (softmax),
    on one backend, without the reference."""
    smoothed_call, pre_smoothed = _smoothing_pair(loss, labels, option, 0.2, reduction, dtype)
    a = H.RUNNERS[backend](loss, smoothed_call)
    b = H.RUNNERS[backend](loss, pre_smoothed)
    # both sides round t' to the compute dtype (one inside, one outside): twice the contract's scale
    exp = H.expected(loss, smoothed_call)
    H.Expected(b[0], b[1], exp.value_scale, exp.grad_scale, exp.grad_scale_ref).check(
        a[0], a[1], dtype, f"{backend} smoothed vs pre-smoothed", factor=2.0)
    unsmoothed = H.Inputs(smoothed_call.logits, smoothed_call.labels, dict(smoothed_call.kwargs, label_smoothing=0.0),
                          dtype, smoothed_call.per_class)
    assert np.abs(a[1] - H.RUNNERS[backend](loss, unsmoothed)[1]).max() > 1e-2 * np.abs(a[1]).max()  # ε matters


def test_kornia_migration_rows_hold():
    """The migration table (docs/guide/migrating.md): kornia's binary loss equals ours for 0/1 targets, and its softmax
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
