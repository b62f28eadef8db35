"""Softmax focal loss (multi-class): torch's own softmax kernel for integer labels, and a formula of
plain differentiable operations, which autograd and every ``torch.func`` transform differentiate, for the rest."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, NamedTuple, cast

import torch

import focal_spec
from focal_torch import _common as C
from focal_torch import _distributed


class _Opts(NamedTuple):
    dim: int
    num_classes: int
    reduction: str
    cdtype: torch.dtype
    gamma: float | None  # a known number (the kernels specialise on it), else None: see ``_Plain.gamma``
    gamma_int: int | None  # whole γ up to 8: multiplications only


def _no_autocast(device: torch.device) -> Any:
    """``C.no_autocast``, entered only where autocast is on (entering costs as much as a small kernel)."""
    if device.type in ("cpu", "cuda") and not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return C.no_autocast(device)


# ----------------------------------------------------------------------------------------
# Per-position terms of the integer-label loss. With lp = log p_y and u = 1 - p_y (both
# accurate), ℓ = -m lp with m = u^γ, and dℓ/dx_k = κ (δ_ky - p_k) with κ = m (γ p ρ - 1),
# ρ = log p / (1 - p) (which tends to -1 as p -> 1).
# ----------------------------------------------------------------------------------------


def _modulator(u: torch.Tensor, o: _Opts, gamma: Any = None) -> torch.Tensor | float:
    """(1-p)^γ. ``o`` selects the code (γ zero, whole, other); ``gamma``, where given, is γ's value."""
    if o.gamma == 0.0:
        return 1.0
    if o.gamma_int is not None:
        return C.ipow(u, o.gamma_int, inplace=False)
    # u = 0: exp(-inf) = 0 (γ > 0 here); without ``gamma``, ``o.gamma`` is a number (the kernels' γ is known)
    return torch.exp(torch.log(u) * (cast(float, o.gamma) if gamma is None else gamma))


def _kappa(lpy: torch.Tensor, u: torch.Tensor, o: _Opts, gamma: Any = None,
           p: torch.Tensor | None = None) -> torch.Tensor | float:
    """dℓ/d(log p_y) = κ = -m + γ p log p (1-p)^(γ-1), finite for every p (also 1-p = 0). ``p`` is p_y where the
    caller has it (else exp(log p_y))."""
    if o.gamma == 0.0:
        return -1.0
    if p is None:
        p = torch.exp(lpy)
    n = o.gamma_int
    if n is not None:
        if n == 1:
            return (p * lpy).sub_(u)
        return C.ipow(u, n - 1, inplace=False) * (p * lpy * float(n) - u)
    m = _modulator(u, o, gamma)
    pos = u > 0
    rho = torch.where(pos, lpy / torch.where(pos, u, 1.0), -1.0)
    return (p * rho * (cast(float, o.gamma) if gamma is None else gamma) - 1.0) * m


def _host_select(t: torch.Tensor) -> bool:
    """Whether data-dependent selection (counting, boolean indexing) is free for ``t``: the CPU only.
    On an accelerator it would sync, so there the whole-tensor form runs instead."""
    return t.is_cpu


SMALL_POSITIONS = 4096
"""Below this many positions the CPU forms log p_y as -log1p((1 - p_y) / p_y), two calls, where a call costs more
than its arithmetic; at and above it, with vectorised kernels only (ATen's ``log1p`` is a scalar loop on the CPU).
Also the size from which the label's entry is cleared from a tensor source (faster there than a number)."""


def _log_p_where_underflowed(x: torch.Tensor, lq: torch.Tensor, py: torch.Tensor, yk: torch.Tensor,
                             d: int) -> torch.Tensor:
    """``lq`` (-log p_y) with -log p_y recomputed from the logits (logsumexp x - x_y, in float64) at the positions
    whose p_y is below the compute dtype's smallest normal number, where p_y has lost its digits (CPU: such
    positions are found and only their rows are read)."""
    tiny = torch.finfo(py.dtype).tiny
    if not py.numel() or float(py.amin()) >= tiny:  # one read (a NaN p_y, of a row not counted, reads on)
        return lq
    low = py < tiny
    if not bool(low.any()):
        return lq
    if x.dim() == 1:  # one position: give it a dim, so that positions can be indexed
        return _log_p_where_underflowed(x.unsqueeze(0), lq.unsqueeze(0), py.unsqueeze(0), yk.unsqueeze(0),
                                        d + 1).squeeze(0)
    sel = low.squeeze(d).nonzero(as_tuple=True)
    rows = x.movedim(d, -1)[sel].to(torch.float64)  # (K, C)
    exact = torch.logsumexp(rows, 1) - rows.gather(1, yk.squeeze(d)[sel].unsqueeze(1)).squeeze(1)
    lq = lq.clone()
    lq.squeeze(d).index_put_(sel, exact.to(lq.dtype))
    return lq


def _is_one(v: Any) -> bool:
    """Whether ``v`` is the number 1 (a factor to leave out)."""
    return not isinstance(v, torch.Tensor) and v == 1.0


@functools.lru_cache(maxsize=64)
def _number_tensor(v: float, dtype: torch.dtype) -> torch.Tensor:
    """``v`` as a 0-d CPU tensor of ``dtype``, never written to: an operand that no op has to convert (a Python
    float is wrapped as a float64 tensor and copied to the other operand's dtype at every op)."""
    return torch.tensor(v, dtype=dtype)


def _terms(q: torch.Tensor, u: torch.Tensor, py: torch.Tensor, o: _Opts, sv: Any,
           want_grad: bool) -> tuple[torch.Tensor, Any]:
    """Per position, from q = -log p_y and u = 1 - p_y: ℓ = m q (m = u^γ) and a = -κ (dℓ/dx = a p_k off the label,
    -a (1 - p_y) at it; a number where it is one), each times ``sv`` (the mean's factor, or 1)."""
    n = o.gamma_int
    s: Any = sv  # None: 1
    if type(sv) is float:
        s = None if sv == 1.0 else sv if C.is_compiling() else _number_tensor(sv, q.dtype)
    a: Any = 1.0 if s is None else s
    if o.gamma == 0.0:
        f = q if s is None else q * s
    elif n is not None:
        m1 = None if n == 1 else u if n == 2 else C.ipow(u, n - 1, inplace=False)  # u^(n-1)
        k = s if m1 is None else (m1 if s is None else m1 * s)  # None: 1
        f = q * u
        if k is not None:
            f = f.mul_(k)
        if want_grad:  # -κ = u^(n-1) (u + n p q)
            a = torch.addcmul(u, py, q, value=float(n))
            a = a if k is None else a.mul_(k)
    else:
        f = q * _modulator(u, o)
        if s is not None:
            f = f.mul_(s)
        if want_grad:  # a tensor for a fractional γ
            a = cast(torch.Tensor, _kappa(torch.neg(q), u, o, p=py)).mul_(-1.0 if s is None else -s)
    return f, a


def _fused(x, ys, yk, weight, scale, o: _Opts, all_counted: bool,
           want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reduced loss (in ``x``'s dtype) and, where ``want_grad``, dℓ/dx of it, formed together from one softmax.

    With p = softmax(x) (on the CPU torch's softmax; elsewhere exp of the log-softmax, whose log p_y needs no
    reading of values): 1 - p_y = Σ_{k≠y} p_k, a sum of non-negative terms, accurate at every margin, and
    q = -log p_y from it (see below), accurate at every margin too; dℓ/dx_k = κ (δ_ky - p_k), which overwrites p in
    place: -κ p_k off the label, κ (1 - p_y) at it. Positions not counted (label -1 in ``ys``) give 0 and a zero
    gradient, whatever their logits hold. The labels are gathered before anything else is written: a label
    outside [0, C) raises torch's RuntimeError here (CPU), with nothing changed."""
    d = o.dim
    xc = x if x.dtype == o.cdtype else x.to(o.cdtype)
    host = _host_select(x)
    if host:
        p = torch.softmax(xc, d)
        py = p.gather(d, yk)
    else:
        lp = torch.log_softmax(xc, d)
        lpy_small = lp.gather(d, yk)
        p = lp.exp_()
        py = torch.exp(lpy_small)
    small = py.numel() < SMALL_POSITIONS
    u = p.scatter_(d, yk, 0.0 if small else torch.zeros_like(py)).sum(d, keepdim=True)  # 1 - p_y
    nu = torch.neg(u)  # the gradient's label entry is -a (1 - p_y)
    sv = scale if o.reduction == "mean" else 1.0
    # A reduced loss of few positions (CPU, no weight or ignored label) is its own check: see below
    lazy = host and small and o.reduction != "none" and weight is None and all_counted and not C.is_compiling()
    if host and small:  # q = log1p((1 - p_y) / p_y): both accurate where p_y is normal, so the ratio and q are;
        # where p_y is subnormal, q has an absolute error of at most ulp(p_y) / p_y while the ratio is finite
        # (< 5e-7 (float32), 9e-16 (float64), on a q above 87 or 708), and is inf beyond (p_y = 0 included)
        q = torch.div(u, py).log1p_()
        if not lazy:
            q = _log_p_where_underflowed(x, q, py, yk, d)
    elif host:  # q = -log1p(-u) as -u log(p_y) / (1 - p_y): 1 - p_y is exact where p_y >= 1/2, and the ratio
        # restores the digits of u that p_y has lost; 0/0 at p_y = 1
        q = torch.log(py).div_(torch.rsub(py, 1.0)).nan_to_num_(nan=-1.0, neginf=-math.inf).mul_(nu)
        q = _log_p_where_underflowed(x, q, py, yk, d)
    else:
        q = torch.where(py > 0.5, torch.log1p(nu), lpy_small).neg_()
    f, a = _terms(q, u, py, o, sv, want_grad)
    if weight is not None:
        wy = weight[yk]
        f = f * wy
        a = a * wy
    counted = None if all_counted else (ys >= 0).unsqueeze(d)
    if counted is not None:
        f = torch.where(counted, f, 0.0)
    loss = f.squeeze(d) if o.reduction == "none" else f.sum()
    if lazy and not math.isfinite(float(loss)):  # an infinite q (or a NaN logit): recomputed where p_y is subnormal
        q1 = _log_p_where_underflowed(x, q, py, yk, d)
        if q1 is not q:
            f, a = _terms(q1, u, py, o, sv, want_grad)
            loss = f.sum()
    loss = loss if loss.dtype == x.dtype else loss.to(x.dtype)
    if not want_grad:
        return loss, None
    if counted is not None:
        a = torch.where(counted, a if isinstance(a, torch.Tensor) else torch.full_like(u, a), 0.0)
    grad = p.scatter_(d, yk, nu)
    if not _is_one(a):
        grad = grad.mul_(a)
    # Positions not counted may hold NaN/inf logits, whose softmax rows are NaN: their gradient must be cleared,
    # which costs a pass. On the CPU whether any does is free to find out.
    if counted is not None and (not host or bool((~counted & ~torch.isfinite(py)).any())):
        grad = torch.where(counted, grad, 0.0)
    return loss, grad


class _IndexFocal(torch.autograd.Function):
    """Integer labels, no smoothing, a known γ, gradient for the logits only.

    Forward: :func:`_fused`, one softmax and one in-place pass that turns it into dℓ/dx, which is kept (the
    logits' size, as ``F.cross_entropy`` keeps its log-probabilities) for a backward of at most one
    multiplication. Double backward runs the smooth formula on the logits, which are held by a weak reference
    (they are alive wherever a double backward is asked for).
    """

    @staticmethod
    def forward(ctx, x, args):
        # args: (ys, yk, weight, scale, o, all_counted), none differentiated here; autocast is off (the callers)
        want = ctx.needs_input_grad[0]
        loss, grad = _fused(x, *args, want)
        if want:
            # The labels and weights are read only to recompute: plain attributes
            ctx.args, ctx.x_dtype = args, x.dtype
            C.hold_logits(ctx, x)
            ctx.kept = grad  # C.keep: handed over by a backward that may (C.hand_over)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        ys, yk, weight, scale, o, all_counted = ctx.args
        x_dtype = ctx.x_dtype
        if torch.is_grad_enabled():
            return _index_double_backward(ctx, grad_out), None
        kept = ctx.kept
        if kept is not None and o.reduction != "none" and C.hand_over(ctx, kept, grad_out, x_dtype):
            return kept, None  # loss.backward(): the gradient (the mean's 1/n in it)
        if kept is None:  # handed over to an earlier backward of a retained graph: recomputed
            x = C.held_logits(ctx, "softmax_focal_loss")
            with _no_autocast(x.device):
                kept = _fused(x, ys, yk, weight, scale, o, all_counted, True)[1]
        go = grad_out if grad_out.dtype == kept.dtype else grad_out.to(kept.dtype)
        if o.reduction == "none":
            go = go.unsqueeze(o.dim)
        g = kept * go
        return (g if g.dtype == x_dtype else g.to(x_dtype)), None


_apply_plain = _IndexFocal.apply

def _index_double_backward(ctx, grad_out):
    """The logits' gradient as a differentiable function of the logits and of ``grad_out``."""
    x = C.held_logits(ctx, "softmax_focal_loss")
    ys, _, weight, scale, o, all_counted = ctx.args
    x_dtype = ctx.x_dtype
    counted = ys >= 0
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_()
        plain = _Plain(labels=ys.clamp(min=0), probs=None, weight=weight, gamma=o.gamma, eps=0.0,
                       valid=None if all_counted else counted, bad=None)
        loss = _plain_loss(xg, plain, o)
        go = grad_out.to(o.cdtype)
        if o.reduction == "mean":
            go = go * scale
        go = go.expand(loss.shape) if o.reduction != "none" else go
        (grad,) = torch.autograd.grad(loss, xg, go, create_graph=True)
    return grad.to(x_dtype)


# ----------------------------------------------------------------------------------------
# The smooth formula: plain differentiable ops, used for probability labels, label smoothing,
# tensor γ, gradients for inputs other than the logits, torch.compile, torch.func transforms,
# forward-mode AD, the meta device and the double backward of the kernels above.
#
# With e_k = exp(x_k - M) and S = Σ e_k, 1 - p_c = (Σ_{k≠c} e_k) / S, where the sum of the others
# is S - e_c for every class but the arg-max (it is at least e_max = 1 there, so no digit is lost)
# and is summed with the arg-max left out for that one. log p_c = log1p(-(1 - p_c)) where p_c > 1/2,
# else x_c - M - log S. The modulator (1-p)^γ is a product for a whole γ, else exp(γ log(1-p)) with
# 1-p floored at the dtype's tiny: value, gradient and Hessian stay finite and accurate at any margin.
# ----------------------------------------------------------------------------------------


class _Plain(NamedTuple):
    labels: torch.Tensor | None  # integer labels >= 0 (positions' shape), or None
    probs: torch.Tensor | None  # class probabilities (the logits' shape), or None
    weight: torch.Tensor | None  # (C,)
    gamma: Any  # a float, a tensor of shape () or (C,), or a symbolic number
    eps: Any  # label smoothing: a float or a 0-d tensor
    valid: torch.Tensor | None  # counted positions (positions' shape), or None for all
    bad: torch.Tensor | None  # positions whose loss is NaN (an out-of-range label), or None
    poly1: float = 0.0  # Poly-1's ε₁: ε₁ (1-p_c)^(γ+1) = ε₁ m u is added to each class's term


def _class_view(v: torch.Tensor, ndim: int, d: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[d] = -1
    return v.reshape(shape)


def _smooth_modulator(u: torch.Tensor, p: torch.Tensor, gamma: Any, o: _Opts) -> torch.Tensor | float:
    """(1-p)^γ from u = 1-p and p: multiplications for a whole γ; otherwise exp(γ · log u), log u floored at
    log(tiny): finite with finite derivatives (also in γ) where u underflows, and exactly 1 at γ = 0 (no 0^0).
    Where p < 1/2, log u is log1p(-p): it keeps the digits of a small p, which dℓ/dγ = ℓ log(1 - p) reads (log of the
    rounded 1 - p keeps only those above the rounding of 1)."""
    if o.gamma is not None:
        if o.gamma == 0.0:
            return 1.0
        if o.gamma_int is not None:
            return C.ipow(u, o.gamma_int, inplace=False)
        gamma = o.gamma
    small = p < 0.5
    log_u = torch.where(small, torch.log1p(-torch.where(small, p, 0.0)),
                        torch.log(u.clamp(min=torch.finfo(u.dtype).tiny)))
    return torch.exp(gamma * log_u)


def _one_minus_p_and_log_p(z: torch.Tensor, log_s: torch.Tensor, rest: torch.Tensor, s: torch.Tensor):
    """(1 - p, log p, p) with accurate values and derivatives, from z = x - M, log S and the sum of the
    other classes' e^z. Where p < 1/2: 1 - p and z - log S (the derivative of 1 - p is -dp, not the
    difference of two near-equal terms). Where p >= 1/2: rest / S and log1p(-(rest / S))."""
    lp_direct = z - log_s
    p = torch.exp(lp_direct)
    small = p < 0.5
    u = torch.where(small, 1.0 - p, rest / s)
    return u, torch.where(small, lp_direct, torch.log1p(-torch.where(small, 0.0, u))), p


def _plain_loss(x: torch.Tensor, p: _Plain, o: _Opts) -> torch.Tensor:
    """Per-position loss (positions' shape, compute dtype), as differentiable ops."""
    d = o.dim
    xs = x.to(o.cdtype)
    vk = None if p.valid is None else p.valid.unsqueeze(d)
    if vk is not None:
        xs = torch.where(vk, xs, 0.0)
    nc = o.num_classes
    gamma = p.gamma
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.to(o.cdtype)
        if gamma.dim() == 1:
            gamma = _class_view(gamma, xs.dim(), d)
    if nc <= 1:  # p = 1 (or no class at all): the loss is 0, with zero gradients
        loss = torch.where(torch.zeros((), dtype=torch.bool, device=xs.device), xs, 0.0).sum(d)
    else:
        index = p.labels is not None and isinstance(p.eps, float) and p.eps == 0.0
        # With class indices the max is differentiated (the same value): a second derivative then sees the leading
        # class's e = exp(x - M) = 1 as a constant and S's derivative as a sum over the other classes, without the
        # cancellation p_k - p_k² where a class other than the label dominates. (Over every class, with smoothing
        # or probabilities, its backward would cost a third more of the whole backward; it stays a constant there.)
        mx = xs.amax(d, keepdim=True) if index else xs.detach().amax(d, keepdim=True)
        z = xs - torch.where(torch.isfinite(mx), mx, 0.0)
        e = torch.exp(z)
        if index and p.labels is not None:
            yk = p.labels.long().unsqueeze(d)
            rest = e.scatter(d, yk, 0.0).sum(d, keepdim=True)  # Σ_{k≠y} e_k, summed without e_y
            zy = z.gather(d, yk)
            s = rest + torch.exp(zy)
            u, lp, pk = _one_minus_p_and_log_p(zy, torch.log(s), rest, s)
            if isinstance(gamma, torch.Tensor) and gamma.dim() > 0:
                gamma = gamma.expand(xs.shape).gather(d, yk)
            term = _smooth_modulator(u, pk, gamma, o) * (lp if not p.poly1 else lp - p.poly1 * u)
            if p.weight is not None:
                term = term * p.weight.to(o.cdtype)[yk]
            loss = term.neg().squeeze(d)
        else:
            idx = xs.detach().argmax(d, keepdim=True)
            is_max = torch.zeros(xs.shape, dtype=torch.bool, device=xs.device).scatter(d, idx, True)
            s = e.sum(d, keepdim=True)
            rest = torch.where(is_max, e.scatter(d, idx, 0.0).sum(d, keepdim=True), s - e)
            u, lp, pk = _one_minus_p_and_log_p(z, torch.log(s), rest, s)
            term = _smooth_modulator(u, pk, gamma, o) * (lp if not p.poly1 else lp - p.poly1 * u)
            if p.weight is not None:
                term = term * _class_view(p.weight.to(o.cdtype), xs.dim(), d)
            eps = p.eps
            if p.probs is not None:
                q = p.probs.to(o.cdtype)
                if vk is not None:
                    q = torch.where(vk, q, 0.0)
                q = q * (1.0 - eps) + eps / nc
                loss = -(term * q).sum(d)
            else:
                assert p.labels is not None  # a _Plain holds labels or probs
                yk = p.labels.long().unsqueeze(d)
                loss = -((1.0 - eps) * term.gather(d, yk) + (eps / nc) * term.sum(d, keepdim=True)).squeeze(d)
    if p.valid is not None:
        loss = torch.where(p.valid, loss, 0.0)
    if p.bad is not None:
        loss = torch.where(p.bad, math.nan, loss)
    return loss


# ----------------------------------------------------------------------------------------
# Options: validated once per combination of static facts.
# ----------------------------------------------------------------------------------------

_OPTIONS_CACHE: dict[tuple[Any, ...], focal_spec.SoftmaxOptions] = {}
_OPTIONS_CACHE_SIZE = 256


def _is_number(v: Any) -> bool:
    return type(v) in (int, float)


def _options(input, target, gamma, weight, ignore_index, label_smoothing, where, dim, reduction):
    """``focal_spec.softmax_options``, cached when every option is a plain number or string (the
    validation of a given combination of shapes, dtypes and options always gives the same answer)."""
    where_dtype = None if where is None else (where.dtype if isinstance(where, torch.Tensor) else
                                              torch.as_tensor(where).dtype)
    key = None
    # under torch.compile numbers may be symbolic: no cache key; C.spec_gamma / C.spec_value do not read them
    if (not C.is_compiling() and _is_number(gamma) and _is_number(label_smoothing) and type(ignore_index) is int
            and type(dim) is int and type(reduction) is str):
        key = (tuple(input.shape), input.dtype, tuple(target.shape), target.dtype, gamma, C.shape_of(weight),
               ignore_index, label_smoothing, C.shape_of(where), where_dtype, dim, reduction)
        hit = _OPTIONS_CACHE.get(key)
        if hit is not None:
            return hit
    o = focal_spec.softmax_options(
        tuple(input.shape), input.dtype, tuple(target.shape), target.dtype, gamma=C.spec_gamma(gamma),
        weight_shape=C.shape_of(weight), ignore_index=ignore_index,
        label_smoothing=C.spec_unit("label_smoothing", label_smoothing),
        where_shape=C.shape_of(where), axis=dim, reduction=reduction, axis_arg="dim",
        where_dtype="bool" if where_dtype is None else where_dtype)
    if key is not None:
        if len(_OPTIONS_CACHE) >= _OPTIONS_CACHE_SIZE:
            _OPTIONS_CACHE.clear()
        _OPTIONS_CACHE[key] = o
    return o


def _mean(total: torch.Tensor, count: Any, process_group: Any, o: _Opts, device: torch.device) -> torch.Tensor:
    """total / count, 0 where count is exactly 0 (whatever its sign otherwise, as ``F.cross_entropy``).
    Differentiable in ``count`` (a weight with a gradient) unless a process group all-reduces it."""
    if process_group is not None:
        count = count.detach() if isinstance(count, torch.Tensor) else count
        return total * _distributed.mean_scale(count, process_group, dtype=o.cdtype, device=device)
    if not isinstance(count, torch.Tensor):
        return total * (1.0 / count if count != 0 else 0.0)
    count = count.to(o.cdtype)
    nz = count != 0
    return torch.where(nz, total / torch.where(nz, count, 1.0), 0.0)


def _scale(count: Any, process_group: Any, o: _Opts, device: torch.device) -> torch.Tensor | float:
    """1/count as the kernels take it (0 for a count of exactly 0): a float when that costs no sync."""
    if process_group is None and isinstance(count, torch.Tensor) and _host_select(count):
        count = float(count)
    return _distributed.mean_scale(count, process_group, dtype=o.cdtype, device=device)


def _wants_grad(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


def softmax_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float | torch.Tensor = focal_spec.GAMMA,
    weight: torch.Tensor | None = None,
    ignore_index: int = focal_spec.IGNORE_INDEX,
    label_smoothing: float | torch.Tensor = focal_spec.LABEL_SMOOTHING,
    where: torch.Tensor | None = None,
    dim: int = focal_spec.TORCH_CLASS_DIM,
    reduction: str = focal_spec.REDUCTION,
    process_group: Any = None,
    poly1: float = 0.0,
) -> torch.Tensor:
    r"""Softmax focal loss for multi-class classification, with ``F.cross_entropy``'s conventions.

    With :math:`p = \mathrm{softmax}(x)` over the class dim and :math:`q` the (smoothed) target
    distribution, per position :math:`i`:

    .. math::
        \ell_i = -\sum_c w_c \, q_c \, (1-p_c)^{\gamma_c} \log p_c, \qquad
        q = (1-\varepsilon)\,\mathrm{onehot}(y) + \varepsilon/C
        \ \text{(class indices)}, \quad q = (1-\varepsilon)\,t + \varepsilon/C \ \text{(probabilities)}.

    For class indices without smoothing this is :math:`-w_y (1-p_y)^{\gamma} \log p_y`. With
    ``gamma=0`` every option combination equals ``F.cross_entropy``, in value and gradient.

    How it is computed. For integer labels, no smoothing, a known ``gamma`` and a gradient wanted for ``input``
    only, in eager mode: the forward runs ``torch.softmax`` once (on an accelerator, ``torch.log_softmax`` and its
    exponential), reads :math:`p_y`, sums :math:`1 - p_y = \sum_{k\ne y} p_k`, and since
    :math:`\partial\ell_i/\partial x_k = \kappa_i(\delta_{k y_i} - p_k)` with one scalar :math:`\kappa_i` per
    position, turns the softmax into that gradient in place: :math:`-\kappa_i p_k` off the label,
    :math:`\kappa_i (1 - p_y)` at it. The gradient is kept (the logits' size, the bytes ``F.cross_entropy`` keeps for
    its log-probabilities) and the backward is one multiplication, none for ``loss.backward()``. Since
    :math:`1-p_y` is summed from the other classes rather than taken as :math:`1 - p_y`, and :math:`\log p_y` is
    corrected with it (and recomputed from the logits where :math:`p_y` underflows), value and gradient keep full
    relative precision however dominant or unlikely the class. Everything
    else (probabilities, smoothing, tensor ``gamma``, gradients for ``target``, ``weight`` or ``gamma``,
    ``torch.compile``, ``torch.func`` transforms, forward-mode AD, the meta device, double backward) uses a formula
    of plain differentiable ops, with :math:`1-p_c = \sum_{k\ne c} e^{x_k} / \sum_k e^{x_k}` (the arg-max class's
    sum taken without it), accurate with finite derivatives of every order. Double backward through the kernels
    needs the logits still alive (they are held by a weak reference, not saved); ``torch.func`` transforms always
    work.

    Args:
      input: logits of shape (N, C, ...) (class dim ``dim``), or (C,) for one position; a floating
        ``torch.Tensor``. float16 and bfloat16 are computed in float32 and the result is returned in
        ``input``'s dtype. C = 1 gives 0; C = 0 too, where nothing is counted.
      target: integer class indices (any integer dtype, compared without wrapping) of ``input``'s shape
        without the class dim, or floating class probabilities of ``input``'s shape (differentiable).
      gamma: focusing parameter :math:`\gamma \ge 0`: a number, or a tensor of shape () or (C,)
        (:math:`\gamma_c` applies to class c's modulator; differentiable). Whole numbers up to 8 use
        multiplications only. Under ``torch.compile`` a 0-d tensor can change every step without a
        recompilation.
      weight: per-class weights of shape (C,) (differentiable).
      ignore_index: class index whose positions contribute 0 (class indices only). A value that the
        labels' dtype cannot hold matches nothing.
      label_smoothing: :math:`\varepsilon \in [0, 1]`, a number or a 0-d tensor.
      where: boolean tensor broadcasting to the positions (``input``'s shape without the class dim);
        ``False`` positions contribute 0 with an exactly zero gradient, whatever they hold.
      dim: the class dim of ``input``.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``. For class indices the mean divides by
        :math:`\sum_i w_{y_i}` over counted positions, whatever its sign (``F.cross_entropy``'s
        weighted mean); for probabilities, by the number of counted positions. A denominator of
        exactly 0 gives 0, not NaN (unlike ``F.cross_entropy``), with zero gradients.
      process_group: a ``torch.distributed`` process group. With ``reduction="mean"`` the denominator
        is all-reduced over the group (without gradient) and each rank returns
        ``world_size * local_sum / global_denominator``, so that DDP's gradient averaging gives exactly
        the gradient of the global-batch mean. Ignored for ``"sum"`` and ``"none"``.
      poly1: :math:`\varepsilon_1` of Poly-1 (Leng et al. 2022), any finite number (keyword only):
        adds :math:`\varepsilon_1 \sum_c w_c q_c (1-p_c)^{\gamma_c+1}` to each position's loss; 0 is
        off. Defined and validated by :mod:`focal_spec.variants`; a non-zero value is computed by
        plain differentiable formulas (the smooth formula, differentiated by autograd).

    Returns:
      ``"none"``: the per-position loss, ``input``'s shape without the class dim, ``input``'s dtype.
      ``"mean"`` and ``"sum"``: a 0-d tensor of ``input``'s dtype.

    Raises:
      TypeError: ``input`` not a tensor, or of an integer or boolean dtype; floating ``target`` where
        class indices are required, or a target dtype that is neither; ``gamma`` not a number or
        tensor; a ``where`` that is not boolean.
      ValueError: ``gamma`` < 0 or not finite, or of another shape than () or (C,); ``label_smoothing``
        outside [0, 1]; an unknown ``reduction``; a ``target``, ``weight`` or ``where`` shape that does
        not fit; ``dim`` out of range; ``target``, ``weight`` or ``where`` on another device than
        ``input`` (a CPU tensor may accompany accelerator logits); and, in eager mode, a class index
        outside [0, C) that is not ``ignore_index``. That last check reads the labels (on an
        accelerator, one host sync per call). Under ``torch.compile``, on labels a ``torch.func``
        transform wraps and on the meta device it is skipped, and such a position's loss is NaN instead,
        never a silently wrong number.

    Examples:
      >>> import torch
      >>> from focal_torch import softmax_focal_loss
      >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.0, 1.0]], requires_grad=True)
      >>> labels = torch.tensor([0, 2, -100])
      >>> loss = softmax_focal_loss(logits, labels, gamma=2.0)
      >>> print(f"{loss.item():.6f}")
      0.006137
      >>> loss.backward()
      >>> print(logits.grad[2])
      tensor([0., 0., 0.])

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002.
    """
    eps1 = 0.0 if poly1 == 0.0 else focal_spec.variants.check_poly1(poly1)  # any other: the smooth formula
    if (not eps1 and weight is None and where is None and process_group is None and type(input) is torch.Tensor
            and type(target) is torch.Tensor and not target.is_floating_point()):
        plain = _plain_call(input, target, gamma, ignore_index, label_smoothing, dim, reduction)
        if plain is not None:
            args, checked = plain
            try:  # unchecked labels are checked by the kernel's gather (CPU): one outside [0, C) raises first
                return _apply_plain(input, args)
            except RuntimeError:
                # an ignored label or one out of range (the general path computes or says which), or a
                # torch.func transform that wrapped neither tensor (the general path's smooth formula serves)
                if checked and not C.functions_refused():
                    raise
    target = C.checked_target(input, target, weight=weight, where=where)
    dev = input.device
    focal_spec.check_weight("weight", C.spec_value(weight))  # values: outside the cached validation
    o = _options(input, target, gamma, weight, ignore_index, label_smoothing, where, dim, reduction)
    cdtype = torch.float64 if input.dtype == torch.float64 else torch.float32  # C.compute_dtype, inlined
    d = o.axis
    nc = o.num_classes
    gamma_t = None  # γ as a tensor (or symbolic number) when the kernels cannot specialise on a number
    if o.gamma is None or _wants_grad(gamma):
        gamma_t = gamma if isinstance(gamma, (torch.Tensor, torch.SymFloat, torch.SymInt)) or _is_number(gamma) \
            else C.as_tensor(gamma, dtype=cdtype, device=dev)
        if isinstance(gamma_t, torch.Tensor) and gamma_t.device != dev:
            gamma_t = gamma_t.to(dev)
    opts = _Opts(d, nc, o.reduction, cdtype, None if gamma_t is not None else o.gamma,
                 None if gamma_t is not None else o.gamma_int)
    eps: Any = o.label_smoothing
    if eps is None or _wants_grad(label_smoothing):
        # in the compute dtype (a float16 ε would round 1 - ε and ε/C); its gradient comes back in its own dtype
        eps = label_smoothing.to(device=dev, dtype=cdtype) if isinstance(label_smoothing, torch.Tensor) else \
            torch.as_tensor(label_smoothing, dtype=cdtype, device=dev)
    weight_t = C.as_tensor(weight, dtype=None if _wants_grad(weight) else cdtype, device=dev)
    mask = C.as_tensor(where, dtype=torch.bool, device=dev)
    target = target if target.device == dev else target.to(dev)
    positions = tuple(input.shape[:d] + input.shape[d + 1:])
    if mask is not None and tuple(mask.shape) != positions:
        mask = torch.broadcast_to(mask, positions)
    compiling = C.is_compiling()
    # the labels (and where) are read when they can be: eagerly, unless a torch.func transform wraps them
    checkable = (not compiling and not C.any_transformed(target, mask) and dev.type != "meta"
                 and target.device.type != "meta")  # C.can_check_values
    smooth = (not checkable or C.any_transformed(input, weight_t, gamma_t, eps)
              or C.any_tangent(input, target, weight_t, gamma_t, eps) or _wants_grad(target)
              or _wants_grad(weight_t) or _wants_grad(gamma_t) or _wants_grad(eps))

    if o.label_kind != "index":
        p = _Plain(labels=None, probs=target, weight=weight_t, gamma=gamma_t, eps=eps, valid=mask, bad=None,
                   poly1=eps1)
        loss = _plain_loss(input, p, opts)
        count: Any = math.prod(positions) if mask is None else mask.sum()
        return _reduce(loss, count, process_group, opts, dev, input.dtype)

    y = target if target.dtype == torch.int64 else target.long()
    info = torch.iinfo(target.dtype)
    ii = o.ignore_index
    ignore_possible = info.min <= ii <= info.max  # an index the dtype cannot hold matches nothing
    in_range = True
    if checkable and y.numel():
        lo, hi = (int(v) for v in torch.aminmax(y))  # the label check's one read (a host sync off the CPU)
        ignore_possible = ignore_possible and lo <= ii <= hi
        in_range = lo >= 0 and hi < nc
    valid = (y != ii) if ignore_possible else None
    if mask is not None:
        valid = mask if valid is None else valid & mask
    bad = None
    if not checkable:
        bad = (y < 0) | (y >= nc)
        if valid is not None:
            bad = bad & valid
    elif not in_range:
        _check_labels(y, valid, o)
    all_counted = valid is None or (checkable and _host_select(y) and bool(valid.all()))

    if (not smooth and not eps1 and gamma_t is None and isinstance(eps, float) and eps == 0.0 and nc >= 2
            and bad is None):
        if all_counted:
            ys = y
            yk = y.unsqueeze(d)
        else:
            assert valid is not None  # all_counted where it is None
            ys = torch.where(valid, y, -1)
            yk = ys.clamp(min=0).unsqueeze(d)
        scale: Any = 1.0
        if o.reduction == "mean":
            count = _index_count(ys if not all_counted else None, yk, weight_t, y.numel(), d)
            scale = _scale(count, process_group, opts, dev)
        try:
            with _no_autocast(dev):
                return _IndexFocal.apply(input, (ys, yk, weight_t, scale, opts, all_counted))
        except RuntimeError:
            if not C.functions_refused():
                raise
            # a torch.func transform that wrapped none of the tensors: the smooth formula below

    labels = y if valid is None else torch.where(valid, y, 0)
    if bad is not None:
        labels = torch.where((labels < 0) | (labels >= nc), 0, labels)
    p = _Plain(labels=labels, probs=None, weight=weight_t, gamma=gamma_t, eps=eps, valid=valid, bad=bad,
               poly1=eps1)
    loss = _plain_loss(input, p, opts)
    if o.reduction != "mean":
        return _reduce(loss, None, process_group, opts, dev, input.dtype)
    if weight_t is None:
        count = y.numel() if valid is None else valid.sum()
    else:
        wy = weight_t.to(cdtype)[labels] if nc > 0 else torch.zeros(labels.shape, dtype=cdtype, device=dev)
        count = (wy if valid is None else torch.where(valid, wy, 0.0)).sum()
    return _reduce(loss, count, process_group, opts, dev, input.dtype)


_PLAIN: dict[tuple, _Opts | None] = {}


def _plain_call(input: torch.Tensor, target: torch.Tensor, gamma: Any, ignore_index: Any, label_smoothing: Any,
                dim: Any, reduction: Any) -> tuple | None:
    """The common call, with little Python between the user and the kernels: integer labels, all in range
    (checked at every call, by one read or by the kernel's gather: the flag returned with the arguments says
    which), none ignored, a number γ, no smoothing, weight, where or process group,
    eager, outside ``torch.func`` and forward-mode AD, autocast off. Its options are validated by the spec once
    per static facts and cached. None: the general path applies (and gives every error)."""
    if (type(gamma) not in (int, float) or type(label_smoothing) not in (int, float) or type(ignore_index) is not int
            or type(dim) is not int or type(reduction) is not str or not C.plain_eager(input, target)):
        return None
    dev = input.device
    if (not (input.is_cpu or input.is_cuda) or target.device != dev
            or torch.is_autocast_enabled("cpu" if input.is_cpu else "cuda")):
        return None
    key = (input.shape, input.dtype, dev, target.shape, target.dtype, gamma, ignore_index, label_smoothing, dim,
           reduction)
    o = _PLAIN.get(key)
    if o is None:
        if key in _PLAIN:
            return None
        so = _options(input, target, gamma, None, ignore_index, label_smoothing, None, dim, reduction)
        cdtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        ok = so.label_kind == "index" and so.label_smoothing == 0.0 and so.num_classes >= 2 and so.gamma is not None
        o = _Opts(so.axis, so.num_classes, so.reduction, cdtype, so.gamma, so.gamma_int) if ok else None
        if len(_PLAIN) > 512:
            _PLAIN.clear()
        _PLAIN[key] = o
        if o is None:
            return None
    n = target.numel()
    if n == 0:
        return None
    # Labels in [0, C) and none ignored: on the CPU, for few positions, with an ignore_index outside [0, C), the
    # kernel's own gather checks them (a call costs more than its arithmetic there); else one read here (a host
    # sync off the CPU)
    unchecked = n < SMALL_POSITIONS and _host_select(input) and not 0 <= ignore_index < o.num_classes
    if not unchecked:
        lo_t, hi_t = torch.aminmax(C.min_max_ready(target))
        lo, hi = int(lo_t), int(hi_t)
        if lo < 0 or hi >= o.num_classes or lo <= ignore_index <= hi:  # out of range or ignored: the general path
            return None
    y = target if target.dtype == torch.int64 else target.long()
    return (y, y.unsqueeze(o.dim), None, (1.0 / n if o.reduction == "mean" else 1.0), o, True), not unchecked


def _index_count(ys, yk, weight, n, d):
    """The mean's denominator for the kernels: counted positions, or Σ w[y] over them."""
    if weight is None:
        return n if ys is None else (ys >= 0).sum()
    wy = weight[yk.squeeze(d)]
    return wy.sum() if ys is None else torch.where(ys >= 0, wy, 0.0).sum()


def _check_labels(y: torch.Tensor, valid: torch.Tensor | None, o: focal_spec.SoftmaxOptions) -> None:
    """ValueError naming the first counted label outside [0, C) (eager)."""
    out = (y < 0) | (y >= o.num_classes)
    if valid is not None:
        out = out & valid
    if bool(out.any()):
        raise ValueError(focal_spec.label_out_of_range(int(y[out][0]), o.num_classes, o.ignore_index))


def _reduce(loss, count, process_group, o: _Opts, device, dtype):
    if o.reduction == "none":
        return loss.to(dtype)
    total = loss.sum()
    if o.reduction == "mean":
        total = _mean(total, count, process_group, o, device)
    return total.to(dtype)
