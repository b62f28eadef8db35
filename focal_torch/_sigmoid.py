"""Sigmoid focal loss (binary and multi-label) with closed-form derivatives for every input."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple, cast

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
    eager: bool = False  # known on entry: plain eager call, autocast off (the eager kernels apply)


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


def _lerp(start: Any, end: Any, weight: torch.Tensor, ws: Any = None) -> torch.Tensor:
    """(1-w) start + w end for tensors or numbers: exact at w = 0 and 1 for tensors (torch.lerp); for two
    numbers start + w (end - start), exact at w = 0 and within one rounding at w = 1 (torch.lerp with 0-d
    tensor ends takes a slow broadcasting kernel on the CPU, four times the cost of a multiply-add)."""
    if isinstance(start, torch.Tensor) or isinstance(end, torch.Tensor):
        if not isinstance(start, torch.Tensor):
            start = torch.full((), start, dtype=weight.dtype, device=weight.device)
        if not isinstance(end, torch.Tensor):
            end = torch.full((), end, dtype=weight.dtype, device=weight.device)
        return torch.lerp(start, end, weight, **_new(ws, 7, weight.shape))
    return torch.mul(weight, end - start, **_new(ws, 7, weight.shape)).add_(start)


def _alpha_t(alpha: torch.Tensor | None, tp: torch.Tensor, o: _Opts, ws: Any = None,
             fold: float = 1.0) -> torch.Tensor | None:
    """α_t = (1-α)(1-t') + α t' (None without alpha); a number α's times ``fold``."""
    if alpha is not None:
        return torch.lerp(1.0 - alpha, alpha, tp)
    if o.alpha is not None:
        return _lerp((1.0 - o.alpha) * fold, o.alpha * fold, tp, ws)
    return None


# ----------------------------------------------------------------------------------------
# Eager CPU kernels: in place, piece by piece (see C.chunked), no autograd. Only for a known
# number gamma and a number label smoothing.
# ----------------------------------------------------------------------------------------


def _prepare(x, t, mask, eps, cdtype, bits):
    """Casts to the compute dtype, clears masked positions (so NaN/inf/255 there never reach the math)
    and smooths the targets."""
    if x.dtype != cdtype:
        x = x.to(cdtype)
    if t.dtype != cdtype:
        t = t.to(cdtype)
    if mask is not None:
        x, t = C.zero_unless(x, mask, bits), C.zero_unless(t, mask, bits)
    if eps:
        t = t * (1.0 - eps) + eps / 2.0
    return x, t


class _Buffers:
    """Temporaries reused by every piece of one call: a fresh large tensor per op would be faulted in anew
    each time (the allocator returns large blocks to the system). The views of each shape are kept too."""

    def __init__(self, x: torch.Tensor, dtype: torch.dtype):
        self.dtype, self.device = dtype, x.device
        self.bufs: dict[int, torch.Tensor] = {}
        self.views: dict[tuple, torch.Tensor] = {}

    def __call__(self, i: int, shape) -> torch.Tensor:
        key = (i, *shape)
        v = self.views.get(key)
        if v is None:
            n = math.prod(shape)
            b = self.bufs.get(i)
            if b is None or b.numel() < n:
                b = self.bufs[i] = torch.empty(n, dtype=self.dtype, device=self.device)
                self.views = {k: w for k, w in self.views.items() if k[0] != i}
            v = self.views[key] = b[:n].view(shape)
        return v


def _new(ws: _Buffers | None, i: int, shape) -> dict:
    """``out=`` keyword arguments for an op writing a temporary of ``shape`` (none without buffers)."""
    return {} if ws is None else {"out": ws(i, shape)}


def _factors(tp, alpha, weight, o: _Opts, ws: _Buffers | None = None, fold: float = 1.0) -> list[torch.Tensor]:
    """The per-element factors α_t and w (each present only when given), a number α's times ``fold``."""
    at = _alpha_t(alpha, tp, o, ws, fold)
    return [f for f in (at, weight) if f is not None]


def _finish_inplace(buf, factors, mask, bits) -> None:
    """Multiplies ``buf`` by the factors and clears the masked positions (NaN-safe)."""
    for f in factors:
        buf.mul_(f)
    if mask is not None:
        C.zero_unless_(buf, bits)


_SOFTPLUS_MAX = 4096
"""Up to this many elements ce comes from two softplus (three ops, where the per-op cost dominates); above,
from one log1p of min(s, s̄) (:func:`C.log1p_neg_`; each op much cheaper than a softplus)."""


def _ce_inplace(x, tp, s, sn, pw, o: _Opts, ws: _Buffers | None = None) -> torch.Tensor:
    """ce in a new buffer, from s = σ(x) and s̄ = σ(-x): with r = relu(x), r̄ = relu(-x) = r - x (exact) and
    l = log1p(e^-|x|) = -log1p(-min(s, s̄)), ce = (1-t') r + π t' r̄ + ((1-t') + π t') l. Every term is >= 0.
    (For small inputs the softplus form (1-t') sp + π t' sp̄, with fewer ops.)"""
    n = x.numel()
    if not isinstance(n, torch.SymInt) and n <= _SOFTPLUS_MAX:
        ce = F.softplus(torch.neg(x), 1.0, C.SOFTPLUS_THRESHOLD)  # sp̄
        if pw is not None:
            ce.mul_(pw)
        return F.softplus(x, 1.0, C.SOFTPLUS_THRESHOLD).lerp_(ce, tp)
    m = torch.minimum(s, sn, **_new(ws, 0, x.shape))
    nl = C.log1p_neg_(m, *(None, None) if ws is None else (ws(1, x.shape), ws(2, x.shape)))  # -l
    r = torch.clamp_min(x, 0.0, **_new(ws, 1, x.shape))
    rn = torch.sub(r, x, **_new(ws, 2, x.shape))
    if pw is None:
        return r.lerp_(rn, tp).sub_(nl)
    return r.lerp_(rn.mul_(pw), tp).sub_(nl.mul_(_lerp(1.0, pw, tp)))


def _piece(x, t, alpha, weight, pw, mask, eps, o: _Opts, *, loss: bool = True, grad: bool = False,
           ws: _Buffers | None = None, fold: float = 1.0, g_coef: float = 1.0,
           g_out: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(elementwise ℓ, dℓ/dx times ``g_coef``) of one piece, each only if asked for, sharing every intermediate:
    eager, in place, no autograd. Both come out in the compute dtype, in buffers that the next piece reuses (dℓ/dx
    in ``g_out`` where the last step can write there). Both are multiplied by ``fold`` (taken into a number α's
    α_t: no multiplication of its own)."""
    bits = None if mask is None else C.keep_bits(mask, o.cdtype)
    x, tp = _prepare(x, t, mask, eps, o.cdtype, bits)
    s = torch.sigmoid(x, **_new(ws, 3, x.shape))
    sn = torch.neg(x, **_new(ws, 4, x.shape)).sigmoid_()
    ce = _ce_inplace(x, tp, s, sn, pw, o, ws) if loss or o.gamma_int != 0 else None  # buffer 1; 0 and 2 free
    g = None
    if o.gamma_int is not None and o.gamma_int > 0:
        return _piece_whole_gamma(x, tp, s, sn, cast(torch.Tensor, ce), alpha, weight, pw, mask, bits, o,
                                  loss=loss, grad=grad, ws=ws, fold=fold, g_coef=g_coef, g_out=g_out)
    if o.gamma_int == 0:
        if grad:  # (1-t') s - π t' s̄: exactly s or -π s̄ for hard targets
            g = s.lerp_(sn.neg_() if pw is None else sn.mul_(-pw), tp)
    else:  # γ is a number that is not whole: q^(γ-1) may exceed 1 and is applied before anything can underflow
        ce = cast(torch.Tensor, ce)  # computed above where γ != 0
        q = torch.lerp(s, sn, tp, **_new(ws, 5, x.shape))
        mq = torch.clamp(q, min=_tiny(o.cdtype), **_new(ws, 6, x.shape)).pow_(cast(float, o.gamma) - 1.0)
        if grad:
            d_ce = _d_ce(s, sn, q, tp, pw, ws)
            u = torch.mul(s, sn, **_new(ws, 2, x.shape))
            u.mul_(mq)  # first: s s̄ ce may underflow where q^(γ-1) > 1
            u.mul_(ce)
            u.addcmul_(u, tp, value=-2.0)  # q^(γ-1) (1-2t') s s̄ ce = q^(γ-1) ce dq/dx
        q = q.mul_(mq)  # q^γ
        if grad:
            # q^γ dce/dx + γ q^(γ-1) ce dq/dx
            g = d_ce.mul_(q).add_(u, alpha=cast(float, o.gamma))
        if loss:
            ce = ce.mul_(q)
    factors = _factors(tp, alpha, weight, o, ws, fold)
    if loss:
        _finish_inplace(ce, factors, mask, bits)
    if grad:
        g = cast(torch.Tensor, g)
        _finish_inplace(g, factors, mask, bits)
        if g_coef != 1.0:
            g.mul_(g_coef)
    return (ce if loss else None), g


def _d_ce(s, sn, q, tp, pw, ws) -> torch.Tensor:
    """dce/dx = (1-t') s - π t' s̄ (buffer 0): q - 2t's̄ without π (one op, exact for hard targets)."""
    if pw is None:
        return torch.addcmul(q, tp, sn, value=-2.0, **_new(ws, 0, s.shape))
    return torch.lerp(s, torch.mul(sn, pw, **_new(ws, 0, s.shape)).neg_(), tp)


def _piece_whole_gamma(x, tp, s, sn, ce, alpha, weight, pw, mask, bits, o: _Opts, *, loss: bool, grad: bool,
                       ws: _Buffers | None, fold: float, g_coef: float, g_out: torch.Tensor | None
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:func:`_piece` for a whole γ >= 1, where q^(γ-1) <= 1 is a product (q itself for γ = 2), as
    ℓ = A · q ce and dℓ/dx = γ A · (ce dq/dx + q dce/dx / γ), with A = a q^(γ-1) formed once for both."""
    q = torch.lerp(s, sn, tp, **_new(ws, 5, x.shape))
    gi = cast(int, o.gamma_int)
    g = None
    if grad:
        d_ce = _d_ce(s, sn, q, tp, pw, ws)
        g = torch.mul(s, sn, **_new(ws, 2, x.shape))
        g.addcmul_(g, tp, value=-2.0).mul_(ce)  # (1-2t') s s̄ ce = ce dq/dx
        g.addcmul_(q, d_ce, value=1.0 / gi)
    factors = _factors(tp, alpha, weight, o, ws, fold)
    if gi > 1:
        factors.append(C.ipow(q, gi - 1, inplace=False))
    a = None
    if len(factors) == 1:
        a = factors[0]
    elif factors:
        a = torch.mul(factors[0], factors[1], **_new(ws, 6, x.shape))
        for f in factors[2:]:
            a.mul_(f)
    if loss:
        ce = ce.mul_(q)
        _finish_inplace(ce, [] if a is None else [a], mask, bits)
    if grad:
        g = cast(torch.Tensor, g)
        if a is not None:
            g = torch.mul(g, a, **({} if g_out is None else {"out": g_out}))
        if gi * g_coef != 1.0:
            g.mul_(gi * g_coef)
        if mask is not None:
            C.zero_unless_(g, bits)
    return (ce if loss else None), g


FUSE_MAX = 1 << 62
"""Inputs of at most this many elements (every input, unless a test lowers it) compute dℓ/dx with the loss in the
forward pass and keep it, with the targets, for a backward of one multiplication: two arrays of the input's size,
the bytes ``F.binary_cross_entropy_with_logits`` keeps (the logits and the targets). Larger ones keep only the
inputs and the backward recomputes (measured at 2^23 elements on 2 cores: 0.6x the cross-entropy's time fused,
1.0-1.2x recomputed)."""

_BUFFERED = 1 << 15
"""Inputs above this many elements reuse temporaries across pieces (:class:`_Buffers`)."""


def _eager(x, t, alpha, weight, pw, mask, eps, o: _Opts, scale, *, loss: bool, grad: bool, coef: Any = None,
           scale_grad: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The eager kernels over the pieces of :func:`C.chunked`: (loss after reduction, dℓ/dx [times ``coef``;
    times the mean's ``scale`` with ``scale_grad``])."""
    n = x.numel()
    ws = _Buffers(x, o.cdtype) if n > _BUFFERED else None
    fmt = torch.contiguous_format if x.is_contiguous() else torch.preserve_format
    per_element = o.reduction == "none" and isinstance(coef, torch.Tensor)
    operands = (t, alpha, weight, pw, mask, coef if per_element else None)
    pieces = [(None, (x, *operands))] if ws is None else list(C.chunked(x, *operands))
    whole = len(pieces) == 1 and ws is None  # one piece in fresh tensors: keep them, no copies
    g_out = None if (not grad or whole) else torch.empty_like(x, dtype=o.cdtype, memory_format=fmt)
    l_out = None if (not loss or o.reduction != "none" or whole) else torch.empty_like(x, memory_format=fmt)
    sums = []
    total = g = None
    # one piece of a mean with a number α: the mean's factor is taken into α_t (for the loss and the gradient)
    fold = (whole and o.reduction == "mean" and type(scale) is float and alpha is None and o.alpha is not None
            and coef is None and (scale_grad or not grad))
    if scale_grad and not fold:
        coef = scale if coef is None else coef * scale
    k = coef if per_element else (None if coef is None else C.scalar_or_tensor(coef))
    for region, (xp, tp, ap, wp, pp, mp, cp) in pieces:
        if not per_element:
            cp = k
        dst = None if g_out is None else C.piece_of(g_out, region)
        number = isinstance(cp, float)
        lp, gp = _piece(xp, tp, ap, wp, pp, mp, eps, o, loss=loss, grad=grad, ws=ws, fold=scale if fold else 1.0,
                        g_coef=cast(float, cp) if number else 1.0, g_out=dst)
        if gp is not None and cp is not None and not number:
            gp = gp.mul_(cp)
        if whole:
            g, total = gp, lp
            if lp is not None and o.reduction != "none":
                sums.append(lp.sum())
            break
        if gp is not None and gp.data_ptr() != cast(torch.Tensor, dst).data_ptr():  # not written in place
            cast(torch.Tensor, dst).copy_(gp)
        if lp is not None:
            if l_out is not None:
                C.piece_of(l_out, region).copy_(lp)
            else:
                sums.append(lp.sum())  # a cascade sum per piece; the pieces are added in float64
    if not whole:
        g, total = g_out, l_out
    if loss and o.reduction != "none":
        total = sums[0] if len(sums) == 1 else torch.stack(sums).to(torch.float64).sum()
        if o.reduction == "mean" and not fold:
            total = total * scale
    if total is not None and total.dtype != x.dtype:
        total = total.to(x.dtype)
    return total, g


# ----------------------------------------------------------------------------------------
# Plain, out-of-place formulas: used under torch.compile and torch.func, for forward-mode AD,
# for a tensor gamma, for the gradients of inputs other than the logits, and inside a backward
# that autograd differentiates again. Powers carry the value of torch.pow (correctly rounded)
# and the derivative of exp(e log q) (finite at any logit, also twice differentiated).
# ----------------------------------------------------------------------------------------


def _grad_tracked(*ts) -> bool:
    return torch.is_grad_enabled() or any(C.is_transformed(t) or C.has_tangent(t) for t in ts if t is not None)


class _Variant(NamedTuple):
    """The options of :mod:`focal_spec.variants` on this loss, validated."""

    poly1: float
    normalized: bool
    threshold: float | None
    schedule: focal_spec.GammaSchedule | None
    process_group: Any  # with normalized: Σm is summed over its ranks


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

    # σ(±x) with torch's values, and derivatives of every order that keep their e^-|x| tails where autograd
    # differentiates them (the closed-form dℓ/dx below is made of them): torch's sigmoid derivative y (1 - y) is 0
    # once σ(x) rounds to 1. Where that tail is at stake, σ(x) is differentiated as 1 - σ(-x), whose derivative
    # σ(-x) (1 - σ(-x)) is a small number formed directly.

    def _tailed(self, name: str, value, tail, use_tail):
        def fn():
            v = value()
            if not self.smooth:
                return v
            acc = torch.where(use_tail(), tail(), v)
            return v.detach() + (acc - acc.detach())
        return self._get(name, fn)

    def _sig(self, sign: int) -> torch.Tensor:
        return self._get(f"sig{sign}", lambda: torch.sigmoid(self.x if sign > 0 else -self.x))

    @property
    def s(self):
        return self._tailed("s", lambda: self._sig(1), lambda: 1.0 - self._sig(-1), lambda: self.x > 0)

    @property
    def sn(self):
        return self._tailed("sn", lambda: self._sig(-1), lambda: 1.0 - self._sig(1), lambda: self.x < 0)

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

    def power(self, e: Any, th: float | None = None) -> torch.Tensor:
        """q^e for a number or tensor exponent e, or (q/th)^e where p_t >= th (and 1 elsewhere) with a reduced
        threshold th: exactly 1 where e = 0 (no 0^0), the base clamped to tiny."""
        q = self.q
        log_q = self.log_q if self.smooth else None
        if th is not None:
            below = q.detach() > 1.0 - th  # p_t < th: the caller keeps 1 there; this branch sees 1 too
            q = torch.where(below, th, q) / th
            log_q = None if log_q is None else torch.where(below, 0.0, log_q - math.log(th))
        if isinstance(e, int):
            return C.ipow(q, e, inplace=False) if e > 0 else torch.ones_like(q)
        qc = torch.clamp(q, min=_tiny(self.o.cdtype))
        if log_q is None:
            v = torch.pow(qc, e)
        else:
            smooth = torch.exp(e * log_q)
            v = torch.pow(qc.detach(), e.detach() if isinstance(e, torch.Tensor) else e) + (smooth - smooth.detach())
        if isinstance(e, torch.Tensor):
            v = torch.where(e == 0, 1.0, v)
        return v

    def variant_loss(self, v: _Variant) -> torch.Tensor:
        """ℓ with the options of :mod:`focal_spec.variants` (a γ schedule, a reduced threshold, Poly-1's term,
        the normalizer Σm), as plain differentiable ops: autograd differentiates them."""
        o = self.o
        qd = self.q.detach()  # decisions on p_t are made on 1 - p_t, exact where p_t rounds to 1
        if v.schedule is not None:
            g: Any = torch.full_like(qd, v.schedule.values[0])
            for th, value in zip(v.schedule.thresholds, v.schedule.values[1:], strict=True):
                g = torch.where(qd <= 1.0 - th, value, g)  # p_t >= th
        elif o.gamma is None:
            g = self.gamma
        else:
            g = o.gamma_int if o.gamma_int is not None else o.gamma
        if v.threshold is None:
            m = self.power(g)
        else:
            m = torch.where(qd > 1.0 - v.threshold, 1.0, self.power(g, v.threshold))
        out = m * self.ce
        if v.poly1:
            out = out + v.poly1 * self.power(g + 1)  # ε₁ (1-p_t)^(γ+1)
        out = self.times(out, self.scale())
        if v.normalized:  # ℓ / Σm over the counted elements (of every rank); 0 where Σm is exactly 0
            z = self.counted(m).sum()
            if v.process_group is not None:
                z = _distributed.differentiable_sum(z, v.process_group)
            nz = z != 0
            out = torch.where(nz, out / torch.where(nz, z, 1.0), 0.0)
        return out

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
        """γ q^(γ-1) d_q ce + q^γ d_ce: the derivative of q^γ ce from those of ce and q (exactly d_ce at γ = 0).

        For a γ that is not a whole number this is q^γ (γ (d_q / q) ce + d_ce). Where q is small, q^(γ-1) is large
        and d_q and ce are both of q's order, so the product γ q^(γ-1) d_q ce, differentiated by autograd (a
        Hessian, a double backward), would form d_q ce ~ q² on the way: subnormal in float32 from q < 1e-19
        (|x| > 44), which cost the second derivative its digits. d_q / q stays of order 1."""
        o = self.o
        if o.gamma == 0.0:
            return d_ce
        gam = self.gamma if o.gamma is None else o.gamma
        if o.gamma_int is not None:
            return gam * self.m_over_q() * d_q * self.ce + self.m * d_ce
        return self.m * (gam * (d_q / torch.clamp(self.q, min=_tiny(o.cdtype))) * self.ce + d_ce)

    def d_x(self) -> torch.Tensor:
        d_ce = torch.lerp(self.s, -self.sn if self.pw is None else -self.pw * self.sn, self.tp)
        d_q = None if self.o.gamma == 0.0 else torch.rsub(self.tp, 1.0, alpha=2.0) * self.s * self.sn
        return self.times(self._focal(d_ce, d_q), self.scale())

    def d_tp(self) -> torch.Tensor:
        d_ce = self.pspn - self.sp
        d_q = None if self.o.gamma == 0.0 else self.sn - self.s
        g = self.times(self._focal(d_ce, d_q), self.scale())
        a = self.alpha if self.alpha is not None else self.o.alpha
        if a is not None:
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
    """Whether the eager kernels apply: a number gamma and smoothing, no transform, no compile (on the CPU the
    input is processed piece by piece; on an accelerator in whole-tensor kernels)."""
    if o.eager:
        return True
    if o.gamma is None or isinstance(eps, torch.Tensor) or C.is_compiling():
        return False
    for t in ts:
        if isinstance(t, torch.Tensor) and C.is_transformed(t):
            return False
    return True


def _forward(x, t, alpha, weight, pw, gamma, mask, scale, eps, o: _Opts, grad: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, dℓ/dx of the reduced loss per unit of its cotangent, when ``grad`` and the eager kernels apply)."""
    with C.no_autocast(x.device, o.eager):
        if not _fast(o, eps, x, t, alpha, weight, pw, mask, scale):
            loss = _reduce(_Parts(x, t, alpha, weight, pw, gamma, mask, eps, o).loss(), o, scale)
            return loss.to(x.dtype), None
        # with loss=True the loss is a tensor
        return cast("tuple[torch.Tensor, torch.Tensor | None]",
                    _eager(x, t, alpha, weight, pw, mask, eps, o, scale, loss=True, grad=grad,
                           scale_grad=grad and o.reduction == "mean"))


def _save(ctx, x, t, alpha, weight, pw, gamma, mask, scale, eps, o: _Opts, grad_x=None) -> None:
    """Saves the inputs (numbers as attributes) and a precomputed dℓ/dx; the rules recompute the rest."""
    ctx.o = o
    ctx.x_dtype = x.dtype
    ctx.scale_value = None if isinstance(scale, torch.Tensor) else scale
    ctx.eps_value = None if isinstance(eps, torch.Tensor) else eps
    saved = (x, t, alpha, weight, pw, gamma, mask, scale if ctx.scale_value is None else None,
             eps if ctx.eps_value is None else None)
    ctx.has_grad_x = grad_x is not None
    if ctx.has_grad_x:  # dℓ/dx takes the logits' place (a double backward finds them by a weak reference)
        C.hold_logits(ctx, x)
        C.keep(ctx, grad_x)
        ctx.save_for_backward(None, *saved[1:])
    else:
        ctx.save_for_backward(*saved)
    if not o.eager:  # a plain eager call runs outside forward-mode AD
        ctx.save_for_forward(*saved)


def _unpack(ctx):
    x, t, alpha, weight, pw, gamma, mask, scale, eps = ctx.saved_tensors
    if x is None:
        x = C.held_logits(ctx, "sigmoid_focal_loss")
    if ctx.scale_value is not None:
        scale = ctx.scale_value
    if ctx.eps_value is not None:
        eps = ctx.eps_value
    return x, t, alpha, weight, pw, gamma, mask, scale, eps


def _backward(ctx, grad_out):
    o: _Opts = ctx.o
    g = ctx.kept if ctx.has_grad_x and not torch.is_grad_enabled() else None
    if g is not None:  # dℓ/dx came with the loss: one multiplication
        with C.no_autocast(g.device, o.eager):
            if o.reduction != "none" and C.hand_over(ctx, g, grad_out, ctx.x_dtype):  # loss.backward()
                return (g, *(None,) * 9)
            coef = grad_out if grad_out.dtype == g.dtype else grad_out.to(g.dtype)
            g = g * coef  # (the mean's scale is in g already)
            return (g if g.dtype == ctx.x_dtype else g.to(ctx.x_dtype), *(None,) * 9)
    x, t, alpha, weight, pw, gamma, mask, scale, eps = _unpack(ctx)
    need = ctx.needs_input_grad
    grads: list[Any] = [None] * 10
    with C.no_autocast(x.device):
        cd = o.cdtype
        if o.reduction == "none":
            coef: Any = grad_out.to(cd)
        else:
            coef = grad_out.to(cd) * scale if o.reduction == "mean" else grad_out.to(cd)
        if (need[0] and not torch.is_grad_enabled()
                and _fast(o, eps, x, t, alpha, weight, pw, mask, grad_out, scale)):
            if o.reduction == "mean":  # as the forward forms it (the mean's factor where it puts it), times grad_out
                grads[0] = _eager(x, t, alpha, weight, pw, mask, eps, o, scale, loss=False, grad=True,
                                  scale_grad=True)[1] * grad_out.to(cd)
            else:
                grads[0] = _eager(x, t, alpha, weight, pw, mask, eps, o, scale, loss=False, grad=True, coef=coef)[1]
            grads[0] = grads[0].to(x.dtype)
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
    """Eager mode (and forward-mode AD through ``jvp``). A reduced loss is reduced inside. Inputs of at most
    :data:`FUSE_MAX` elements whose only gradient is dℓ/dx get it computed with the loss and saved; larger ones
    save nothing of the input's size but the inputs."""

    @staticmethod
    def forward(ctx, x, t, alpha, weight, pw, gamma, mask, scale, eps, o):
        need = ctx.needs_input_grad
        fuse = need[0] and x.numel() <= FUSE_MAX and not (need[1] or need[2] or need[3] or need[4] or need[5])
        loss, grad_x = _forward(x, t, alpha, weight, pw, gamma, mask, scale, eps, o, fuse)
        _save(ctx, x, t, alpha, weight, pw, gamma, mask, scale, eps, o, grad_x)
        return loss

    backward = staticmethod(_backward)
    jvp = staticmethod(_jvp)


_apply_plain = _SigmoidFocal.apply


class _SigmoidFocalCompiled(torch.autograd.Function):
    """What ``torch.compile`` traces: the same, without ``jvp`` (Dynamo does not trace a custom one)."""

    @staticmethod
    def forward(ctx, x, t, alpha, weight, pw, gamma, mask, scale, eps, o):
        _save(ctx, x, t, alpha, weight, pw, gamma, mask, scale, eps, o)
        return _forward(x, t, alpha, weight, pw, gamma, mask, scale, eps, o)[0]

    backward = staticmethod(_backward)


class _SigmoidFocalFunc(torch.autograd.Function):
    """Under ``torch.func`` transforms: ``setup_context`` style, with a vmap rule generated from the plain
    formulas (which every input takes there) and ``jvp`` for ``jacfwd``/``hessian``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, t, alpha, weight, pw, gamma, mask, scale, eps, o):
        return _forward(x, t, alpha, weight, pw, gamma, mask, scale, eps, o)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, *inputs)

    backward = staticmethod(_backward)
    jvp = staticmethod(_jvp)


# ----------------------------------------------------------------------------------------
# Validation: cached on the hashable static facts of a call.
# ----------------------------------------------------------------------------------------


# typed: True and 1 (or 0.0 and False) are equal keys of an untyped cache, and only one of them is a valid γ
_options_cached = functools.lru_cache(maxsize=512, typed=True)(focal_spec.sigmoid_options)


def _hashable(v: Any) -> bool:
    return v is None or type(v) in (int, float, str, bool)


def _options(x_shape, x_dtype, t_shape, t_dtype, **kw) -> focal_spec.SigmoidOptions:
    if not C.is_compiling() and all(_hashable(kw[k]) for k in ("gamma", "alpha", "label_smoothing", "reduction")):
        return _options_cached(x_shape, x_dtype, t_shape, t_dtype, **kw)
    return focal_spec.sigmoid_options(x_shape, x_dtype, t_shape, t_dtype, **kw)


class _Plain(NamedTuple):
    o: _Opts
    eps: float


_PLAIN: dict[tuple, _Plain | None] = {}
_NUMBER = (int, float)


def _plain_call(input: torch.Tensor, target: torch.Tensor, gamma: Any, alpha: Any, label_smoothing: Any,
                reduction: Any) -> tuple[_Plain, float] | None:
    """The common call, with little Python between the user and the kernels: plain tensors, number options, no
    weight, pos_weight, where or process group, eager, outside ``torch.func`` and forward-mode AD, autocast off.
    Its options are validated by the spec once per static facts (shapes, dtypes, device, option values) and
    cached; the targets' values are checked at every call. None: the general path applies."""
    if (type(gamma) not in _NUMBER or not (alpha is None or type(alpha) in _NUMBER)
            or type(label_smoothing) not in _NUMBER or type(reduction) is not str or target.requires_grad
            or not C.plain_eager(input, target)):
        return None
    dev = input.device
    if dev.type not in ("cpu", "cuda") or torch.is_autocast_enabled(dev.type):
        return None
    key = (input.shape, input.dtype, dev, target.shape, target.dtype, target.device, gamma, alpha, label_smoothing,
           reduction)
    plain = _PLAIN.get(key)
    if plain is None:
        if key in _PLAIN:
            return None
        if target.device != dev:
            _PLAIN[key] = None
            return None
        o = _options(tuple(input.shape), input.dtype, tuple(target.shape), target.dtype, gamma=gamma, alpha=alpha,
                     weight_shape=None, label_smoothing=label_smoothing, where_shape=None, reduction=reduction,
                     where_dtype="bool", pos_weight_shape=None)
        # number alpha and label smoothing (checked above): never "array" nor None
        opts = _Opts(o.gamma, o.gamma_int, cast("float | None", o.alpha), o.reduction, C.compute_dtype(input.dtype),
                     False, True)
        if len(_PLAIN) > 512:
            _PLAIN.clear()
        plain = _PLAIN[key] = _Plain(opts, cast(float, o.label_smoothing))
    if target.dtype != torch.bool:
        _check_targets(target, None, input.shape)
    n = input.numel()
    return plain, (1.0 / n if n else 0.0)


def _check_targets(target: torch.Tensor, mask: torch.Tensor | None, shape) -> None:
    """Eager: a target outside [0, 1] at a counted element raises (one reduction over the targets; on an
    accelerator it costs one host sync)."""
    if target.dtype == torch.bool or target.numel() == 0:
        return
    t = target.detach() if target.requires_grad else target
    lo, hi = torch.aminmax(C.min_max_ready(t))
    if lo.item() >= 0 and hi.item() <= 1:  # NaN fails both
        return
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
    poly1: float = 0.0,
    normalized: bool = False,
    reduced_threshold: float | None = None,
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
    forms: computed with the loss and kept for inputs of at most :data:`FUSE_MAX` elements (one array of
    the input's size), recomputed from the saved inputs above it. Every kernel is a sequence of ATen
    operations, run piece by piece (pieces that stay in cache) in place; nothing is compiled behind the
    call. The derivatives are themselves differentiable (double
    backward, Hessians; where dℓ/dx was kept in place of the logits, a double backward needs the logits still
    alive and unmodified: they are held by a weak reference, not saved), and ``torch.func`` (``grad``,
    ``vmap``, ``jacrev``, ``jacfwd``, ``hessian``), forward-mode AD and ``torch.compile(fullgraph=True)`` apply.

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
      poly1: :math:`\varepsilon_1` of Poly-1 (Leng et al. 2022), any finite number (keyword only):
        adds :math:`\alpha_t w \varepsilon_1 (1-p_t)^{\gamma+1}` to each element; 0 is off.
      normalized: ``True`` divides each element's loss by :math:`\sum m` over the counted elements
        (:math:`m` the modulators, gradient included) before ``reduction``; at :math:`\gamma = 0`,
        ``"sum"`` is then the mean cross-entropy. With a ``process_group`` the sum runs over every
        rank's counted elements (differentiably), so that DDP's averaged gradients are those of the
        global normalized mean.
      reduced_threshold: ``None`` (off) or :math:`th \in (0, 1]`: the modulator is 1 where
        :math:`p_t < th` and :math:`((1-p_t)/th)^\gamma` elsewhere (reduced focal loss).
        These three, and a ``gamma`` given as a :class:`focal_spec.GammaSchedule` (one
        :math:`\gamma` per element from the detached :math:`p_t`, such as ``focal_spec.FLSD_53``),
        are defined and validated by :mod:`focal_spec.variants` and computed by plain
        differentiable formulas (``_Parts.variant_loss``); the defaults change nothing.

    Gradients flow to every floating tensor that requires them: ``input``, ``target``, ``alpha``,
    ``weight``, ``pos_weight`` and ``gamma`` (:math:`d\ell/d\gamma = \ell \log(1-p_t)`), with closed
    forms; a tensor that broadcasts gets the sum over the broadcast dims.

    What is checked when: types, dtypes, shapes and every number option at each call (cached on
    these static facts). Tensor ``alpha`` and ``gamma`` values are range-checked when they are
    CPU tensors outside ``torch.compile`` that no ``torch.func`` transform wraps; on an accelerator
    or when traced only their shapes are. ``target`` values at counted elements are checked in eager
    mode (one reduction; on an accelerator one host sync); under ``torch.compile``, on targets a
    ``torch.func`` transform wraps or on the meta device that check cannot run, and an element with a
    target outside [0, 1] gets a NaN loss.

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
    variant = None
    if (poly1 != 0.0 or normalized is not False or reduced_threshold is not None
            or isinstance(gamma, focal_spec.GammaSchedule)):
        schedule = gamma if isinstance(gamma, focal_spec.GammaSchedule) else None
        variant = _Variant(focal_spec.variants.check_poly1(poly1), focal_spec.variants.check_normalized(normalized),
                           focal_spec.variants.check_reduced_threshold(reduced_threshold), schedule, process_group)
        if schedule is not None:
            gamma = 0.0  # validated by the schedule itself; the formulas read the schedule
    elif (weight is None and pos_weight is None and where is None and process_group is None
            and type(input) is torch.Tensor and type(target) is torch.Tensor):
        plain = _plain_call(input, target, gamma, alpha, label_smoothing, reduction)
        if plain is not None:
            plain_opts, plain_scale = plain
            try:
                return _apply_plain(input, target, None, None, None, None, None, plain_scale, plain_opts.eps,
                                    plain_opts.o)
            except RuntimeError:
                if not C.functions_refused():
                    raise
                # a torch.func transform that wrapped neither tensor: the general path's Function serves
    target = C.checked_target(input, target, gamma=gamma, alpha=alpha, weight=weight, pos_weight=pos_weight,
                              where=where)
    dev = input.device
    focal_spec.check_weight("weight", C.spec_value(weight))  # values: outside the cached validation
    focal_spec.check_weight("pos_weight", C.spec_value(pos_weight))
    o = _options(
        tuple(input.shape), input.dtype, tuple(target.shape), target.dtype, gamma=C.spec_gamma(gamma),
        alpha=C.spec_unit("alpha", alpha), weight_shape=C.shape_of(weight),
        label_smoothing=C.spec_unit("label_smoothing", label_smoothing),
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
    opts = _Opts(g_num, g_int, cast("float | None", a_num), o.reduction, cdtype, not checked, False)  # not "array"
    scale: torch.Tensor | float = 1.0
    if o.reduction == "mean":
        if mask is None:
            count: torch.Tensor | int = input.numel()
        else:
            count = torch.broadcast_to(mask, input.shape).sum()
        scale = _distributed.mean_scale(count, process_group, dtype=cdtype, device=dev)
    if variant is not None:  # the plain formulas, differentiated by autograd
        with C.no_autocast(dev):
            loss = _Parts(input, target, alpha_t, weight_t, pw_t, gamma_t, mask, eps, opts).variant_loss(variant)
            return _reduce(loss, opts, scale).to(input.dtype)
    args = (input, target, alpha_t, weight_t, pw_t, gamma_t, mask, scale, eps, opts)
    if C.is_compiling():
        return _SigmoidFocalCompiled.apply(*C.distinct(args))
    if not C.any_transformed(*args[:9]):
        try:
            return _SigmoidFocal.apply(*args)
        except RuntimeError:
            if not C.functions_refused():
                raise
            # a torch.func transform that wrapped none of the tensors: the setup_context form below
    return _SigmoidFocalFunc.apply(*args)
