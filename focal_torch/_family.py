"""The focal family for PyTorch: asymmetric, quality focal and varifocal losses, their modules, and
class-balanced weights.

Every variant is one elementwise formula of a sanitized logit x and target t (see
:mod:`focal_spec._variants` for the definitions). Everything else is shared by :func:`_family_loss`:
validation by :func:`focal_spec.family_options`, the compute dtype, masking before any math, the
out-of-range target rule, label smoothing, ``weight`` and the reduction. Adding a variant means
writing its elementwise formula, a functional that names its options and a module that stores them.

The formulas are plain, smooth tensor ops differentiated by autograd, so double backward,
``torch.func`` (``grad``, ``vmap``, ``jacrev``), forward-mode AD and ``torch.compile`` apply. Every
quantity is built from e = exp(-|x|) with one-sided pieces, each power is a product or
``exp(k · log u)`` of a log-space ``u``, and every branch that a ``where`` leaves unselected is itself
finite: values, gradients and Hessians stay finite at any logit and for any exponent, 0 and
fractional ones included. In eager mode, when only the logits need a gradient, ASL and QFL run
closed-form kernels instead (in place, piece by piece, the gradient recomputed from the saved inputs);
a backward pass that builds a graph (double backward) differentiates the plain formula there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import focal_spec
from focal_torch import _common as C
from focal_torch import _distributed, _modules

_variants = focal_spec.variants

# ----------------------------------------------------------------------------------------
# Elementwise pieces.
# ----------------------------------------------------------------------------------------


class _Sigmoid(NamedTuple):
    s: torch.Tensor  # σ(x)
    sn: torch.Tensor  # σ(-x) = 1 - σ(x)
    sp_neg: torch.Tensor  # softplus(-x) = -log σ(x)
    sp_pos: torch.Tensor  # softplus(x) = -log σ(-x)


def _sigmoid(x: torch.Tensor) -> _Sigmoid:
    """σ(±x) and -log σ(±x) from e = exp(-|x|), each without cancellation and with accurate derivatives
    (exp(-|x|) is spelled per side so that its derivative at 0 is one-sided, not 0)."""
    pos = x >= 0
    e = torch.exp(torch.where(pos, -x, x))
    inv = 1.0 / (1.0 + e)
    ei = e * inv
    l1pe = torch.log1p(e)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return _Sigmoid(torch.where(pos, inv, ei), torch.where(pos, ei, inv), l1pe + torch.where(pos, zero, -x),
                    l1pe + torch.where(pos, x, zero))


def _power(u: torch.Tensor, log_u: Callable[[], torch.Tensor], k: float) -> torch.Tensor | float:
    """u^k for u in [0, 1]: 1 at k = 0 (no 0^0), products for a whole k up to 8, else exp(k log u)."""
    if k == 0.0:
        return 1.0
    if float(k).is_integer() and k <= 8:
        return C.ipow(u, int(k), inplace=False)
    return torch.exp(k * log_u())


def _cross_entropy(p: _Sigmoid, t: torch.Tensor) -> torch.Tensor:
    """-t log σ(x) - (1-t) log σ(-x): two non-negative terms for t in [0, 1]."""
    return t * p.sp_neg + (1.0 - t) * p.sp_pos


def _asymmetric(x: torch.Tensor, t: torch.Tensor, *, gamma_pos: float, gamma_neg: float,
                clip: float) -> torch.Tensor:
    """t σ(-x)^γ₊ (-log σ(x)) + (1-t) p_m^γ₋ (-log(1-p_m)), p_m = max(σ(x) - m, 0)."""
    p = _sigmoid(x)
    pos = _power(p.sn, lambda: -p.sp_pos, gamma_pos) * p.sp_neg
    if clip == 0.0:
        neg = _power(p.s, lambda: -p.sp_neg, gamma_neg) * p.sp_pos
    else:
        active = p.s > clip
        pm = torch.where(active, p.s - clip, 0.5)  # 0.5 keeps both logarithms below finite where inactive
        # -log(1 - p_m): log1p for a small p_m, and the sum σ(-x) + m (never a difference) for a large one
        nll = torch.where(pm < 0.5, -torch.log1p(-pm), -torch.log(p.sn + clip))
        neg = torch.where(active, _power(pm, lambda: torch.log(pm), gamma_neg) * nll, 0.0)
    return t * pos + (1.0 - t) * neg


def _quality_focal(x: torch.Tensor, t: torch.Tensor, *, beta: float) -> torch.Tensor:
    """|t - σ(x)|^β ce(x, t), with t - σ(x) = t σ(-x) - (1-t) σ(x) (exact for hard targets)."""
    p = _sigmoid(x)
    d = torch.abs(t * p.sn - (1.0 - t) * p.s)
    if beta == 0.0 or float(beta).is_integer() and beta <= 8:
        return _power(d, lambda: d, beta) * _cross_entropy(p, t)
    # log|d|: -softplus(±x) for hard targets (smooth at any logit); for soft ones log|d| floored at the
    # smallest normal number, and |d|^β = 0 where d = 0. The soft branch sees |d| = 1 at hard targets.
    one, zero = t == 1, t == 0
    soft_d = torch.where(one | zero, 1.0, d)
    log_soft = torch.log(torch.clamp(soft_d, min=torch.finfo(d.dtype).tiny))
    log_d = torch.where(one, -p.sp_pos, torch.where(zero, -p.sp_neg, log_soft))
    return torch.where(soft_d == 0, 0.0, torch.exp(beta * log_d)) * _cross_entropy(p, t)


def _varifocal(x: torch.Tensor, t: torch.Tensor, *, alpha: float, gamma: float) -> torch.Tensor:
    """ce(x, q) · (q where q > 0, else α σ(x)^γ)."""
    p = _sigmoid(x)
    return torch.where(t > 0, t, alpha * _power(p.s, lambda: -p.sp_neg, gamma)) * _cross_entropy(p, t)


# ----------------------------------------------------------------------------------------
# Eager kernels: the same losses with closed-form derivatives, in place and piece by piece (see
# C.chunked), without autograd. Notation: s = σ(x), s̄ = σ(-x), a = softplus(-x) = -log s,
# b = softplus(x) = -log s̄, for t in [0, 1]:
#
#   ASL  ℓ = t s̄^γ₊ a + (1-t) p_m^γ₋ ν,     p_m = max(s - m, 0), ν = -log(1 - p_m)  (m = 0: p_m = s, ν = b)
#        dℓ/dx = -t s̄^γ₊ (γ₊ s a + s̄) + (1-t) s s̄ p_m^(γ₋-1) (γ₋ ν + p_m / (1 - p_m))
#                                            (m = 0: (1-t) s^γ₋ (γ₋ s̄ b + s))
#   QFL  ℓ = |d|^β ce,   d = t - s = t s̄ - (1-t) s,   ce = t a + (1-t) b
#        dℓ/dx = -sign(d) |d|^(β-1) (β s s̄ ce + d²)
#
# Every sum is of terms of one sign (the ASL gradient's two terms, for soft targets, are the
# parts a float64 reference adds too), each logarithm is a softplus or a log1p of a quantity
# below 1/2 (or of -p_m, exact as 1 - p_m), and the only roundings are those of s - m and of
# t - s that no float formula avoids. The plain formulas above remain what torch.compile,
# torch.func, forward-mode AD and double backward differentiate.
# ----------------------------------------------------------------------------------------

EAGER_KERNELS = True
"""When False, every call takes the plain formulas (differentiated by autograd): the tests set it to
check those on the same grid as the kernels."""


def _softplus(x: torch.Tensor, negate: bool = False) -> torch.Tensor:
    """softplus(±x) in a new tensor (-log σ(∓x), accurate at any logit)."""
    return F.softplus(torch.neg(x) if negate else x, 1.0, C.SOFTPLUS_THRESHOLD)


def _pow_(u: torch.Tensor, k: float, *, floor: bool = False) -> torch.Tensor | None:
    """u^k for u >= 0, possibly in place (None for k = 0: a factor of 1). Products for a whole k up to 8,
    else ``pow`` (0^k = 0 for k > 0); ``floor`` raises u to the smallest normal number first, so that a
    negative k gives a finite number at u = 0 (to be multiplied by 0 there)."""
    if k == 0.0:
        return None
    if float(k).is_integer() and 0 < k <= 8:
        return C.ipow(u, int(k), inplace=True)
    if floor:
        u = u.clamp_(min=torch.finfo(u.dtype).tiny)
    return u.pow_(k)


def _times_(v: torch.Tensor, f: torch.Tensor | None) -> torch.Tensor:
    return v if f is None else v.mul_(f)


def _sided_ce(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, sn: torch.Tensor) -> torch.Tensor:
    """ce = t a + (1-t) b in a new tensor, as (1-t) relu(x) + t relu(-x) + log(1 + e^-|x|), the last from
    -log1p(-min(s, s̄)): one logarithm, every term >= 0."""
    lg = C.log1p_neg_(torch.minimum(s, sn))  # -log(1 + e^-|x|)
    r = torch.clamp_min(x, 0.0)
    return r.lerp_(torch.sub(r, x), t).sub_(lg)


def _asl_nu(pm: torch.Tensor, one_minus: torch.Tensor) -> torch.Tensor:
    """ν = -log(1 - p_m): -log1p(-p_m) below p_m = 1/2, where 1 - p_m is exact; above, -log of 1 - p_m formed as
    the sum min(s̄ + m, 1) (``one_minus``), never as the difference, which loses the digits of a small s̄ + m."""
    return torch.where(pm < 0.5, torch.neg(pm).log1p_().neg_(), torch.log(one_minus).neg_())


def _asl_loss_(x: torch.Tensor, t: torch.Tensor, *, gamma_pos: float, gamma_neg: float,
               clip: float) -> torch.Tensor:
    pos = _softplus(x, negate=True)
    if gamma_pos != 0.0:
        # _pow_ returns None only for an exponent of 0, excluded by the test above
        pos.mul_(_pow_(torch.neg(x).sigmoid_(), gamma_pos))  # type: ignore[arg-type]
    if clip != 0.0:
        pm = torch.sigmoid(x).sub_(clip).clamp_min_(0.0)
        neg = _asl_nu(pm, torch.neg(x).sigmoid_().add_(clip).clamp_max_(1.0))
    else:
        pm = torch.sigmoid(x)
        neg = _softplus(x)
    return _times_(neg, _pow_(pm, gamma_neg)).lerp_(pos, t)


def _asl_grad_(x: torch.Tensor, t: torch.Tensor, *, gamma_pos: float, gamma_neg: float,
               clip: float) -> torch.Tensor:
    s = torch.sigmoid(x)
    sn = torch.neg(x).sigmoid_()
    if gamma_pos == 0.0:
        dpos = torch.neg(sn)
    else:  # -s̄^γ₊ (γ₊ s a + s̄)
        dpos = _softplus(x, negate=True).mul_(s).mul_(gamma_pos).add_(sn)
        # _pow_ returns None only for an exponent of 0, excluded by the test above
        dpos.mul_(_pow_(sn.clone(), gamma_pos)).neg_()  # type: ignore[arg-type]
    if clip != 0.0:
        pm = torch.sub(s, clip).clamp_min_(0.0)
        one_minus = torch.add(sn, clip).clamp_max_(1.0)  # 1 - p_m as a sum
        if gamma_neg == 0.0:  # 1 / (1 - p_m) where the margin is active, 0 elsewhere
            dneg = one_minus.reciprocal_().mul_(torch.sign(pm))
        else:
            nu = _asl_nu(pm, one_minus)
            dneg = torch.div(pm, one_minus, out=one_minus)
            dneg.add_(nu, alpha=gamma_neg)  # γ₋ ν + p_m / (1 - p_m)
            if gamma_neg != 1.0:  # p_m^(γ₋-1), finite at p_m = 0 (where it multiplies 0)
                # _pow_ returns None only for an exponent of 0, excluded by the test above
                dneg.mul_(_pow_(pm, gamma_neg - 1.0, floor=True))  # type: ignore[arg-type]
        dneg.mul_(s).mul_(sn)
    else:  # s^γ₋ (γ₋ s̄ b + s)
        dneg = _softplus(x).mul_(sn).mul_(gamma_neg).add_(s)
        _times_(dneg, _pow_(s, gamma_neg))
    return dneg.lerp_(dpos, t)


def _qfl_parts(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    s = torch.sigmoid(x)
    sn = torch.neg(x).sigmoid_()
    d = torch.neg(s).lerp_(sn, t)  # t s̄ - (1-t) s: exactly s̄ or -s for hard targets
    return s, sn, d, _sided_ce(x, t, s, sn)


def _qfl_loss_(x: torch.Tensor, t: torch.Tensor, *, beta: float) -> torch.Tensor:
    _, _, d, ce = _qfl_parts(x, t)
    if beta == 2.0:
        return ce.mul_(d).mul_(d)
    return _times_(ce, _pow_(d.abs_(), beta))


def _qfl_grad_(x: torch.Tensor, t: torch.Tensor, *, beta: float) -> torch.Tensor:
    s, sn, d, ce = _qfl_parts(x, t)
    if beta == 0.0:
        return d.neg_()
    g = s.mul_(sn).mul_(ce).mul_(beta).addcmul_(d, d)  # β s s̄ ce + d²
    if float(beta).is_integer() and 2 <= beta <= 8:  # -d |d|^(β-2) (...)
        if beta > 2.0:
            # _pow_ returns None only for an exponent of 0, excluded by the test above
            g.mul_(_pow_(torch.abs(d), beta - 2.0))  # type: ignore[arg-type]
        return g.mul_(d).neg_()
    g.mul_(torch.sign(d)).neg_()
    # _pow_ returns None only for an exponent of 0, excluded by the test above
    return g if beta == 1.0 else g.mul_(_pow_(d.abs_(), beta - 1.0, floor=True))  # type: ignore[arg-type]


class _Kernels(NamedTuple):
    loss: Callable[..., torch.Tensor]
    grad: Callable[..., torch.Tensor]


_KERNELS = {_asymmetric: _Kernels(_asl_loss_, _asl_grad_), _quality_focal: _Kernels(_qfl_loss_, _qfl_grad_)}


def _kernels_apply(kernels: _Kernels | None, x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether the eager kernels take this call: plain eager tensors, outside torch.compile, torch.func and
    forward-mode AD, and a gradient (if any) for the logits only."""
    if kernels is None or not EAGER_KERNELS or C.is_compiling():
        return False
    if C.any_tangent(x, *others):
        return False
    return not C.is_transformed(x) and all(
        o is None or not (o.requires_grad or C.is_transformed(o)) for o in others)


class _FamilyKernel(torch.autograd.Function):
    """A variant's loss (summed when ``reduce``) times ``scale``, from the kernels; backward recomputes the
    gradient from the saved inputs. A backward that builds a graph (double backward) differentiates the plain
    formula ``term`` instead."""

    @staticmethod
    def forward(ctx, x, t, scale, kernels, term, params, reduce):
        ctx.save_for_backward(x, t, scale)
        ctx.kernels, ctx.term, ctx.params, ctx.reduce = kernels, term, params, reduce
        pieces = C.chunked(x, t, scale)
        if reduce:
            parts = [_times_(kernels.loss(xp, tp, **params), sp).sum() for _, (xp, tp, sp) in pieces]
            # each piece is a cascade sum; the pieces are added in float64
            return parts[0] if len(parts) == 1 else torch.stack(parts).to(torch.float64).sum().to(x.dtype)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        for region, (xp, tp, sp) in pieces:
            C.piece_of(out, region).copy_(_times_(kernels.loss(xp, tp, **params), sp))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, t, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        if torch.is_grad_enabled():
            out = ctx.term(x, t, **ctx.params)
            out = out if scale is None else out * scale
            (g,) = torch.autograd.grad(out.sum() if ctx.reduce else out, x, grad_out, create_graph=True)
            return (g, *(None,) * 6)
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if ctx.reduce:
            k = C.scalar_or_tensor(grad_out)
            pieces = ((r, (*p, k)) for r, p in C.chunked(x, t, scale))
        else:
            pieces = C.chunked(x, t, scale, grad_out)
        for region, (xp, tp, sp, kp) in pieces:
            g = _times_(ctx.kernels.grad(xp, tp, **ctx.params), sp)
            C.piece_of(grad, region).copy_(g.mul_(kp))
        return (grad, *(None,) * 6)


# ----------------------------------------------------------------------------------------
# The shared pipeline.
# ----------------------------------------------------------------------------------------


def _in_unit_range(t: torch.Tensor) -> torch.Tensor:
    """0-d bool: every element in [0, 1] (False for NaN), from one min/max reduction."""
    lo, hi = torch.aminmax(C.min_max_ready(t.detach()))
    return (lo >= 0) & (hi <= 1)


def _where_dtype(where: Any) -> Any:
    if where is None:
        return "bool"
    return where.dtype if isinstance(where, torch.Tensor) else np.asarray(where).dtype


def _family_loss(loss: str, term: Callable[..., torch.Tensor], input: torch.Tensor, target: Any, *,
                 weight: Any, where: Any, reduction: str, process_group: Any, label_smoothing: Any = 0.0,
                 **hyper: float) -> torch.Tensor:
    """Validates, casts, masks, applies ``term`` elementwise, weights and reduces."""
    target = C.checked_target(input, target, weight=weight, where=where)
    dev = input.device
    opts = focal_spec.family_options(
        loss, tuple(input.shape), input.dtype, tuple(target.shape), target.dtype, weight_shape=C.shape_of(weight),
        where_shape=C.shape_of(where), where_dtype=_where_dtype(where), reduction=reduction,
        label_smoothing=C.spec_unit("label_smoothing", label_smoothing), weight=C.spec_value(weight), **hyper)
    cdt = C.compute_dtype(input.dtype)
    shape = input.shape
    with C.no_autocast(dev):
        x = input.to(cdt)
        t = target.to(device=dev, dtype=cdt).broadcast_to(shape)
        # C.as_tensor returns None only for None, excluded above
        scale = None if weight is None else C.as_tensor(weight, dtype=cdt, device=dev).broadcast_to(shape)  # type: ignore[union-attr]
        count: Any = input.numel()
        if where is not None:
            # C.as_tensor returns None only for None, excluded above
            mask = C.as_tensor(where, dtype=torch.bool, device=dev).broadcast_to(shape)  # type: ignore[union-attr]
            x = torch.where(mask, x, 0.0)  # masked garbage never reaches the math
            t = torch.where(mask, t, 0.0)
            scale = mask.to(cdt) if scale is None else torch.where(mask, scale, 0.0)
            count = mask.sum()
        if target.dtype != torch.bool:
            # one reduction (and on an accelerator one sync) when all is well; read also where a torch.func
            # transform wraps t only because it was derived inside it (from a target and where it left plain)
            if C.can_check_values(target) and not C.is_transformed(where):
                if t.numel() and not bool(_in_unit_range(t)):
                    ok = (t >= 0) & (t <= 1)
                    raise ValueError(focal_spec.targets_out_of_range(t[~ok].reshape(-1)[0].item()))
            else:  # compiled or transformed: a counted target outside [0, 1] gives NaN
                t = torch.where((t >= 0) & (t <= 1), t, float("nan"))
        eps: Any = opts.label_smoothing
        if eps is None:  # a tensor that cannot be read here: applied whatever its value
            eps = C.as_tensor(label_smoothing, dtype=cdt, device=dev)
        if not isinstance(eps, float) or eps != 0.0:
            t = t * (1.0 - eps) + eps / 2.0
        kernels = _KERNELS.get(term)
        out = None
        if _kernels_apply(kernels, x, t, scale):
            try:
                out = _FamilyKernel.apply(x, t, scale, kernels, term, dict(opts.params), opts.reduction != "none")
            except RuntimeError:
                if not C.functions_refused():
                    raise
                # a torch.func transform that wrapped none of the tensors: the plain formula below
        if out is None:
            out = term(x, t, **dict(opts.params))
            if scale is not None:
                out = out * scale
            if opts.reduction != "none":
                out = out.sum()
        if opts.reduction != "none":
            if opts.reduction == "mean":
                out = out * _distributed.mean_scale(count, process_group, dtype=cdt, device=dev)
    return out.to(input.dtype)


# ----------------------------------------------------------------------------------------
# The functionals.
# ----------------------------------------------------------------------------------------

_SHARED_ARGS = """
      weight: optional tensor broadcasting to ``input`` (one weight per class, for example, such as
        :func:`class_balanced_weights`); multiplies the elementwise loss.
      where: optional boolean tensor broadcasting to ``input``. Elements where it is False contribute 0,
        are not counted by the mean, and get an exactly zero gradient, whatever their logits (NaN and
        inf included) and targets hold.
      reduction: ``"none"``, ``"mean"`` (the sum over the number of counted elements; 0 when nothing is
        counted) or ``"sum"``.
      process_group: a ``torch.distributed`` process group. With ``reduction="mean"``, the number of
        counted elements is all-reduced over the group, and each rank returns
        ``world_size * local_sum / global_count``, so that DDP's gradient averaging yields the gradient
        of the global mean (as :func:`focal_torch.sigmoid_focal_loss`). Ignored otherwise."""

_SHARED_RETURNS = """
    Returns:
      ``"none"``: the elementwise loss, ``input``'s shape. ``"mean"`` and ``"sum"``: a 0-d tensor. In
      ``input``'s dtype (half precision is computed in float32). Gradients flow to ``input`` and to
      ``weight`` (and to floating targets) by autograd.

    Raises:
      TypeError: ``input`` that is not a floating tensor, a non-numeric ``target`` dtype, a ``where``
        that is not boolean, or a hyperparameter that is not a number.
      ValueError: a hyperparameter out of range, an unknown reduction, a shape of ``target``,
        ``weight`` or ``where`` that does not broadcast to ``input``, an option on another device, or
        (eagerly, outside ``torch.compile``) a counted target outside [0, 1]; under compile, or on
        targets a ``torch.func`` transform wraps, that element's loss is NaN instead."""



def _shared_doc(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Fills in the Args and Returns/Raises text that every variant shares."""
    fn.__doc__ = (fn.__doc__ or "").replace("      <shared-args>\n", _SHARED_ARGS.lstrip("\n") + "\n").replace(
        "    <shared-returns>\n", _SHARED_RETURNS.lstrip("\n") + "\n")
    return fn


@_shared_doc
def asymmetric_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma_pos: float = _variants.ASL_GAMMA_POS,
    gamma_neg: float = _variants.ASL_GAMMA_NEG,
    clip: float = _variants.ASL_CLIP,
    weight: torch.Tensor | None = None,
    label_smoothing: float = focal_spec.LABEL_SMOOTHING,
    where: torch.Tensor | None = None,
    reduction: str = focal_spec.REDUCTION,
    process_group: Any = None,
) -> torch.Tensor:
    r"""Asymmetric loss (ASL) for multi-label classification (Ridnik et al. 2021).

    Every element is an independent binary prediction. Positives and negatives get their own
    focusing exponent, and the negatives' probability is shifted by the margin m = ``clip``, which
    discards easy negatives (σ(x) <= m) entirely:

    .. math::
        p_m = \max(σ(x) - m, 0), \quad
        \ell = w \, [t' \, σ(-x)^{γ_+} (-\log σ(x)) + (1-t') \, p_m^{γ_-} (-\log(1 - p_m))],

    with t' = t(1-ε) + ε/2. With ``gamma_pos == gamma_neg == γ`` and ``clip=0`` it is
    :func:`focal_torch.sigmoid_focal_loss` with that γ for hard targets. The logarithms are taken
    without cancellation (log-sigmoid, and 1 - p_m = min(σ(-x) + m, 1) as a sum), so the loss keeps
    its digits where timm's clamp of the probabilities at 1e-8 does not.

    Args:
      input: logits, any shape, floating dtype (float16, bfloat16, float32 or float64).
      target: targets in [0, 1] (multi-hot or soft) broadcasting to ``input``; floating, integer or
        boolean.
      gamma_pos: focusing exponent γ₊ >= 0 of the positive term (a Python number).
      gamma_neg: focusing exponent γ₋ >= 0 of the negative term (a Python number).
      clip: probability margin m in [0, 1] of the negative term; 0 turns it off.
      label_smoothing: ε in [0, 1]; targets become t(1-ε) + ε/2.
      <shared-args>

    <shared-returns>

    Examples:
      >>> import torch
      >>> from focal_torch._family import asymmetric_loss
      >>> logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.5, -4.0]])
      >>> targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> print(f"{asymmetric_loss(logits, targets, reduction='sum').item():.6f}")
      0.420162

    References:
      Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021, arXiv:2009.14119.
    """
    return _family_loss("asymmetric", _asymmetric, input, target, weight=weight, where=where, reduction=reduction,
                        process_group=process_group, label_smoothing=label_smoothing, gamma_pos=gamma_pos,
                        gamma_neg=gamma_neg, clip=clip)


@_shared_doc
def quality_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float = _variants.QFL_BETA,
    weight: torch.Tensor | None = None,
    where: torch.Tensor | None = None,
    reduction: str = focal_spec.REDUCTION,
    process_group: Any = None,
) -> torch.Tensor:
    r"""Quality focal loss (QFL) of Generalized Focal Loss (Li et al. 2020).

    A focal loss for soft targets (an IoU-aware classification score, say): the modulator is the
    distance between the target and the prediction,

    .. math::
        \ell = w \, |t - σ(x)|^β \, [-t \log σ(x) - (1-t) \log σ(-x)].

    With hard targets and β = γ it is :func:`focal_torch.sigmoid_focal_loss` without ``alpha``. The
    difference t - σ(x) is formed as t σ(-x) - (1-t) σ(x), exact for hard targets at saturated logits.
    |t - σ(x)|^β is 0 where t = σ(x) exactly, with a zero gradient there. mmdetection's
    ``quality_focal_loss`` takes (class label, score) pairs: its dense target is the score at the
    label's class and 0 elsewhere.

    Args:
      input: logits, any shape, floating dtype (float16, bfloat16, float32 or float64).
      target: soft targets in [0, 1] broadcasting to ``input``; floating, integer or boolean.
      beta: the modulator's exponent β >= 0 (a Python number); 0 is the binary cross-entropy.
      <shared-args>

    <shared-returns>

    Examples:
      >>> import torch
      >>> from focal_torch._family import quality_focal_loss
      >>> logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.5, -4.0]])
      >>> targets = torch.tensor([[0.9, 0.0, 0.0], [0.0, 0.6, 0.0]])
      >>> print(f"{quality_focal_loss(logits, targets).item():.6f}")
      0.073041

    References:
      Li et al., "Generalized Focal Loss", NeurIPS 2020, arXiv:2006.04388.
    """
    return _family_loss("quality_focal", _quality_focal, input, target, weight=weight, where=where,
                        reduction=reduction, process_group=process_group, beta=beta)


@_shared_doc
def varifocal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = _variants.VFL_ALPHA,
    gamma: float = _variants.VFL_GAMMA,
    weight: torch.Tensor | None = None,
    where: torch.Tensor | None = None,
    reduction: str = focal_spec.REDUCTION,
    process_group: Any = None,
) -> torch.Tensor:
    r"""Varifocal loss (VFL) of VarifocalNet (Zhang et al. 2021).

    Asymmetric in its targets q (IoU-aware scores): a positive (q > 0) is weighted by its own q, a
    negative (q = 0) is down-weighted as in the focal loss,

    .. math::
        \ell = w \, [-q \log σ(x) - (1-q) \log σ(-x)] \cdot
        \begin{cases} q & q > 0 \\ α σ(x)^γ & q = 0. \end{cases}

    This is mmdetection's ``varifocal_loss`` with ``iou_weighted=True``.

    Args:
      input: logits, any shape, floating dtype (float16, bfloat16, float32 or float64).
      target: target scores q in [0, 1] broadcasting to ``input`` (0 for negatives); floating, integer
        or boolean.
      alpha: weight α in [0, 1] of the negatives (a Python number).
      gamma: focusing exponent γ >= 0 of the negatives (a Python number).
      <shared-args>

    <shared-returns>

    Examples:
      >>> import torch
      >>> from focal_torch._family import varifocal_loss
      >>> logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.5, -4.0]])
      >>> targets = torch.tensor([[0.9, 0.0, 0.0], [0.0, 0.6, 0.0]])
      >>> print(f"{varifocal_loss(logits, targets).item():.6f}")
      0.179204

    References:
      Zhang et al., "VarifocalNet: An IoU-aware Dense Object Detector", CVPR 2021, arXiv:2008.13367.
    """
    return _family_loss("varifocal", _varifocal, input, target, weight=weight, where=where, reduction=reduction,
                        process_group=process_group, alpha=alpha, gamma=gamma)


def class_balanced_weights(counts: Any, *, beta: float = _variants.CLASS_BALANCE_BETA) -> torch.Tensor:
    r"""Class-balanced weights (Cui et al. 2019) from per-class sample counts, for ``weight=``.

    .. math::
        w_c \propto \frac{1 - β}{1 - β^{n_c}}, \quad \sum_c w_c = C.

    β = 0 gives equal weights, β -> 1 inverse class frequencies. A class with count 0 is weighted as a
    class seen once. Computed on the host by :func:`focal_spec.class_balanced_weights` (counts on an
    accelerator are copied to the host once).

    Args:
      counts: 1-d tensor (or sequence) of C class counts >= 0, integer or floating.
      beta: β in [0, 1].

    Returns:
      A (C,) tensor on ``counts``' device (the CPU for a sequence): float64 for float64 counts, float32
      otherwise. No gradient.

    Raises:
      TypeError: non-numeric counts or beta.
      ValueError: counts that are not a non-empty 1-d array of finite numbers >= 0, or β outside [0, 1].

    Examples:
      >>> import torch
      >>> from focal_torch._family import class_balanced_weights
      >>> print(class_balanced_weights(torch.tensor([900, 90, 10]), beta=0.99))
      tensor([0.2284, 0.3836, 2.3880])

    References:
      Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019, arXiv:1901.05555.
    """
    if isinstance(counts, torch.Tensor):
        dtype = torch.float64 if counts.dtype == torch.float64 else torch.float32
        device = counts.device
        counts = counts.detach().cpu().numpy()
    else:
        dtype = torch.float64 if np.asarray(counts).dtype == np.float64 else torch.float32
        device = torch.device("cpu")
    return torch.as_tensor(_variants.class_balanced_weights(counts, beta=beta), dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    return repr(value)


class _FamilyModule(nn.Module):
    """Stores a variant's options (tensors as buffers, so that they follow ``module.to(...)``) and calls
    its functional. The options are validated at construction, as far as they are known without logits."""

    _loss: str
    _functional: Callable[..., torch.Tensor]

    def __init__(self, *, weight: torch.Tensor | None, where: torch.Tensor | None, reduction: str,
                 process_group: Any, **options: Any) -> None:
        super().__init__()
        known = {k: C.spec_value(v) if k == "label_smoothing" else v for k, v in options.items()}
        focal_spec.family_options(self._loss, (1,), "float32", (1,), "float32", weight_shape=None, where_shape=None,
                                  reduction=reduction, **known)
        self._names = (*options, "weight", "where", "reduction")
        for name, value in (*options.items(), ("weight", weight), ("where", where)):
            _modules._store(self, name, value)
        self.reduction = reduction
        self.process_group = process_group

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kwargs = {name: getattr(self, name) for name in self._names}
        return type(self)._functional(input, target, process_group=self.process_group, **kwargs)

    def extra_repr(self) -> str:
        s = ", ".join(f"{name}={_show(getattr(self, name))}" for name in self._names)
        return s + (f", process_group={self.process_group!r}" if self.process_group is not None else "")


class AsymmetricLoss(_FamilyModule):
    r"""Module form of :func:`focal_torch.asymmetric_loss` (options stored, tensors as buffers).

    .. math::
        \ell = w \, [t' \, σ(-x)^{γ_+} (-\log σ(x)) + (1-t') \, p_m^{γ_-} (-\log(1 - p_m))]

    Args: ``gamma_pos``, ``gamma_neg``, ``clip``, ``weight``, ``label_smoothing``, ``where``,
    ``reduction`` and ``process_group``, as for the functional. Call ``loss(input, target)``.

    Raises:
      ValueError: a hyperparameter out of range or an unknown ``reduction`` (at construction); the
        functional's errors at call.

    Examples:
      >>> import torch
      >>> from focal_torch._family import AsymmetricLoss
      >>> loss = AsymmetricLoss(gamma_pos=1.0)
      >>> loss
      AsymmetricLoss(gamma_pos=1.0, gamma_neg=4.0, clip=0.05, label_smoothing=0.0, weight=None, where=None,
                     reduction='mean')
      >>> print(f"{loss(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])).item():.6f}")
      0.007849

    References:
      Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021, arXiv:2009.14119.
    """

    _loss = "asymmetric"
    _functional = asymmetric_loss

    def __init__(self, gamma_pos: float = _variants.ASL_GAMMA_POS, gamma_neg: float = _variants.ASL_GAMMA_NEG,
                 clip: float = _variants.ASL_CLIP, weight: torch.Tensor | None = None,
                 label_smoothing: float = focal_spec.LABEL_SMOOTHING, where: torch.Tensor | None = None,
                 reduction: str = focal_spec.REDUCTION, process_group: Any = None) -> None:
        super().__init__(gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip, label_smoothing=label_smoothing,
                         weight=weight, where=where, reduction=reduction, process_group=process_group)


class QualityFocalLoss(_FamilyModule):
    r"""Module form of :func:`focal_torch.quality_focal_loss` (options stored, tensors as buffers).

    .. math::
        \ell = w \, |t - σ(x)|^β \, \mathrm{ce}(x, t)

    Args: ``beta``, ``weight``, ``where``, ``reduction`` and ``process_group``, as for the functional.
    Call ``loss(input, target)``.

    Raises:
      ValueError: ``beta`` < 0 or an unknown ``reduction`` (at construction); the functional's errors
        at call.

    Examples:
      >>> import torch
      >>> from focal_torch._family import QualityFocalLoss
      >>> QualityFocalLoss(weight=torch.ones(3))
      QualityFocalLoss(beta=2.0, weight=tensor(shape=(3,), dtype=torch.float32), where=None, reduction='mean')

    References:
      Li et al., "Generalized Focal Loss", NeurIPS 2020, arXiv:2006.04388.
    """

    _loss = "quality_focal"
    _functional = quality_focal_loss

    def __init__(self, beta: float = _variants.QFL_BETA, weight: torch.Tensor | None = None,
                 where: torch.Tensor | None = None, reduction: str = focal_spec.REDUCTION,
                 process_group: Any = None) -> None:
        super().__init__(beta=beta, weight=weight, where=where, reduction=reduction, process_group=process_group)


class VarifocalLoss(_FamilyModule):
    r"""Module form of :func:`focal_torch.varifocal_loss` (options stored, tensors as buffers).

    .. math::
        \ell = w \, \mathrm{ce}(x, q) \cdot (q \text{ if } q > 0 \text{ else } α σ(x)^γ)

    Args: ``alpha``, ``gamma``, ``weight``, ``where``, ``reduction`` and ``process_group``, as for the
    functional. Call ``loss(input, target)``.

    Raises:
      ValueError: ``alpha`` outside [0, 1], ``gamma`` < 0 or an unknown ``reduction`` (at
        construction); the functional's errors at call.

    Examples:
      >>> import torch
      >>> from focal_torch._family import VarifocalLoss
      >>> VarifocalLoss(reduction="sum")
      VarifocalLoss(alpha=0.75, gamma=2.0, weight=None, where=None, reduction='sum')

    References:
      Zhang et al., "VarifocalNet: An IoU-aware Dense Object Detector", CVPR 2021, arXiv:2008.13367.
    """

    _loss = "varifocal"
    _functional = varifocal_loss

    def __init__(self, alpha: float = _variants.VFL_ALPHA, gamma: float = _variants.VFL_GAMMA,
                 weight: torch.Tensor | None = None, where: torch.Tensor | None = None,
                 reduction: str = focal_spec.REDUCTION, process_group: Any = None) -> None:
        super().__init__(alpha=alpha, gamma=gamma, weight=weight, where=where, reduction=reduction,
                         process_group=process_group)
