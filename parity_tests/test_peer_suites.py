"""The scenarios of the peers' own focal-loss unit tests, pointed at ``focal_torch`` and ``focal_jax``.

torchvision (``TestFocalLoss``), kornia (``binary_focal_loss_with_logits`` and ``focal_loss``), MONAI
(``FocalLoss``) and optax (``sigmoid_focal_loss``) each test their loss for a set of properties. Every
test here reproduces one of those intents against our functions, called through the migration guide's
"Migrating" table. The peer formulas are written out below from their definitions, in float64; where
a convention differs (kornia's per-class ``alpha`` and its ``(N, C, *)`` map, MONAI's ``sum`` over
spatial means, ...), the test asserts the exact relation between the two losses, not a looser
tolerance.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import focal_torch
from focal_spec import reference
from parity_tests import _harness as H

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


def _np64(a):
    return a.detach().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)


def _close(actual, expected, dtype, what="", scale=None):
    """The suite's precision contract (``_harness.assert_close``): relative to the float64 formula, with
    ``scale`` for a quantity whose float64 truth is a difference or a quotient."""
    H.assert_close(_np64(actual), _np64(expected), dtype, what, scale=None if scale is None else _np64(scale))


# ----------------------------------------------------------------------------------------
# The peers' formulas, elementwise, in float64 torch.
# ----------------------------------------------------------------------------------------


def bce64(x, t, pos_weight=1.0):
    """-(π t log σ(x) + (1-t) log σ(-x)), from log-sigmoid: the exact binary cross-entropy."""
    x, t = x.double(), t.double()
    return -(pos_weight * t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x))


def one_minus_pt(x, t):
    x, t = x.double(), t.double()
    return t * torch.sigmoid(-x) + (1 - t) * torch.sigmoid(x)


def bce64_grad(x, t):
    """d bce / dx = σ(x) - t, written (1-t)σ(x) - tσ(-x): exact for 0/1 targets at any logit."""
    x, t = x.double(), t.double()
    return (1 - t) * torch.sigmoid(x) - t * torch.sigmoid(-x)


def torchvision_sigmoid_focal(x, t, alpha=0.25, gamma=2.0):
    """torchvision.ops.sigmoid_focal_loss, reduction="none": ce (1-p_t)^γ with p_t = p t + (1-p)(1-t), times
    α_t when alpha >= 0. 1 - p_t is written t σ(-x) + (1-t) σ(x), the same number without cancellation."""
    x, t = x.double(), t.double()
    loss = bce64(x, t) * one_minus_pt(x, t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


def _class_view(v, ndim):
    """A per-class (C,) vector laid along dim 1 of an (N, C, *) tensor."""
    return v.double().reshape((-1,) + (1,) * (ndim - 2))


def kornia_binary_focal(x, t, alpha=0.25, gamma=2.0, pos_weight=None, weight=None, ignore_index=-100):
    """kornia.losses.binary_focal_loss_with_logits, reduction="none": split positive and negative terms
    α t σ(-x)^γ (-π log σ(x)) + (1-α)(1-t) σ(x)^γ (-log σ(-x)); ``pos_weight`` and ``weight`` are (C,)
    along dim 1; a target equal to ``ignore_index`` gives 0."""
    x, t = x.double(), t.double()
    keep = (t != ignore_index) if ignore_index is not None else torch.ones_like(t, dtype=torch.bool)
    t = torch.where(keep, t, 0.0)
    lp, ln = F.logsigmoid(x) * keep, F.logsigmoid(-x) * keep
    pos = -torch.exp(gamma * ln) * t * lp
    neg = -torch.exp(gamma * lp) * (1 - t) * ln
    if alpha is not None:
        pos, neg = alpha * pos, (1 - alpha) * neg
    if pos_weight is not None:
        pos = _class_view(pos_weight, x.ndim) * pos
    loss = pos + neg
    if weight is not None:
        loss = _class_view(weight, x.ndim) * loss
    return loss


def log_softmax_parts(x):
    """log p_c and log(1 - p_c) over dim 1 in float64, with 1 - p_c = Σ_{k≠c} p_k (no cancellation as p_c
    nears 1) and log p_c from log1p(-(1 - p_c)) there."""
    x = x.double()
    lse = torch.logsumexp(x, 1, keepdim=True)
    c = x.shape[1]
    eye = torch.eye(c, dtype=torch.bool).view((c, c) + (1,) * (x.ndim - 2))
    others = torch.stack([torch.logsumexp(x.masked_fill(eye[k], -math.inf), 1) for k in range(c)], 1)
    log1mp = others - lse
    logp = torch.where(log1mp < -math.log(2), torch.log1p(-torch.exp(log1mp)), x - lse)
    return logp, log1mp


def kornia_softmax_focal(x, y, alpha, gamma=2.0, weight=None, ignore_index=-100):
    """kornia.losses.focal_loss, reduction="none": an (N, C, *) map, -α_c w_c (1-p_c)^γ log p_c at the
    label's class and 0 elsewhere; α_c = 1-α for class 0 and α for the others; ignored positions are 0."""
    x = x.double()
    c = x.shape[1]
    keep = y != ignore_index
    onehot = F.one_hot(torch.where(keep, y, 0), c).movedim(-1, 1).double() * keep.unsqueeze(1)
    logp, log1mp = log_softmax_parts(torch.where(keep.unsqueeze(1), x, 0.0))
    loss = -torch.exp(gamma * log1mp) * torch.where(onehot > 0, logp, 0.0) * onehot
    if alpha is not None:
        loss = _class_view(torch.tensor([1 - alpha] + [alpha] * (c - 1), dtype=torch.float64), x.ndim) * loss
    if weight is not None:
        loss = _class_view(weight, x.ndim) * loss
    return loss


def monai_sigmoid_map(x, t, gamma=2.0, alpha=None):
    """MONAI's sigmoid focal term: ce · σ(x(1-2t))^γ, times α t + (1-α)(1-t) when alpha is given."""
    x, t = x.double(), t.double()
    loss = bce64(x, t) * torch.exp(gamma * F.logsigmoid(-x * (2 * t - 1)))
    if alpha is not None:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


def monai_softmax_map(x, t, gamma=2.0, alpha=None):
    """MONAI's softmax focal term: -(1-p_c)^γ log p_c · t_c, times 1-α for class 0 and α for the others."""
    logp, log1mp = log_softmax_parts(x)
    loss = -torch.exp(gamma * log1mp) * logp * t.double()
    if alpha is not None:
        loss = _class_view(torch.tensor([1 - alpha] + [alpha] * (x.shape[1] - 1), dtype=torch.float64),
                           x.ndim) * loss
    return loss


def monai_focal(x, target, *, use_softmax=False, gamma=2.0, alpha=None, weight=None, include_background=True,
                reduction="mean"):
    """monai.losses.FocalLoss(to_onehot_y=True, ...) on integer labels (N, 1, *) or one-hot (N, C, *).

    Drops channel 0 first when ``include_background`` is False (so the softmax runs over the other
    classes only); ``weight`` is per class along dim 1; "mean" averages every element of the (N, C, *)
    map; "sum" sums the spatial means (with no spatial dims torch's ``mean(dim=[])`` averages all).
    """
    c = x.shape[1]
    t = target if target.shape[1] == c else F.one_hot(target[:, 0].long(), c).movedim(-1, 1)
    if not include_background:
        x, t = x[:, 1:], t[:, 1:]
    loss = monai_softmax_map(x, t, gamma, alpha) if use_softmax else monai_sigmoid_map(x, t, gamma, alpha)
    if weight is not None:
        loss = _class_view(torch.as_tensor(weight, dtype=torch.float64), x.ndim) * loss
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    return loss.mean(dim=list(range(2, x.ndim))).sum()


# ----------------------------------------------------------------------------------------
# torchvision: TestFocalLoss.
# ----------------------------------------------------------------------------------------


def _torchvision_inputs(seed, dtype=torch.float32, shape=(5, 2)):
    """Logits of probabilities drawn small (0-0.2), big (0.8-1) and anywhere, each with all-0, all-1 and
    random 0/1 targets, plus a block of confident logits ±10 ... ±20 with right and wrong targets."""
    rng = np.random.default_rng(seed)
    xs, ts = [], []
    for lo, hi in ((1e-6, 0.2), (0.8, 1 - 1e-6), (1e-6, 1 - 1e-6)):
        for kind in ("zeros", "ones", "binary"):
            p = rng.uniform(lo, hi, size=shape)
            xs.append(np.log(p / (1 - p)))
            ts.append(np.zeros(shape) if kind == "zeros" else np.ones(shape) if kind == "ones"
                      else rng.integers(0, 2, size=shape).astype(float))
    confident = np.array([10.0, 12.0, 15.0, 17.5, 20.0])
    xs += [np.stack([confident, -confident], 1), np.stack([-confident, confident], 1)]
    ts += [np.tile([1.0, 0.0], (5, 1))] * 2  # the first block is right, the second wrong
    x = torch.tensor(np.concatenate(xs), dtype=dtype)
    t = torch.tensor(np.concatenate(ts), dtype=torch.float32)
    return x, t


TV_ALPHAS = [None, 0.0, 0.58, 1.0]  # torchvision's alpha=-1 (off) is our None


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("alpha", TV_ALPHAS, ids=lambda a: f"alpha={a}")
def test_torchvision_correct_ratio(alpha, gamma, dtype):
    """FL <= CE elementwise (CE: our gamma=0 in the same dtype), FL equals torchvision's formula, and
    FL/CE = α_t (1-p_t)^γ (a quotient of two values each held to rtol: scale 2|ratio|)."""
    x, t = _torchvision_inputs(seed=0, dtype=TORCH_DTYPES[dtype])
    fl = focal_torch.sigmoid_focal_loss(x, t, gamma=gamma, alpha=alpha, reduction="none")
    ce = focal_torch.sigmoid_focal_loss(x, t, gamma=0.0, reduction="none")
    assert fl.dtype == x.dtype and fl.shape == x.shape
    bad = (fl > ce).nonzero()
    assert bad.numel() == 0, f"FL > CE at logits {x[tuple(bad.T)].tolist()}"
    expected = torchvision_sigmoid_focal(x, t, alpha=-1.0 if alpha is None else alpha, gamma=gamma)
    _close(fl, expected, dtype, "focal loss against torchvision's formula")
    if dtype in ("float32", "float64"):
        ratio = one_minus_pt(x, t) ** gamma
        if alpha is not None:
            ratio = ratio * (alpha * t.double() + (1 - alpha) * (1 - t.double()))
        _close(fl.double() / ce.double(), ratio, dtype, "FL / CE", scale=2 * ratio)


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torchvision_equal_ce_loss(reduction, dtype):
    """gamma=0 without alpha is F.binary_cross_entropy_with_logits (run in float64) in value, and its
    gradient (σ(x) - t, over n for the mean)."""
    x, t = _torchvision_inputs(seed=2, dtype=TORCH_DTYPES[dtype])
    xa = x.clone().requires_grad_()
    ours = focal_torch.sigmoid_focal_loss(xa, t, gamma=0.0, reduction=reduction)
    assert ours.dtype == x.dtype
    _close(ours, F.binary_cross_entropy_with_logits(x.double(), t.double(), reduction=reduction), dtype, "value")
    ours.backward()
    _close(xa.grad, bce64_grad(x, t) / (x.numel() if reduction == "mean" else 1), dtype, "gradient")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torchvision_ce_is_exact_at_confident_logits(dtype):
    """At gamma=0 the loss and its gradient are the cross-entropy's to the dtype's relative precision,
    also where they are small (logits up to ±20, right or wrong): no cancellation in softplus(x) - t x."""
    x, t = _torchvision_inputs(seed=3, dtype=TORCH_DTYPES[dtype])
    x.requires_grad_()
    ours = focal_torch.sigmoid_focal_loss(x, t, gamma=0.0, reduction="none")
    _close(ours, bce64(x.detach(), t), dtype, "cross-entropy")
    ours.sum().backward()
    _close(x.grad, bce64_grad(x.detach(), t), dtype, "gradient")


def _compile(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager", fullgraph=True)


@pytest.mark.parametrize(("alpha", "gamma", "reduction"), [(None, 0.0, "none"), (0.58, 2.0, "mean"),
                                                          (1.0, 2.0, "sum")])
def test_torchvision_jit_as_compile(alpha, gamma, reduction):
    """torchvision scripts its loss with TorchScript. Ours has keyword-only arguments and an
    autograd.Function, which TorchScript cannot compile; torch.compile(fullgraph=True) is the
    supported path and must give the eager numbers."""
    x, t = _torchvision_inputs(seed=4)
    compiled = _compile(lambda a, b: focal_torch.sigmoid_focal_loss(a, b, gamma=gamma, alpha=alpha,
                                                                   reduction=reduction))
    eager = focal_torch.sigmoid_focal_loss(x, t, gamma=gamma, alpha=alpha, reduction=reduction)
    _close(compiled(x, t), eager, "float32")


# ----------------------------------------------------------------------------------------
# kornia: binary_focal_loss_with_logits and focal_loss.
# ----------------------------------------------------------------------------------------


def _kornia_binary_inputs(seed, hard, shape=(2, 3, 2)):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5) * 8
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    return x, (t < 0.4).double() if hard else t


def test_kornia_formulas_are_kornias():
    """The float64 formulas above are kornia's own losses (run when kornia is installed)."""
    kornia = pytest.importorskip("kornia")
    x, t = _kornia_binary_inputs(0, hard=False)
    pw, w = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64), torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    t[0, 0, 0] = -100
    theirs = kornia.losses.binary_focal_loss_with_logits(x, t, alpha=0.3, gamma=1.5, pos_weight=pw, weight=w)
    _close(kornia_binary_focal(x, t, alpha=0.3, gamma=1.5, pos_weight=pw, weight=w), theirs, "float64")
    y = torch.tensor([[0, 2], [1, -100]])
    theirs = kornia.losses.focal_loss(x, y, alpha=0.25, gamma=2.0, weight=w)
    _close(kornia_softmax_focal(x, y, alpha=0.25, gamma=2.0, weight=w), theirs, "float64")


@pytest.mark.parametrize("reduction", H.REDUCTIONS)
def test_kornia_binary_gamma0_is_bce(reduction):
    """Soft targets, gamma=0, alpha off: F.binary_cross_entropy_with_logits."""
    x, t = _kornia_binary_inputs(1, hard=False)
    ours = focal_torch.sigmoid_focal_loss(x, t, gamma=0.0, reduction=reduction)
    _close(ours, F.binary_cross_entropy_with_logits(x, t, reduction=reduction), "float64")


@pytest.mark.parametrize("reduction", H.REDUCTIONS)
def test_kornia_binary_pos_weight_and_weight_gamma0_are_bce(reduction):
    """kornia passes (C, 1) pos_weight and weight through to F.binary_cross_entropy_with_logits at
    gamma=0; ours takes them with F.bce's meaning and broadcasting, in value and gradient."""
    x, t = _kornia_binary_inputs(2, hard=False)
    g = torch.Generator().manual_seed(2)
    pw, w = torch.rand(3, 1, generator=g, dtype=torch.float64) * 3, torch.rand(3, 1, generator=g, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = focal_torch.sigmoid_focal_loss(xa, t, gamma=0.0, pos_weight=pw, weight=w, reduction=reduction)
    theirs = F.binary_cross_entropy_with_logits(xb, t, pos_weight=pw, weight=w, reduction=reduction)
    _close(ours, theirs, "float64", "value")
    ours.sum().backward()
    theirs.sum().backward()
    _close(xa.grad, xb.grad, "float64", "gradient")


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.2, 0.5])
@pytest.mark.parametrize("reduction", H.REDUCTIONS)
def test_kornia_binary_hard_targets_match(reduction, alpha, gamma):
    """For 0/1 targets kornia's split terms are our loss: same shape and value for every reduction
    (both means divide by numel)."""
    x, t = _kornia_binary_inputs(3, hard=True)
    ours = focal_torch.sigmoid_focal_loss(x, t, gamma=gamma, alpha=alpha, reduction=reduction)
    theirs = kornia_binary_focal(x, t, alpha=alpha, gamma=gamma)
    theirs = {"none": theirs, "mean": theirs.mean(), "sum": theirs.sum()}[reduction]
    assert ours.shape == theirs.shape
    _close(ours, theirs, "float64")


@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.8])
def test_kornia_binary_pos_weight_hard_targets_match(alpha, gamma):
    """kornia's (C,) pos_weight scales the positive term, modulator included; for 0/1 targets that is
    ours with pos_weight.view(C, 1) (it broadcasts to the logits, as in F.bce)."""
    x, t = _kornia_binary_inputs(4, hard=True)
    pw, w = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64), torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    ours = focal_torch.sigmoid_focal_loss(x, t, gamma=gamma, alpha=alpha, pos_weight=pw.view(3, 1),
                                          weight=w.view(3, 1), reduction="none")
    _close(ours, kornia_binary_focal(x, t, alpha=alpha, gamma=gamma, pos_weight=pw, weight=w), "float64")


@pytest.mark.parametrize("ignore_index", [-100, 255])
def test_kornia_binary_ignore_index_is_where(ignore_index):
    """kornia zeroes targets equal to ignore_index and keeps them in the mean's denominator. Ours:
    where=(target != ignore_index); our mean divides by the counted elements, so kornia's mean is our
    sum over numel."""
    x, t = _kornia_binary_inputs(5, hard=True)
    g = torch.Generator().manual_seed(5)
    t[torch.rand(t.shape, generator=g) > 0.6] = ignore_index
    keep = t != ignore_index
    theirs = kornia_binary_focal(x, t, alpha=0.8, gamma=0.5, ignore_index=ignore_index)
    ours = focal_torch.sigmoid_focal_loss(x, t, gamma=0.5, alpha=0.8, where=keep, reduction="none")
    _close(ours, theirs, "float64", "none")
    total = focal_torch.sigmoid_focal_loss(x, t, gamma=0.5, alpha=0.8, where=keep, reduction="sum")
    _close(total / x.numel(), theirs.mean(), "float64", "kornia's mean")
    mean = focal_torch.sigmoid_focal_loss(x, t, gamma=0.5, alpha=0.8, where=keep, reduction="mean")
    _close(mean, theirs.sum() / keep.sum(), "float64", "our mean")


@pytest.mark.parametrize("wrt", ["input", "input+target"])
def test_kornia_binary_gradcheck(wrt):
    """gradcheck in float64 with alpha=0.25, gamma=2 and soft targets; kornia differentiates the target
    too, and so must we (every floating input gets its gradient)."""
    x, t = _kornia_binary_inputs(6, hard=False)
    x.requires_grad_()
    t.requires_grad_(wrt == "input+target")
    assert torch.autograd.gradcheck(
        lambda a, b: focal_torch.sigmoid_focal_loss(a, b, alpha=0.25, gamma=2.0, reduction="none"), (x, t))


def test_kornia_binary_gradcheck_ignore_index():
    x, t = _kornia_binary_inputs(7, hard=False)
    g = torch.Generator().manual_seed(7)
    t[torch.rand(t.shape, generator=g) > 0.8] = -100
    keep = t != -100
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a: focal_torch.sigmoid_focal_loss(a, t, alpha=0.25, gamma=2.0, where=keep, reduction="sum"), (x,))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kornia_binary_numeric_stability(dtype):
    """Logits ±100 with the right targets: loss 0, finite zero gradient."""
    x = torch.tensor([[100.0, -100.0]], dtype=TORCH_DTYPES[dtype], requires_grad=True)
    t = torch.tensor([[1.0, 0.0]])
    loss = focal_torch.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0, reduction="none")
    assert loss.abs().max() < 1e-40  # 0 to working precision (float64: about 4e-131)
    _close(loss, kornia_binary_focal(x.detach(), t, alpha=0.25, gamma=2.0), dtype)
    loss.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 1e-40


def _kornia_softmax_inputs(seed, spatial=True, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, 3, 2) if spatial else (4, 3)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 3, shape[:1] + shape[2:], generator=g)
    y[torch.rand(y.shape, generator=g) > 0.7] = ignore_index
    return x, y


def _kornia_weight(alpha, weight, c):
    """kornia's alpha (1-α for class 0, α for the others) and weight as our per-class weight."""
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight.double()
    return w if alpha is None else w * torch.tensor([1 - alpha] + [alpha] * (c - 1), dtype=torch.float64)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("spatial", [False, True], ids=["(N,C)", "(N,C,H,W)"])
@pytest.mark.parametrize("reduction", H.REDUCTIONS)
def test_kornia_softmax_migration(reduction, spatial, gamma, alpha, weighted):
    """kornia's reduction="none" is an (N, C, *) map with the loss at the label's class; ours is
    (N, *) as F.cross_entropy, equal to the map summed over dim 1. kornia's "sum" is our "sum" with
    weight = w·[1-α, α, ...]; its "mean" divides that by N·C·spatial, ignored positions included."""
    x, y = _kornia_softmax_inputs(8, spatial)
    w = torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64) if weighted else None
    theirs = kornia_softmax_focal(x, y, alpha, gamma, weight=w)
    kw = dict(gamma=gamma, weight=_kornia_weight(alpha, w, 3))
    if reduction == "none":
        ours = focal_torch.softmax_focal_loss(x, y, reduction="none", **kw)
        assert ours.shape == y.shape and theirs.shape == x.shape
        _close(ours, theirs.sum(1), "float64")
    elif reduction == "sum":
        _close(focal_torch.softmax_focal_loss(x, y, reduction="sum", **kw), theirs.sum(), "float64")
    else:
        _close(focal_torch.softmax_focal_loss(x, y, reduction="sum", **kw) / x.numel(), theirs.mean(), "float64")


@pytest.mark.parametrize("spatial", [False, True], ids=["(N,C)", "(N,C,H,W)"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("reduction", H.REDUCTIONS)
def test_kornia_softmax_ignored_extreme_logits(reduction, gamma, weighted, spatial):
    """The largest finite logits at an ignored position change nothing: same loss and gradient as
    zeros there, and the gradient there is exactly 0."""
    big = torch.finfo(torch.float32).max
    x = torch.tensor([[big, -big], [0.3, -0.2]])
    y = torch.tensor([-100, 0])
    if spatial:
        x, y = x.T.reshape(1, 2, 1, 2), y.reshape(1, 1, 2)
    safe = torch.where(torch.isfinite(x) & (x.abs() < 1e30), x, 0.0)
    kw = dict(gamma=gamma, reduction=reduction, weight=torch.tensor([0.5, 1.5]) if weighted else None)
    xa, xb = x.clone().requires_grad_(), safe.clone().requires_grad_()
    actual = focal_torch.softmax_focal_loss(xa, y, **kw)
    expected = focal_torch.softmax_focal_loss(xb, y, **kw)
    _close(actual, expected, "float32", "value")
    actual.sum().backward()
    expected.sum().backward()
    _close(xa.grad, xb.grad, "float32", "gradient")
    ignored = (y == -100).unsqueeze(1).expand_as(x)
    assert (xa.grad[ignored] == 0).all()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("ignore_index", [-100, 255])
def test_kornia_softmax_all_ignored_extreme_logits(ignore_index, reduction):
    """Every position ignored: 0 (kornia's sum; our mean too, where F.cross_entropy gives NaN) and a zero
    gradient."""
    big = torch.finfo(torch.float32).max
    x = torch.tensor([[big, -big]], requires_grad=True)
    y = torch.full((1,), ignore_index)
    loss = focal_torch.softmax_focal_loss(x, y, ignore_index=ignore_index, reduction=reduction)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, x)
    assert (grad == 0).all()


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_kornia_softmax_ignored_non_finite_logits(value):
    x = torch.tensor([[value, 0.0], [0.3, -0.2]], requires_grad=True)
    safe = torch.tensor([[0.0, 0.0], [0.3, -0.2]], requires_grad=True)
    y = torch.tensor([-100, 1])
    weight = torch.tensor([0.75, 0.25])  # kornia's alpha=0.25
    actual = focal_torch.softmax_focal_loss(x, y, weight=weight, reduction="sum")
    expected = focal_torch.softmax_focal_loss(safe, y, weight=weight, reduction="sum")
    _close(actual, expected, "float32")
    (grad,) = torch.autograd.grad(actual, x)
    (grad_safe,) = torch.autograd.grad(expected, safe)
    assert (grad[0] == 0).all()
    _close(grad, grad_safe, "float32")


def test_kornia_softmax_ignore_index_value():
    """Ignored positions give 0 and leave the others as they are: an extra class with logit -inf never
    changes a counted position's loss."""
    x, y = _kornia_softmax_inputs(9)
    ignored = y == -100
    ours = focal_torch.softmax_focal_loss(x, y, gamma=0.5, reduction="none")
    assert (ours[ignored] == 0).all()
    extra = torch.cat([x, torch.full((2, 1, 3, 2), -math.inf, dtype=x.dtype)], 1)
    plain = focal_torch.softmax_focal_loss(extra, torch.where(ignored, 0, y), gamma=0.5, reduction="none")
    _close(ours[~ignored], plain[~ignored], "float64")
    _close(ours, kornia_softmax_focal(x, y, None, 0.5).sum(1), "float64")


def test_kornia_softmax_gradcheck():
    x, y = _kornia_softmax_inputs(10)
    x.requires_grad_()
    w = _kornia_weight(0.25, None, 3)
    assert torch.autograd.gradcheck(lambda a: focal_torch.softmax_focal_loss(a, y, gamma=2.0, weight=w,
                                                                            reduction="sum"), (x,))


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_kornia_module_is_functional(loss):
    if loss == "sigmoid":
        x, t = _kornia_binary_inputs(11, hard=False)
        module = focal_torch.SigmoidFocalLoss(gamma=2.0, alpha=0.25)
        expected = focal_torch.sigmoid_focal_loss(x, t, gamma=2.0, alpha=0.25)
    else:
        x, t = _kornia_softmax_inputs(11, spatial=False)
        w = _kornia_weight(0.25, None, 3)
        module = focal_torch.SoftmaxFocalLoss(gamma=2.0, weight=w)
        expected = focal_torch.softmax_focal_loss(x, t, gamma=2.0, weight=w)
    assert torch.equal(module(x, t), expected)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax-ignored-extreme"])
def test_kornia_dynamo(loss):
    """torch.compile(fullgraph=True) gives the eager numbers (value and gradient)."""
    if loss == "sigmoid":
        x, t = _kornia_binary_inputs(12, hard=False)

        def fn(a, b):
            return focal_torch.sigmoid_focal_loss(a, b, alpha=0.25, gamma=2.0, reduction="none")
    else:
        big = torch.finfo(torch.float64).max
        x, t = torch.tensor([[big, -big], [0.5, -0.5]], dtype=torch.float64), torch.tensor([-100, 1])

        def fn(a, b):
            return focal_torch.softmax_focal_loss(a, b, gamma=2.0, reduction="sum")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled, eager = _compile(fn)(xa, t), fn(xb, t)
    _close(compiled, eager, "float64", "value")
    compiled.sum().backward()
    eager.sum().backward()
    assert torch.isfinite(xa.grad).all()
    _close(xa.grad, xb.grad, "float64", "gradient")


# ----------------------------------------------------------------------------------------
# MONAI: FocalLoss.
# ----------------------------------------------------------------------------------------


def _monai_published_input():
    """The (1, 3, 2, 2) input of MONAI's value table, each channel [[1, 1], [0.5, 0]], with labels
    [[0, 1], [2, 0]] given as (1, 1, 2, 2)."""
    x = torch.tensor([[1.0, 1.0], [0.5, 0.0]]).expand(1, 3, 2, 2).clone()
    return x, torch.tensor([[[[0, 1], [2, 0]]]])


# MONAI's published FocalLoss(to_onehot_y=True, **options) values on that input (mean reduction).
MONAI_PUBLISHED = [
    (dict(), 0.34959),
    (dict(include_background=False), 0.36498),
    (dict(alpha=0.8), 0.08423),
    (dict(use_softmax=True), 0.16276),
    (dict(use_softmax=True, alpha=0.8), 0.08138),
]


def _opts_id(o):
    return "-".join(f"{k}={v}" for k, v in o.items()) or "defaults"


@pytest.mark.parametrize(("options", "value"), MONAI_PUBLISHED, ids=[_opts_id(o) for o, _ in MONAI_PUBLISHED])
def test_monai_formula_gives_published_values(options, value):
    """The MONAI formula above reproduces MONAI's published numbers (to their 1e-4)."""
    x, y = _monai_published_input()
    np.testing.assert_allclose(monai_focal(x, y, **options).item(), value, rtol=1e-4, atol=1e-4)


def ours_as_monai(x, y, *, use_softmax=False, gamma=2.0, alpha=None, weight=None, include_background=True,
                  reduction="mean"):
    """monai FocalLoss(to_onehot_y=True, ...)(x, y[:, None]) through the migration guide's row."""
    onehot = F.one_hot(y, x.shape[1]).movedim(-1, 1).to(x.dtype)
    labels = y
    if not include_background:  # MONAI drops channel 0 before the softmax
        x, onehot, labels = x[:, 1:], onehot[:, 1:], torch.where(y == 0, -100, y - 1)
    c = x.shape[1]
    w = None if weight is None else torch.as_tensor(weight, dtype=x.dtype)
    # MONAI's "sum" is a sum of spatial means: our sum over the spatial size (over everything for (B, C)).
    denom = {"none": 1, "sum": x.numel() if x.ndim == 2 else math.prod(x.shape[2:]), "mean": x.numel()}[reduction]
    if use_softmax:
        cw = torch.ones(c, dtype=x.dtype) if w is None else w
        if alpha is not None:
            cw = cw * torch.tensor([1 - alpha] + [alpha] * (c - 1), dtype=x.dtype)
        out = focal_torch.softmax_focal_loss(x, labels, gamma=gamma, weight=cw,
                                             reduction="none" if reduction == "none" else "sum")
        return out / denom
    w = None if w is None else w.view((-1,) + (1,) * (x.ndim - 2))
    out = focal_torch.sigmoid_focal_loss(x, onehot, gamma=gamma, alpha=alpha, weight=w,
                                         reduction="none" if reduction == "none" else "sum")
    return out / denom


@pytest.mark.parametrize(("options", "value"), MONAI_PUBLISHED, ids=[_opts_id(o) for o, _ in MONAI_PUBLISHED])
def test_monai_published_values_through_migration(options, value):
    x, y = _monai_published_input()
    ours = ours_as_monai(x, y[:, 0], **options)
    np.testing.assert_allclose(ours.item(), value, rtol=1e-4, atol=1e-4)
    _close(ours, monai_focal(x, y, **options), "float32")


MONAI_GRID = [
    dict(use_softmax=s, alpha=a, weight=w, include_background=b, reduction=r)
    for s in (False, True) for a in (None, 0.8) for w in (None, (0.5, 0.1, 0.2, 1.0)) for b in (True, False)
    for r in H.REDUCTIONS
    if not (s and a is not None and not b)  # MONAI drops alpha (with a warning) there
]


@pytest.mark.parametrize("options", MONAI_GRID, ids=_opts_id)
def test_monai_migration(options):
    """Every reduction, alpha, class weight and include_background, for the sigmoid and the softmax form.
    MONAI's "none" softmax map is (B, C, *) with the loss at the label; ours is (B, *), its sum over dim 1."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 4, (2, 3, 5), generator=g)
    w = options["weight"]
    if w is not None and not options["include_background"]:
        options = dict(options, weight=w[1:])
    ours = ours_as_monai(x, y, **options)
    theirs = monai_focal(x, y[:, None], **options)
    if options["reduction"] == "none" and options["use_softmax"]:
        theirs = theirs.sum(1)
    assert ours.shape == theirs.shape
    _close(ours, theirs, "float64")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_monai_classification_sum_is_a_mean(reduction):
    """With (B, C) logits MONAI's "sum" averages the spatial dims first, and torch's mean over no dims
    averages everything: its "sum" is then our "mean"."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (16,), generator=g)
    ours = ours_as_monai(x, y, reduction=reduction)
    _close(ours, focal_torch.sigmoid_focal_loss(x, F.one_hot(y, 5).double(), reduction="mean"), "float64")
    _close(ours, monai_focal(x, y[:, None], reduction=reduction), "float64")


@pytest.mark.parametrize("layout", ["multi-label-2d", "one-hot-2d", "classification"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_monai_gamma0_is_bce(layout, reduction):
    """gamma=0 is BCEWithLogitsLoss on the one-hot (or 0/1 multi-label) target, in value and gradient."""
    g = torch.Generator().manual_seed(15)
    shape = (8, 10) if layout == "classification" else (8, 10, 8, 4)
    x = torch.rand(shape, generator=g)
    if layout == "multi-label-2d":
        t = torch.randint(0, 2, shape, generator=g).float()
    else:
        t = F.one_hot(torch.randint(0, 10, shape[:1] + shape[2:], generator=g), 10).movedim(-1, 1).float()
    xa = x.clone().requires_grad_()
    ours = focal_torch.sigmoid_focal_loss(xa, t, gamma=0.0, weight=torch.ones(()), reduction=reduction)
    _close(ours, F.binary_cross_entropy_with_logits(x.double(), t.double(), reduction=reduction), "float32", "value")
    ours.sum().backward()
    _close(xa.grad, bce64_grad(x, t) / (x.numel() if reduction == "mean" else 1), "float32", "gradient")


def test_monai_small_gamma_differs_from_bce():
    """gamma=0.1 is not the cross-entropy: it is MONAI's loss (equal to ours for one-hot targets)."""
    g = torch.Generator().manual_seed(16)
    x = torch.rand(64, 10, generator=g, dtype=torch.float64)
    t = F.one_hot(torch.randint(0, 10, (64,), generator=g), 10).double()
    ours = focal_torch.sigmoid_focal_loss(x, t, gamma=0.1)
    assert abs(ours.item() - F.binary_cross_entropy_with_logits(x, t).item()) > 1e-3
    _close(ours, monai_sigmoid_map(x, t, gamma=0.1).mean(), "float64")


def _monai_segmentation(case):
    rows = {"bin_seg_2d": [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]],
            "empty_class_2d": [[0] * 4] * 4,
            "multi_class_2d": [[0, 0, 0, 0], [0, 1, 2, 0], [0, 3, 4, 0], [0, 0, 0, 0]]}
    if case == "bin_seg_3d":
        return torch.tensor([rows["bin_seg_2d"]] * 3)[None], 2, 1000.0
    c = {"bin_seg_2d": 2, "empty_class_2d": 2, "multi_class_2d": 6}[case]
    return torch.tensor(rows[case])[None], c, 100.0 if case == "bin_seg_2d" else 1000.0


@pytest.mark.parametrize("alpha", [None, 0.5])
@pytest.mark.parametrize("use_softmax", [False, True], ids=["sigmoid", "softmax"])
@pytest.mark.parametrize("case", ["bin_seg_2d", "empty_class_2d", "multi_class_2d", "bin_seg_3d"])
def test_monai_very_good_prediction_is_near_zero(case, use_softmax, alpha):
    """Logits ±scale/2 at the right class give a loss that is 0 to float32 precision, with a finite
    gradient, given as integer labels or as a one-hot target."""
    y, c, scale = _monai_segmentation(case)
    onehot = F.one_hot(y, c).movedim(-1, 1).float()
    x = (scale * onehot - scale / 2).requires_grad_()
    if use_softmax:
        w = None if alpha is None else torch.tensor([1 - alpha] + [alpha] * (c - 1), dtype=x.dtype)
        losses = [focal_torch.softmax_focal_loss(x, y, weight=w), focal_torch.softmax_focal_loss(x, onehot, weight=w)]
    else:
        losses = [focal_torch.sigmoid_focal_loss(x, onehot, alpha=alpha)]
    for loss in losses:
        assert 0.0 <= loss.item() < 1e-6
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(grad).all() and grad.abs().max() < 1e-6


def test_monai_foreground():
    """One foreground pixel on a (1, 2, 5, 5) map: MONAI's 0.1116 with the background channel and
    0.1733 without it (their 3 decimals); ours drops channel 0 by slicing."""
    x = torch.cat([torch.ones(1, 1, 5, 5), torch.zeros(1, 1, 5, 5)], 1)
    t = x.clone()
    t[:, 0, 2, 2], t[:, 1, 2, 2] = 0, 1
    both = focal_torch.sigmoid_focal_loss(x, t)
    fg = focal_torch.sigmoid_focal_loss(x[:, 1:], t[:, 1:])
    _close(both, monai_focal(x, t), "float32")
    _close(fg, monai_focal(x, t, include_background=False), "float32")
    assert round(both.item(), 3) == 0.112 and round(fg.item(), 3) == 0.173


def test_monai_bad_options_raise():
    """An unknown reduction, a target shape that does not broadcast to the logits, and a class weight of
    the wrong length raise ValueError. (MONAI also rejects a target that only broadcasts, such as (1, 3)
    for (1, 2, 3) logits, and negative weights; ours broadcasts targets and accepts negative weights, as
    F.cross_entropy does.)"""
    x = torch.ones(1, 2, 3)
    with pytest.raises(ValueError, match="reduction"):
        focal_torch.sigmoid_focal_loss(x, torch.ones(1, 2, 3), reduction="unknown")
    with pytest.raises(ValueError, match="target"):
        focal_torch.sigmoid_focal_loss(x, torch.ones(1, 4))
    x4 = torch.ones(1, 4, 3, 3)
    with pytest.raises(ValueError, match="weight"):
        focal_torch.sigmoid_focal_loss(x4, torch.ones(1, 4, 3, 3), weight=torch.ones(3, 1, 1))
    with pytest.raises(ValueError, match="weight"):
        focal_torch.softmax_focal_loss(x4, torch.zeros(1, 3, 3, dtype=torch.long), weight=torch.ones(3))


# ----------------------------------------------------------------------------------------
# optax: SigmoidFocalLossTest, for focal_jax. Options are passed either as Python numbers closed
# over by jit ("static") or as jit arguments ("traced"), as optax's tests do with jax.jit(loss)(...).
# ----------------------------------------------------------------------------------------

OPTAX_MODES = ["static", "traced"]


def _jax_loss(mode):
    import jax

    import focal_jax

    if mode == "traced":
        return jax.jit(functools.partial(focal_jax.sigmoid_focal_loss, reduction="none"))

    def static(x, t, **options):
        return jax.jit(lambda a, b: focal_jax.sigmoid_focal_loss(a, b, reduction="none", **options))(x, t)
    return static


def _optax_inputs():
    x = np.array([[1.5, 0.2, -2.5], [0.4, -0.3, 2.0]], np.float32)
    t = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]], np.float32)
    return x, t


def _np_bce(x, t):
    x = np.asarray(x, np.float64)
    return np.logaddexp(0.0, x) - t * x


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


@pytest.mark.parametrize("mode", OPTAX_MODES)
def test_optax_focal_equals_ce(mode):
    import optax

    x, t = _optax_inputs()
    ours = _jax_loss(mode)(x, t, gamma=0.0)
    _close(ours, _np_bce(x, t), "float32")
    _close(ours, np.asarray(optax.sigmoid_binary_cross_entropy(x, t)), "float32")


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("mode", OPTAX_MODES)
def test_optax_migration_row(mode, alpha, soft):
    """optax.sigmoid_focal_loss(x, t, alpha=a, gamma=g) is ours with reduction="none" (the same linear
    1-p_t, so soft targets agree too)."""
    import optax

    rng = np.random.default_rng(17)
    x = rng.normal(scale=3.0, size=(6, 4)).astype(np.float32)
    t = (rng.uniform(size=(6, 4)) if soft else rng.uniform(size=(6, 4)) < 0.3).astype(np.float32)
    ours = _jax_loss(mode)(x, t, gamma=2.0, alpha=alpha)
    theirs = np.asarray(optax.sigmoid_focal_loss(x, t, alpha=alpha, gamma=2.0), np.float64)
    _close(ours, theirs, "float32", "optax's own (float32, as ours)", scale=2 * np.abs(theirs))
    expected, _ = reference.sigmoid_focal_loss(x, t, gamma=2.0, alpha=alpha, reduction="none")
    _close(ours, expected, "float32")


@pytest.mark.parametrize("mode", OPTAX_MODES)
def test_optax_scale(mode):
    """FL / CE = (1 - p_t)^γ, which catches a wrong p_t."""
    x, t = _optax_inputs()
    ours = np.asarray(_jax_loss(mode)(x, t, gamma=2.0), np.float64)
    p = _np_sigmoid(x)
    _close(ours / _np_bce(x, t), (1 - (p * t + (1 - p) * (1 - t))) ** 2, "float32")


@pytest.mark.parametrize("size", ["large", "small"])
@pytest.mark.parametrize("mode", OPTAX_MODES)
def test_optax_logit_fl_less_than_ce(mode, size):
    """Positives at confident (large) and wrong (small) logits: CE / FL = 1/(α (1-σ)^γ), with α = 0.5
    for the large ones and no alpha for the small ones."""
    probs = [0.85, 0.97, 0.4, 0.995] if size == "large" else [0.05, 0.03, 0.12, 0.2]
    p = np.array(probs)
    x = np.log(p / (1 - p)).astype(np.float32)
    t = np.ones(4, np.float32)
    alpha = 0.5 if size == "large" else None
    ours = np.asarray(_jax_loss(mode)(x, t, gamma=2.0, alpha=alpha), np.float64)
    assert (ours < _np_bce(x, t)).all()
    _close(_np_bce(x, t) / ours, 1.0 / ((0.5 if alpha else 1.0) * (1 - _np_sigmoid(x)) ** 2), "float32")


@pytest.mark.parametrize("mode", OPTAX_MODES)
def test_optax_alpha_one(mode):
    x, t = _optax_inputs()
    ours = _jax_loss(mode)(x, t, gamma=0.0, alpha=1.0)
    _close(ours, _np_bce(x, t) * t, "float32")


@pytest.mark.parametrize("keep", ["negatives", "positives"])
@pytest.mark.parametrize("mode", OPTAX_MODES)
def test_optax_alpha_ignores_one_side(mode, keep):
    """alpha=0 makes positives contribute exactly 0, alpha=1 negatives."""
    x, t = _optax_inputs()
    ours = np.asarray(_jax_loss(mode)(x, t, gamma=2.0, alpha=0.0 if keep == "negatives" else 1.0))
    dropped = t == (1.0 if keep == "negatives" else 0.0)
    assert (_np_bce(x, t)[dropped] > 0).all()
    assert (ours[dropped] == 0).all() and (ours[~dropped] > 0).all()


@pytest.mark.parametrize("mode", OPTAX_MODES)
def test_optax_extreme_logits_finite_gradients(mode):
    """gamma=0.5 and soft labels at logits ±50, ±75, ±100: finite value, gradient and Hessian, and the
    gradient is the float64 reference's."""
    import jax

    x = np.array([100.0, -100.0, 75.0, -75.0, 50.0, -50.0], np.float32)
    t = np.array([0.9, 0.1, 0.8, 0.2, 1.0, 0.0], np.float32)
    loss = _jax_loss(mode)

    def total(z):
        return loss(z, t, gamma=0.5).sum()

    value, grad = jax.value_and_grad(total)(x)
    hess = jax.hessian(total)(x)
    assert np.isfinite(value) and np.isfinite(grad).all() and np.isfinite(hess).all()
    ref_value, ref_grad = reference.sigmoid_focal_loss(x, t, gamma=0.5, reduction="sum")
    _close(value, ref_value, "float32", "value")
    _close(grad, ref_grad, "float32", "gradient")
