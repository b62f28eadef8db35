"""Sigmoid focal loss (binary and multi-label) with closed-form derivatives for every input."""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import focal_spec
from focal_torch import _common as C
from focal_torch import _distributed

# ----------------------------------------------------------------------------------------
# Notation (focal_spec): t' = t(1-ε) + ε/2 the smoothed target, s = σ(x), s̄ = σ(-x),
# sp = softplus(x) = -log s̄, sp̄ = softplus(-x) = -log s, π = pos_weight, w = weight,
# α_t = (1-α)(1-t') + α t', a = α_t · w · [counted], and
#
#   ce  = (1-t') sp + π t' sp̄        (both terms >= 0: no cancellation at any logit)
#   q   = 1 - p_t = (1-t') s + t' s̄  (both terms >= 0)
#   ℓ   = a · q^γ · ce
#
# Every sum of two terms of one sign is formed with torch.lerp, which is exact at t' = 0 and 1 and
# loses nothing for soft targets. The derivatives, per element:
#
#   dℓ/dx  = a [γ q^(γ-1) (1-2t') s s̄ ce + q^γ ((1-t') s - π t' s̄)]
#   dℓ/dt' = a [γ q^(γ-1) (s̄ - s) ce + q^γ (π sp̄ - sp)] + w q^γ ce (2α-1)
#   dℓ/dα  = w q^γ ce (2t'-1),  dℓ/dw = α_t q^γ ce,  dℓ/dπ = a q^γ t' sp̄,  dℓ/dγ = ℓ log q
# ----------------------------------------------------------------------------------------


class _Opts(NamedTuple):
    gamma: float | None  # a known number; None: gamma is a tensor input
    gamma_int: int | None  # a small whole gamma: multiplications only
    alpha: float | None  # a number; a tensor alpha is an input
    reduction: str
    cdtype: torch.dtype
    nan_targets: bool  # targets were not checked (compile, torch.func, meta): out-of-range ones give NaN


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


@functools.lru_cache(maxsize=64)
def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A shared 0-d constant (read only)."""
    return torch.full((), value, dtype=dtype, device=device)


def _lerp(start: Any, end: Any, weight: torch.Tensor, ws: Any = None) -> torch.Tensor:
    """(1-w) start + w end for tensors or numbers, exact at w = 0 and w = 1."""
    if not isinstance(start, torch.Tensor):
        start = (torch.full((), start, dtype=weight.dtype, device=weight.device) if C.is_compiling()
                 else _scalar(float(start), weight.dtype, weight.device))
    if not isinstance(end, torch.Tensor):
        end = (torch.full((), end, dtype=weight.dtype, device=weight.device) if C.is_compiling()
               else _scalar(float(end), weight.dtype, weight.device))
    return torch.lerp(start, end, weight, **_new(ws, 7, weight.shape))


def _alpha_t(alpha: torch.Tensor | None, tp: torch.Tensor, o: _Opts, ws: Any = None) -> torch.Tensor | None:
    """α_t = (1-α)(1-t') + α t' (None without alpha)."""
    if alpha is not None:
        return torch.lerp(1.0 - alpha, alpha, tp)
    if o.alpha is not None:
        return _lerp(1.0 - o.alpha, o.alpha, tp, ws)
    return None


# ----------------------------------------------------------------------------------------
# Eager CPU kernels: in place, piece by piece (see C.chunked), no autograd. Only for a known
# number gamma and a number label smoothing.
# ----------------------------------------------------------------------------------------


def _prepare(x, t, mask, eps, cdtype, bits):
    """Casts to the compute dtype, clears masked positions (so NaN/inf/255 there never reach the math)
    and smooths the targets."""
    x = x.to(cdtype)
    t = t.to(cdtype)
    if mask is not None:
        x, t = C.zero_unless(x, mask, bits), C.zero_unless(t, mask, bits)
    if eps:
        t = t * (1.0 - eps) + eps / 2.0
    return x, t


class _Buffers:
    """Temporaries reused by every piece of one call: a fresh large tensor per op would be faulted in anew
    each time (the allocator returns large blocks to the system)."""

    def __init__(self, x: torch.Tensor, dtype: torch.dtype):
        self.n = 0
        self.dtype, self.device = dtype, x.device
        self.bufs: dict[int, torch.Tensor] = {}

    def __call__(self, i: int, shape) -> torch.Tensor | None:
        n = 1
        for d in shape:
            n *= d
        b = self.bufs.get(i)
        if b is None or b.numel() < n:
            b = self.bufs[i] = torch.empty(n, dtype=self.dtype, device=self.device)
        return b[:n].view(shape)


def _new(ws: _Buffers | None, i: int, shape) -> dict:
    """``out=`` keyword arguments for an op writing a temporary of ``shape`` (none without buffers)."""
    return {} if ws is None else {"out": ws(i, shape)}


def _finish_inplace(buf, tp, alpha, weight, mask, bits, o: _Opts, ws: _Buffers | None = None) -> None:
    """Multiplies ``buf`` by α_t and w, and clears the masked positions (NaN-safe)."""
    at = _alpha_t(alpha, tp, o, ws)
    if at is not None:
        buf.mul_(at)
    if weight is not None:
        buf.mul_(weight)
    if mask is not None:
        C.zero_unless_(buf, bits)


_SERIAL = 32768
"""Below this many elements torch runs an elementwise op on one thread (its grain size)."""


def _ce_inplace(x, tp, s, sn, pw, o: _Opts, ws: _Buffers | None = None) -> torch.Tensor:
    """ce in a new buffer, from s = σ(x) and s̄ = σ(-x): with r = relu(x), r̄ = relu(-x) = r - x (exact) and
    l = log1p(e^-|x|) = -log1p(-min(s, s̄)), ce = (1-t') r + π t' r̄ + ((1-t') + π t') l. Every term is >= 0.
    (One log1p on a sigmoid costs less than the two softplus of (1-t') sp + π t' sp̄; for small pieces,
    where a parallel region costs more than the arithmetic, the softplus form (1-t') sp + π t' sp̄.)"""
    if x.numel() < _SERIAL:  # softplus runs serially here; log1p, log and exp go parallel from 2048 elements
        ce = F.softplus(torch.neg(x), 1.0, C.SOFTPLUS_THRESHOLD)  # sp̄
        if pw is not None:
            ce.mul_(pw)
        return F.softplus(x, 1.0, C.SOFTPLUS_THRESHOLD).lerp_(ce, tp)
    nl = torch.minimum(s, sn, **_new(ws, 0, x.shape)).neg_().log1p_()  # -l
    r = torch.clamp_min(x, 0.0, **_new(ws, 1, x.shape))
    rn = torch.sub(r, x, **_new(ws, 2, x.shape))
    if pw is None:
        return r.lerp_(rn, tp).sub_(nl)
    return r.lerp_(rn.mul_(pw), tp).sub_(nl.mul_(_lerp(1.0, pw, tp)))


def _loss_piece(x, t, alpha, weight, pw, mask, eps, o: _Opts, reduce: bool, ws: _Buffers | None = None):
    """The elementwise loss of one piece, or its sum (cascade summation)."""
    bits = None if mask is None else C.keep_bits(mask, o.cdtype)
    x, tp = _prepare(x, t, mask, eps, o.cdtype, bits)
    s = torch.sigmoid(x, **_new(ws, 3, x.shape))
    sn = torch.neg(x, **_new(ws, 4, x.shape)).sigmoid_()
    ce = _ce_inplace(x, tp, s, sn, pw, o, ws)
    if o.gamma != 0.0:
        q = s.lerp_(sn, tp)
        if o.gamma_int is not None:
            for _ in range(o.gamma_int):
                ce.mul_(q)
        else:
            ce.mul_(q.clamp_(min=_tiny(o.cdtype)).pow_(o.gamma))
    _finish_inplace(ce, tp, alpha, weight, mask, bits, o, ws)
    return ce.sum() if reduce else ce


def _grad_piece(x, t, alpha, weight, pw, mask, eps, o: _Opts, coef, out, ws: _Buffers | None = None) -> None:
    """Writes coef · dℓ/dx of one piece into ``out``."""
    bits = None if mask is None else C.keep_bits(mask, o.cdtype)
    x, tp = _prepare(x, t, mask, eps, o.cdtype, bits)
    s = torch.sigmoid(x, **_new(ws, 3, x.shape))
    sn = torch.neg(x, **_new(ws, 4, x.shape)).sigmoid_()
    if o.gamma == 0.0:
        sn = sn.neg_() if pw is None else sn.mul_(-pw)
        g = s.lerp_(sn, tp)  # (1-t') s - π t' s̄: exactly s or -π s̄ for hard targets
    else:
        ce = _ce_inplace(x, tp, s, sn, pw, o, ws)  # in buffer 1; 0 and 2 are free again
        q = torch.lerp(s, sn, tp, **_new(ws, 5, x.shape))
        u = torch.mul(s, sn, **_new(ws, 0, x.shape))
        if o.gamma_int is None:  # q^(γ-1) may exceed 1: apply it before anything underflows
            mq = torch.clamp(q, min=_tiny(o.cdtype), **_new(ws, 6, x.shape)).pow_(o.gamma - 1.0)
            u.mul_(mq)
            q.mul_(mq)  # q^γ
        one_2t = torch.mul(tp, -2.0, **_new(ws, 2, tp.shape)).add_(1.0)  # 1-2t', one rounding
        u.mul_(ce).mul_(one_2t)  # (1-2t') s s̄ ce = ce dq/dx (times q^(γ-1))
        sn = sn.neg_() if pw is None else sn.mul_(-pw)
        g = s.lerp_(sn, tp).mul_(q).add_(u, alpha=o.gamma)  # q dce/dx + γ ce dq/dx (times q^(γ-1))
        if o.gamma_int is not None:  # q^(γ-1) <= 1 for a whole γ: nothing underflows early
            for _ in range(o.gamma_int - 1):
                g.mul_(q)
    _finish_inplace(g, tp, alpha, weight, mask, bits, o, ws)
    if isinstance(coef, torch.Tensor):
        out.copy_(g.mul_(coef))
    elif coef == 1.0:
        out.copy_(g)
    elif out.dtype == g.dtype and out.is_contiguous() and g.is_contiguous():
        torch.mul(g, coef, out=out)
    else:
        out.copy_(g.mul_(coef))


# ----------------------------------------------------------------------------------------
# Plain, out-of-place formulas: used under torch.compile and torch.func, for forward-mode AD,
# for a tensor gamma, for the gradients of inputs other than the logits, and inside a backward
# that autograd differentiates again. Powers carry the value of torch.pow (correctly rounded)
# and the derivative of exp(e log q) (finite at any logit, also twice differentiated).
# ----------------------------------------------------------------------------------------


def _grad_tracked(*ts) -> bool:
    return torch.is_grad_enabled() or any(C.is_transformed(t) or C.has_tangent(t) for t in ts if t is not None)


class _Parts:
    """The shared elementwise quantities of a call, computed lazily."""

    def __init__(self, x, t, alpha, weight, pw, gamma, mask, eps, o: _Opts):
        self.o = o
        cd = o.cdtype
        x = x.to(cd)
        t = t.to(cd)
        if mask is not None:
            x = torch.where(mask, x, 0.0)
            t = torch.where(mask, t, 0.0)
        if o.nan_targets:
            t = torch.where((t >= 0.0) & (t <= 1.0), t, float("nan"))
        self.t_raw = t
        self.tp = t if (not isinstance(eps, torch.Tensor) and not eps) else t * (1.0 - eps) + eps / 2.0
        self.x, self.alpha, self.weight, self.pw, self.gamma, self.mask = x, alpha, weight, pw, gamma, mask
        self.smooth = _grad_tracked(x, t, alpha, weight, pw, gamma)
        self._cache: dict[str, torch.Tensor] = {}

    def _get(self, name, fn):
        v = self._cache.get(name)
        if v is None:
            v = self._cache[name] = fn()
        return v

    @property
    def s(self):
        return self._get("s", lambda: torch.sigmoid(self.x))

    @property
    def sn(self):
        return self._get("sn", lambda: torch.sigmoid(-self.x))

    @property
    def sp(self):
        return self._get("sp", lambda: F.softplus(self.x, 1.0, C.SOFTPLUS_THRESHOLD))

    @property
    def spn(self):
        return self._get("spn", lambda: F.softplus(-self.x, 1.0, C.SOFTPLUS_THRESHOLD))

    @property
    def pspn(self):  # π sp̄
        return self._get("pspn", lambda: self.spn if self.pw is None else self.pw * self.spn)

    @property
    def ce(self):
        return self._get("ce", lambda: torch.lerp(self.sp, self.pspn, self.tp))

    @property
    def q(self):
        return self._get("q", lambda: torch.lerp(self.s, self.sn, self.tp))

    @property
    def log_q(self):
        """log(1-p_t): log1p(-p_t) where 1-p_t > 1/2 (exact near 1), log max(1-p_t, tiny) elsewhere."""
        def fn():
            p_t = torch.lerp(self.sn, self.s, self.tp)
            small = torch.log(torch.clamp(self.q, min=_tiny(self.o.cdtype)))
            # clamped so that the branch not taken has finite derivatives (they are multiplied by 0)
            return torch.where(self.q > 0.5, torch.log1p(-torch.clamp(p_t, max=0.5)), small)
        return self._get("log_q", fn)

    def power(self, e: Any) -> torch.Tensor:
        """q^e for a number or tensor exponent e: q^e exactly 1 where e = 0 (no 0^0), q clamped to tiny."""
        if isinstance(e, int):
            return C.ipow(self.q, e, inplace=False) if e > 0 else torch.ones_like(self.q)
        qc = torch.clamp(self.q, min=_tiny(self.o.cdtype))
        if not self.smooth:
            v = torch.pow(qc, e)
        else:
            smooth = torch.exp(e * self.log_q)
            v = torch.pow(qc.detach(), e.detach() if isinstance(e, torch.Tensor) else e) + (smooth - smooth.detach())
        if isinstance(e, torch.Tensor):
            v = torch.where(e == 0, 1.0, v)
        return v

    @property
    def m(self):
        o = self.o
        def fn():
            if o.gamma is None:
                return self.power(self.gamma)
            if o.gamma == 0.0:
                return None
            return self.power(o.gamma_int if o.gamma_int is not None else o.gamma)
        return self._get("m", fn)

    def m_over_q(self):
        """q^(γ-1) where γ != 0 (γ times it is what the derivatives need; 0 where γ = 0)."""
        o = self.o
        if o.gamma is None:
            return self.power(self.gamma - 1.0)
        if o.gamma_int is not None:
            return self.power(o.gamma_int - 1)
        return self.power(o.gamma - 1.0)

    @property
    def at(self):
        return self._get("at", lambda: _alpha_t(self.alpha, self.tp, self.o))

    def scale(self, *, alpha: bool = True, weight: bool = True) -> torch.Tensor | None:
        """α_t · w (either left out on request); the mask is applied by :meth:`counted`."""
        f = self.at if alpha else None
        if weight and self.weight is not None:
            f = self.weight if f is None else f * self.weight
        return f

    def counted(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.mask is None else torch.where(self.mask, v, 0.0)

    def unscaled(self) -> torch.Tensor:
        """q^γ ce."""
        m = self.m
        return self.ce if m is None else m * self.ce

    def loss(self) -> torch.Tensor:
        f = self.scale()
        v = self.unscaled()
        return self.counted(v if f is None else v * f)

    def times(self, v: torch.Tensor, f: torch.Tensor | None) -> torch.Tensor:
        return self.counted(v if f is None else v * f)

    def _focal(self, d_ce: torch.Tensor, d_q: Any) -> torch.Tensor:
        """γ q^(γ-1) d_q ce + q^γ d_ce: the derivative of q^γ ce from those of ce and q (exactly d_ce at γ = 0)."""
        o = self.o
        if o.gamma == 0.0:
            return d_ce
        gam = self.gamma if o.gamma is None else o.gamma
        return gam * self.m_over_q() * d_q * self.ce + self.m * d_ce

    def d_x(self) -> torch.Tensor:
        d_ce = torch.lerp(self.s, -self.sn if self.pw is None else -self.pw * self.sn, self.tp)
        d_q = None if self.o.gamma == 0.0 else torch.rsub(self.tp, 1.0, alpha=2.0) * self.s * self.sn
        return self.times(self._focal(d_ce, d_q), self.scale())

    def d_tp(self) -> torch.Tensor:
        d_ce = self.pspn - self.sp
        d_q = None if self.o.gamma == 0.0 else self.sn - self.s
        g = self.times(self._focal(d_ce, d_q), self.scale())
        if self.alpha is not None or self.o.alpha is not None:
            a = self.alpha if self.alpha is not None else self.o.alpha
            g = g + self.times(self.unscaled() * (2.0 * a - 1.0), self.scale(alpha=False))
        return g

    def d_alpha(self) -> torch.Tensor:
        return self.times(self.unscaled() * (2.0 * self.tp - 1.0), self.scale(alpha=False))

    def d_weight(self) -> torch.Tensor:
        return self.times(self.unscaled(), self.scale(weight=False))

    def d_pw(self) -> torch.Tensor:
        m = self.m
        v = self.tp * self.spn
        return self.times(v if m is None else m * v, self.scale())

    def d_gamma(self) -> torch.Tensor:
        return self.times(self.unscaled() * self.log_q, self.scale())


def _reduce(v: torch.Tensor, o: _Opts, scale) -> torch.Tensor:
    if o.reduction == "none":
        return v
    total = v.sum()
    return total * scale if o.reduction == "mean" else total


def _to_input(g: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A gradient of ``ref``'s shape and dtype (summed over broadcast dims)."""
    if g.shape != ref.shape:
        g = g.sum_to_size(ref.shape)
    return g.to(ref.dtype)


# ----------------------------------------------------------------------------------------
# The autograd Function.
# ----------------------------------------------------------------------------------------

_NAMES = ("x", "t", "alpha", "weight", "pw", "gamma", "mask", "scale", "eps")


def _fast(o: _Opts, eps: Any, *ts) -> bool:
    """Whether the eager CPU kernels apply: a number gamma and smoothing, plain host tensors."""
    if o.gamma is None or isinstance(eps, torch.Tensor) or C.is_compiling():
        return False
    for t in ts:
        if isinstance(t, torch.Tensor) and (C.is_transformed(t) or not C.is_host(t)):
            return False
    return True


def _forward(x, t, alpha, weight, pw, gamma, mask, scale, eps, o: _Opts) -> torch.Tensor:
    with C.no_autocast(x.device):
        if not _fast(o, eps, x, t, alpha, weight, pw, mask, scale):
            loss = _reduce(_Parts(x, t, alpha, weight, pw, gamma, mask, eps, o).loss(), o, scale)
            return loss.to(x.dtype)
        if o.reduction == "none":
            out = torch.empty_like(x, memory_format=torch.contiguous_format if x.is_contiguous()
                                   else torch.preserve_format)
            ws = _Buffers(x, o.cdtype)
            for region, (xp, tp, ap, wp, pp, mp) in C.chunked(x, t, alpha, weight, pw, mask):
                C.piece_of(out, region).copy_(_loss_piece(xp, tp, ap, wp, pp, mp, eps, o, False, ws))
            return out
        ws = _Buffers(x, o.cdtype)
        parts = [_loss_piece(xp, tp, ap, wp, pp, mp, eps, o, True, ws)
                 for _, (xp, tp, ap, wp, pp, mp) in C.chunked(x, t, alpha, weight, pw, mask)]
        # each piece is a cascade sum; the pieces are added in float64
        total = parts[0] if len(parts) == 1 else torch.stack(parts).to(torch.float64).sum()
        if o.reduction == "mean":
            total = total * scale
        return total.to(x.dtype)


SMALL = 1024
"""Inputs of at most this many elements compute the gradient with the loss in the forward pass and keep it
(a few kB): the backward then costs one multiplication instead of a second pass of the formulas."""


def _fused_small(x, t, alpha, weight, pw, mask, eps, o: _Opts, scale):
    """(loss after reduction, dℓ/dx times the mean's scale) of a small input, sharing every intermediate."""
    bits = None if mask is None else C.keep_bits(mask, o.cdtype)
    x, tp = _prepare(x, t, mask, eps, o.cdtype, bits)
    nx = torch.neg(x)
    s = torch.sigmoid(x)
    ce = F.softplus(nx, 1.0, C.SOFTPLUS_THRESHOLD)
    if pw is not None:
        ce.mul_(pw)
    ce = F.softplus(x, 1.0, C.SOFTPLUS_THRESHOLD).lerp_(ce, tp)
    sn = nx.sigmoid_()
    if o.gamma == 0.0:
        loss = ce
        g = s.lerp_(sn.neg_() if pw is None else sn.mul_(-pw), tp)
    else:
        q = torch.lerp(s, sn, tp)
        u = torch.mul(s, sn)
        if o.gamma_int is not None:
            mq = C.ipow(q, o.gamma_int - 1, inplace=False) if o.gamma_int > 1 else None
        else:
            mq = torch.clamp(q, min=_tiny(o.cdtype)).pow_(o.gamma - 1.0)
        if mq is not None:  # q^(γ-1) first: it may exceed 1, and s s̄ ce may underflow before it
            u.mul_(mq)
            q.mul_(mq)  # q^γ
        u.mul_(ce).mul_(torch.rsub(tp, 1.0, alpha=2.0))  # γ^-1 d(q^γ)/dx ce
        loss = ce.mul_(q)
        g = s.lerp_(sn.neg_() if pw is None else sn.mul_(-pw), tp).mul_(q).add_(u, alpha=o.gamma)
    _finish_inplace(loss, tp, alpha, weight, mask, bits, o)
    _finish_inplace(g, tp, alpha, weight, mask, bits, o)
    if o.reduction == "none":
        return loss.to(x.dtype), g
    total = loss.sum()
    if o.reduction == "mean":
        total = total * scale
        g = g.mul_(scale)
    return total, g


def _save(ctx, x, t, alpha, weight, pw, gamma, mask, scale, eps, o: _Opts, grad_x=None) -> None:
    """Saves the inputs (numbers as attributes; a small input's gradient too); the rules recompute the rest."""
    ctx.o = o
    ctx.x_dtype = x.dtype
    ctx.scale_value = None if isinstance(scale, torch.Tensor) else scale
    ctx.eps_value = None if isinstance(eps, torch.Tensor) else eps
    saved = (x, t, alpha, weight, pw, gamma, mask, scale if ctx.scale_value is None else None,
             eps if ctx.eps_value is None else None)
    ctx.has_grad_x = grad_x is not None
    ctx.save_for_backward(*saved, grad_x)
    ctx.save_for_forward(*saved)


def _unpack(ctx):
    x, t, alpha, weight, pw, gamma, mask, scale, eps = ctx.saved_tensors[:9]
    if ctx.scale_value is not None:
        scale = ctx.scale_value
    if ctx.eps_value is not None:
        eps = ctx.eps_value
    return x, t, alpha, weight, pw, gamma, mask, scale, eps


def _backward(ctx, grad_out):
    x, t, alpha, weight, pw, gamma, mask, scale, eps = _unpack(ctx)
    o: _Opts = ctx.o
    need = ctx.needs_input_grad
    grads: list[Any] = [None] * 10
    with C.no_autocast(x.device):
        cd = o.cdtype
        if o.reduction == "none":
            coef: Any = grad_out.to(cd)
        else:
            coef = grad_out.to(cd) * scale if o.reduction == "mean" else grad_out.to(cd)
        fast = (need[0] and not torch.is_grad_enabled()
                and _fast(o, eps, x, t, alpha, weight, pw, mask, grad_out, scale))
        if fast:
            grad = torch.empty_like(x, memory_format=torch.contiguous_format if x.is_contiguous()
                                    else torch.preserve_format)
            if o.reduction == "none":
                pieces = C.chunked(x, t, alpha, weight, pw, mask, coef)
            else:
                k = C.scalar_or_tensor(coef)
                pieces = ((r, (*p, k)) for r, p in C.chunked(x, t, alpha, weight, pw, mask))
            ws = _Buffers(x, cd)
            for region, (xp, tp, ap, wp, pp, mp, cp) in pieces:
                _grad_piece(xp, tp, ap, wp, pp, mp, eps, o, cp, C.piece_of(grad, region), ws)
            grads[0] = grad
        if any(need[i] and grads[i] is None for i in range(6)):
            p = _Parts(x, t, alpha, weight, pw, gamma, mask, eps, o)
            rules = (p.d_x, p.d_tp, p.d_alpha, p.d_weight, p.d_pw, p.d_gamma)
            refs = (x, t, alpha, weight, pw, gamma)
            for i, rule in enumerate(rules):
                if need[i] and grads[i] is None:
                    g = rule() * coef
                    if i == 1 and (isinstance(eps, torch.Tensor) or eps):
                        g = g * (1.0 - eps)
                    grads[i] = _to_input(g, refs[i])
    return tuple(grads)


def _jvp(ctx, *tangents):
    x, t, alpha, weight, pw, gamma, mask, scale, eps = _unpack(ctx)
    o: _Opts = ctx.o
    with C.no_autocast(x.device):
        p = _Parts(x, t, alpha, weight, pw, gamma, mask, eps, o)
        rules = (p.d_x, p.d_tp, p.d_alpha, p.d_weight, p.d_pw, p.d_gamma)
        total = None
        for i, rule in enumerate(rules):
            dt = tangents[i]
            if dt is None:
                continue
            d = rule() * dt.to(o.cdtype)
            if i == 1 and (isinstance(eps, torch.Tensor) or eps):
                d = d * (1.0 - eps)
            total = d if total is None else total + d
        if total is None:
            total = torch.zeros_like(p.x)
        if total.shape != p.x.shape:
            total = total.expand(torch.broadcast_shapes(total.shape, p.x.shape))
        return _reduce(total, o, scale).to(x.dtype)


class _SigmoidFocal(torch.autograd.Function):
    """Eager mode (and forward-mode AD through ``jvp``). A reduced loss is reduced inside, so nothing of
    the input's size is saved but the inputs (and, for inputs of at most :data:`SMALL` elements, the
    gradient computed with the loss)."""

    @staticmethod
    def forward(ctx, x, t, alpha, weight, pw, gamma, mask, scale, eps, o):  # type: ignore[override]
        if (x.numel() <= SMALL and ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:6])
                and _fast(o, eps, x, t, alpha, weight, pw, mask, scale)):
            with C.no_autocast(x.device):
                loss, grad_x = _fused_small(x, t, alpha, weight, pw, mask, eps, o, scale)
            _save(ctx, x, t, alpha, weight, pw, gamma, mask, scale, eps, o, grad_x)
            return loss.to(x.dtype)
        _save(ctx, x, t, alpha, weight, pw, gamma, mask, scale, eps, o)
        return _forward(x, t, alpha, weight, pw, gamma, mask, scale, eps, o)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if not ctx.has_grad_x or torch.is_grad_enabled():
            return _backward(ctx, grad_out)
        g = ctx.saved_tensors[9]
        with C.no_autocast(g.device):
            return (torch.mul(g, grad_out.to(g.dtype)).to(ctx.x_dtype), *(None,) * 9)

    jvp = staticmethod(_jvp)


class _SigmoidFocalCompiled(torch.autograd.Function):
    """What ``torch.compile`` traces: the same, without ``jvp`` (Dynamo does not trace a custom one)."""

    @staticmethod
    def forward(ctx, x, t, alpha, weight, pw, gamma, mask, scale, eps, o):  # type: ignore[override]
        _save(ctx, x, t, alpha, weight, pw, gamma, mask, scale, eps, o)
        return _forward(x, t, alpha, weight, pw, gamma, mask, scale, eps, o)

    backward = staticmethod(_backward)


class _SigmoidFocalFunc(torch.autograd.Function):
    """Under ``torch.func`` transforms: ``setup_context`` style, with a vmap rule generated from the plain
    formulas (which every input takes there) and ``jvp`` for ``jacfwd``/``hessian``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, t, alpha, weight, pw, gamma, mask, scale, eps, o):  # type: ignore[override]
        return _forward(x, t, alpha, weight, pw, gamma, mask, scale, eps, o)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, *inputs)

    backward = staticmethod(_backward)
    jvp = staticmethod(_jvp)


# ----------------------------------------------------------------------------------------
# Validation: cached on the hashable static facts of a call.
# ----------------------------------------------------------------------------------------


_options_cached = functools.lru_cache(maxsize=512)(focal_spec.sigmoid_options)


def _hashable(v: Any) -> bool:
    return v is None or type(v) in (int, float, str, bool)


def _options(x_shape, x_dtype, t_shape, t_dtype, **kw) -> focal_spec.SigmoidOptions:
    if not C.is_compiling() and all(_hashable(kw[k]) for k in ("gamma", "alpha", "label_smoothing", "reduction")):
        return _options_cached(x_shape, x_dtype, t_shape, t_dtype, **kw)
    return focal_spec.sigmoid_options(x_shape, x_dtype, t_shape, t_dtype, **kw)


def _check_targets(target: torch.Tensor, mask: torch.Tensor | None, shape) -> None:
    """Eager: a target outside [0, 1] at a counted element raises (one reduction over the targets; on an
    accelerator it costs one host sync)."""
    if target.dtype == torch.bool or target.numel() == 0:
        return
    lo, hi = torch.aminmax(target.detach())
    if lo.item() >= 0 and hi.item() <= 1:  # NaN fails both
        return
    t = target.detach()
    bad = ~((t >= 0) & (t <= 1))
    if mask is not None:
        bad = bad & mask
        t = torch.broadcast_to(t, torch.broadcast_shapes(t.shape, mask.shape))
        bad = torch.broadcast_to(bad, t.shape)
    if bool(bad.any()):
        raise ValueError(focal_spec.targets_out_of_range(float(t[bad].reshape(-1)[0])))


def _where_dtype(where: Any) -> Any:
    if where is None:
        return "bool"
    if isinstance(where, torch.Tensor):
        return where.dtype
    return np.asarray(where).dtype


def sigmoid_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float | torch.Tensor = focal_spec.GAMMA,
    alpha: float | torch.Tensor | None = focal_spec.ALPHA,
    weight: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    label_smoothing: float = focal_spec.LABEL_SMOOTHING,
    where: torch.Tensor | None = None,
    reduction: str = focal_spec.REDUCTION,
    process_group: Any = None,
) -> torch.Tensor:
    r"""Sigmoid focal loss for binary and multi-label classification.

    Each element is an independent binary problem. With :math:`x` the logit, :math:`t` the
    target, :math:`\sigma` the sigmoid and :math:`\pi` the positive weight:

    .. math::
        t' = t(1-\varepsilon) + \varepsilon/2, \qquad
        \mathrm{ce} = -\pi t'\log\sigma(x) - (1-t')\log\sigma(-x),

        1-p_t = t'\sigma(-x) + (1-t')\sigma(x), \qquad
        \alpha_t = \alpha t' + (1-\alpha)(1-t'),

        \ell = \alpha_t \, w \, (1-p_t)^\gamma \, \mathrm{ce}.

    With ``gamma=0`` and no ``alpha`` this is ``F.binary_cross_entropy_with_logits`` (with its
    ``weight`` and ``pos_weight``), in value and gradient. Every term is formed without
    cancellation, so that values and gradients keep float32's relative precision at any logit
    (``softplus(x) - t x`` would lose it for confident predictions). The derivatives have closed
    forms and are recomputed from the saved inputs; they are themselves differentiable (double
    backward, Hessians), and ``torch.func`` (``grad``, ``vmap``, ``jacrev``, ``jacfwd``,
    ``hessian``), forward-mode AD and ``torch.compile(fullgraph=True)`` apply.

    Args:
      input: logits, a ``torch.Tensor`` of any shape and layout, floating dtype. float16 and
        bfloat16 are computed in float32 and the result is returned in ``input``'s dtype.
      target: targets in [0, 1] (hard or soft), a tensor, NumPy array or sequence whose shape
        broadcasts to ``input``; floating, integer or boolean dtype. Cast to the compute dtype.
      gamma: focusing parameter :math:`\gamma \ge 0`: a number, or a tensor that broadcasts to
        ``input`` (0-d, or one value per class). A whole number up to 8 (also a 0-d CPU tensor
        outside ``torch.compile`` that needs no gradient) uses multiplications only; any other
        gamma takes a general path: finite values and derivatives at any logit, exactly the
        cross-entropy where :math:`\gamma = 0`. A tensor gamma can change every step without
        recompiling under ``torch.compile``.
      alpha: class-balance weight: ``None`` (off), a number in [0, 1], or a tensor that broadcasts to
        ``input`` (per class, for example).
      weight: a tensor that broadcasts to ``input``, multiplied into each element's loss.
      pos_weight: :math:`\pi`, a tensor that broadcasts to ``input`` (typically one value per class):
        the weight of the positive term of the cross-entropy, as in
        ``F.binary_cross_entropy_with_logits``. The modulator and :math:`\alpha_t` are unchanged.
      label_smoothing: :math:`\varepsilon \in [0, 1]`, pulls targets towards 1/2.
      where: boolean tensor broadcasting to ``input``; ``False`` elements contribute 0 and get an
        exactly zero gradient, whatever the logits or targets hold there (NaN, inf, 255).
      reduction: ``"none"``, ``"mean"`` (sum over the number of counted elements) or ``"sum"``.
      process_group: a ``torch.distributed`` process group. With ``reduction="mean"``, the number of
        counted elements is all-reduced over the group (without gradient), and each rank returns
        ``world_size * local_sum / global_count``: DDP's gradient averaging then yields exactly the
        gradient of the mean over the global batch. Ignored for ``"sum"`` and ``"none"``.

    Gradients flow to every floating tensor that requires them: ``input``, ``target``, ``alpha``,
    ``weight``, ``pos_weight`` and ``gamma`` (:math:`d\ell/d\gamma = \ell \log(1-p_t)`), with closed
    forms; a tensor that broadcasts gets the sum over the broadcast dims.

    What is checked when: types, dtypes, shapes and every number option at each call (cached on
    these static facts). Tensor ``alpha`` and ``gamma`` values are range-checked when they are
    CPU tensors outside ``torch.compile`` and ``torch.func``; on an accelerator or when traced only
    their shapes are. ``target`` values at counted elements are checked in eager mode (one
    reduction; on an accelerator one host sync); under ``torch.compile``, ``torch.func`` or on the
    meta device that check cannot run, and an element with a target outside [0, 1] gets a NaN loss.

    Returns:
      ``"none"``: the elementwise loss, ``input``'s shape and dtype. ``"mean"`` and ``"sum"``: a 0-d
      tensor of ``input``'s dtype. A mean over zero counted elements is 0, with zero gradients.

    Raises:
      TypeError: ``input`` not a tensor, or of an integer or boolean dtype; a non-numeric ``target``
        dtype; a non-boolean ``where``; ``gamma``, ``alpha`` or ``label_smoothing`` given as None
        (gamma), a string or a bool.
      ValueError: ``gamma`` < 0 or not finite; ``alpha`` or ``label_smoothing`` outside [0, 1]; an
        unknown ``reduction``; a ``target``, ``gamma``, ``alpha``, ``weight``, ``pos_weight`` or
        ``where`` shape that does not broadcast to ``input``; one of them on another device than
        ``input`` (a CPU tensor may accompany accelerator logits; the meta device must match); in
        eager mode, a ``target`` outside [0, 1] at a counted element. Messages come from
        :mod:`focal_spec`.

    Examples:
      >>> import torch
      >>> from focal_torch import sigmoid_focal_loss
      >>> logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.5, 0.0]], requires_grad=True)
      >>> targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
      >>> loss = sigmoid_focal_loss(logits, targets, gamma=2.0, alpha=0.25)
      >>> print(f"{loss.item():.6f}")
      0.027677
      >>> loss.backward()
      >>> print(logits.grad.shape)
      torch.Size([2, 3])

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002.
    """
    C.check_tensor("input", input)
    dev = input.device
    if not isinstance(target, torch.Tensor):
        target = torch.as_tensor(target, device=dev)
    for name, value in (("target", target), ("gamma", gamma), ("alpha", alpha), ("weight", weight),
                        ("pos_weight", pos_weight), ("where", where)):
        C.check_device(name, value, dev)
    o = _options(
        tuple(input.shape), input.dtype, tuple(target.shape), target.dtype, gamma=C.spec_gamma(gamma),
        alpha=C.spec_value(alpha), weight_shape=C.shape_of(weight), label_smoothing=C.spec_value(label_smoothing),
        where_shape=C.shape_of(where), reduction=reduction, where_dtype=_where_dtype(where),
        pos_weight_shape=C.shape_of(pos_weight))
    cdtype = C.compute_dtype(input.dtype)
    gamma_t = None
    g_num, g_int = o.gamma, o.gamma_int
    if g_num is None or C.is_differentiated(gamma):
        if isinstance(gamma, torch.Tensor):
            gamma_t = gamma.to(device=dev, dtype=cdtype)
        elif isinstance(gamma, numbers.Real):  # symbolic under torch.compile: as_tensor would specialize it
            gamma_t = torch.ones((), dtype=cdtype, device=dev) * gamma
        else:
            gamma_t = C.as_tensor(gamma, dtype=cdtype, device=dev)
        g_num, g_int = None, None
    alpha_t = None
    a_num = o.alpha
    if o.alpha == "array" or C.is_differentiated(alpha):
        alpha_t = C.as_tensor(alpha, dtype=cdtype, device=dev)
        a_num = None
    eps: Any = label_smoothing if o.label_smoothing is None else o.label_smoothing
    if isinstance(eps, torch.Tensor):
        eps = eps.to(device=dev, dtype=cdtype)
    weight_t = C.as_tensor(weight, dtype=cdtype, device=dev)
    pw_t = C.as_tensor(pos_weight, dtype=cdtype, device=dev)
    mask = C.as_tensor(where, dtype=torch.bool, device=dev)
    if target.device != dev:
        target = target.to(dev)
    if target.dtype == torch.float64 and cdtype != torch.float64 and not target.requires_grad:
        target = target.to(cdtype)  # saved for backward: keep it no larger than the compute dtype
    checked = target.dtype == torch.bool
    if not checked and C.can_check_values(target) and (mask is None or C.can_check_values(mask)):
        _check_targets(target, mask, input.shape)
        checked = True
    opts = _Opts(g_num, g_int, a_num, o.reduction, cdtype, not checked)
    scale: torch.Tensor | float = 1.0
    if o.reduction == "mean":
        if mask is None:
            count: torch.Tensor | int = input.numel()
        else:
            count = torch.broadcast_to(mask, input.shape).sum()
        scale = _distributed.mean_scale(count, process_group, dtype=cdtype, device=dev)
    if C.is_compiling():
        fn: Any = _SigmoidFocalCompiled
    elif C.in_func_transform():
        fn = _SigmoidFocalFunc
    else:
        fn = _SigmoidFocal
    return fn.apply(input, target, alpha_t, weight_t, pw_t, gamma_t, mask, scale, eps, opts)
