"""The focal loss's own variants for PyTorch: Poly-1, the normalized and the reduced focal loss, and a
sample-dependent γ (:class:`focal_spec.GammaSchedule`, FLSD-53).

:func:`focal_torch.sigmoid_focal_loss` and :func:`focal_torch.softmax_focal_loss` route here whenever one of
these options is not at its default (``poly1=0.0``, ``normalized=False``, ``reduced_threshold=None``, a
number or tensor ``gamma``); with the defaults their own kernels run. The definitions, defaults and
validators are :mod:`focal_spec._variants`' and the float64 references ``focal_spec.reference``'s.

Everything here is plain, smooth tensor ops differentiated by autograd, so double backward,
``torch.func`` (``grad``, ``vmap``, ``jacrev``, ``hessian``), forward-mode AD and ``torch.compile`` apply.
The sigmoid pieces come from :mod:`focal_torch._family` (σ(±x) and softplus(±x) from e = exp(-|x|), powers
as products for whole exponents up to 8, else exp(k · log u)). log(1 - p_t) is formed in log space
(-softplus(±x) for hard targets, a log-sum-exp for soft ones), the softmax's log p and log(1 - p) without
cancellation (the arg-max class from the sum of the others), and every branch that a ``where`` leaves
unselected is finite: values, gradients and Hessians are finite at any logit and for any γ >= 0.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

import focal_spec
from focal_torch import _common as C
from focal_torch import _distributed
from focal_torch._family import _cross_entropy, _power, _sigmoid, _where_dtype

_variants = focal_spec.variants

NORMALIZED_PROCESS_GROUP = "None when normalized=True (the normalizer Σ m is local to a call, not reduced over ranks)"
"""What ``process_group`` must be with ``normalized=True`` (the message is :func:`focal_spec.invalid_value`'s)."""


# ----------------------------------------------------------------------------------------
# Powers: a number exponent through _family's _power (products for whole ones), a tensor one with
# torch.pow's value and the derivatives of exp(k log u); a schedule picks one number per element.
# ----------------------------------------------------------------------------------------


def _as_tensor_like(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.full_like(like, v)


def _pow(u: torch.Tensor, log_u: torch.Tensor, k: Any) -> torch.Tensor:
    """u^k for u >= 0 with log_u = log u (finite): exactly 1 where k = 0 (no 0^0)."""
    if not isinstance(k, torch.Tensor):
        return _as_tensor_like(_power(u, lambda: log_u, float(k)), u)
    smooth = torch.exp(k * log_u)
    value = torch.pow(u.detach(), k.detach())  # the value of torch.pow; the derivatives of exp(k log u)
    return torch.where(k == 0, 1.0, value + (smooth - smooth.detach()))


def _gamma_pow(u: torch.Tensor, log_u: torch.Tensor, gamma: Any, q: torch.Tensor | None,
               shift: float) -> torch.Tensor:
    """u^(γ + shift), γ a number, a tensor, or a :class:`GammaSchedule` read at the detached q = 1 - p_t."""
    if not isinstance(gamma, _variants.GammaSchedule):
        return _pow(u, log_u, gamma + shift)
    out = _pow(u, log_u, gamma.values[0] + shift)
    for th, v in zip(gamma.thresholds, gamma.values[1:], strict=True):
        out = torch.where(q <= 1.0 - th, _pow(u, log_u, v + shift), out)  # p_t >= th
    return out


def schedule_gamma(gamma: _variants.GammaSchedule, q: torch.Tensor) -> torch.Tensor:
    """The per-element γ of a schedule at q = 1 - p_t (no gradient), as :meth:`GammaSchedule.gamma_of_q`."""
    q = q.detach()
    out = torch.full_like(q, gamma.values[0])
    for th, v in zip(gamma.thresholds, gamma.values[1:], strict=True):
        out = torch.where(q <= 1.0 - th, v, out)
    return out


# ----------------------------------------------------------------------------------------
# Shared plumbing.
# ----------------------------------------------------------------------------------------


def _gamma_operand(gamma: Any, known: float | None, cdtype: torch.dtype, device: torch.device) -> Any:
    """γ as the formulas take it: the validated number, or a tensor (a tensor option, a differentiated one,
    or a symbolic number under ``torch.compile``)."""
    if known is not None and not C.is_differentiated(gamma):
        return known
    if isinstance(gamma, torch.Tensor):
        return gamma.to(device=device, dtype=cdtype)
    if isinstance(gamma, numbers.Real):  # symbolic under torch.compile: as_tensor would specialize on it
        return torch.ones((), dtype=cdtype, device=device) * gamma
    return C.as_tensor(gamma, dtype=cdtype, device=device)


def _smoothing(label_smoothing: Any, known: float | None, cdtype: torch.dtype, device: torch.device) -> Any:
    if known is not None:
        return known
    return C.as_tensor(label_smoothing, dtype=cdtype, device=device)


def _mean(total: torch.Tensor, count: Any, process_group: Any, cdtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    """total / count (0 where count is exactly 0), differentiable in a count that carries a gradient (a
    weight's) unless a process group all-reduces it."""
    if process_group is None and isinstance(count, torch.Tensor) and count.requires_grad:
        nz = count != 0
        return torch.where(nz, total / torch.where(nz, count, 1.0), 0.0)
    return total * _distributed.mean_scale(count, process_group, dtype=cdtype, device=device)


def _log_one_minus_pt(p: Any, tp: torch.Tensor) -> torch.Tensor:
    """log(1 - p_t) = log(t' σ(-x) + (1-t') σ(x)) in log space: -softplus(x) or -softplus(-x) for hard
    targets, a log-sum-exp of log t' - softplus(x) and log(1-t') - softplus(-x) for soft ones (which sees
    t' = 1/2 at hard targets, so that both logarithms stay finite)."""
    zero, one = tp == 0, tp == 1
    ts = torch.where(zero | one, 0.5, tp)
    a, b = torch.log(ts) - p.sp_pos, torch.log1p(-ts) - p.sp_neg
    first = a >= b  # log(e^a + e^b) = max + log1p(e^(min - max)): torch.logaddexp's double backward is NaN
    hi, lo = torch.where(first, a, b), torch.where(first, b, a)  # for a gap beyond exp's range
    soft = hi + torch.log1p(torch.exp(lo - hi))
    return torch.where(zero, -p.sp_neg, torch.where(one, -p.sp_pos, soft))


# ----------------------------------------------------------------------------------------
# Sigmoid.
# ----------------------------------------------------------------------------------------


def sigmoid_variant_loss(input: torch.Tensor, target: Any, *, gamma: Any, alpha: Any, weight: Any, pos_weight: Any,
                         label_smoothing: Any, where: Any, reduction: str, process_group: Any, poly1: Any,
                         normalized: Any, reduced_threshold: Any) -> torch.Tensor:
    """:func:`focal_torch.sigmoid_focal_loss` with ``poly1``, ``normalized``, ``reduced_threshold`` or a
    :class:`focal_spec.GammaSchedule` ``gamma`` (the same arguments; see that function)."""
    eps1 = _variants.check_poly1(poly1)
    normalized = _variants.check_normalized(normalized)
    th = _variants.check_reduced_threshold(reduced_threshold)
    schedule = gamma if isinstance(gamma, _variants.GammaSchedule) else None
    target = C.checked_target(input, target, gamma=None if schedule else gamma, alpha=alpha, weight=weight,
                              pos_weight=pos_weight, where=where)
    dev = input.device
    o = focal_spec.sigmoid_options(
        tuple(input.shape), input.dtype, tuple(target.shape), target.dtype,
        gamma=0.0 if schedule else C.spec_gamma(gamma), alpha=C.spec_value(alpha), weight_shape=C.shape_of(weight),
        label_smoothing=C.spec_value(label_smoothing), where_shape=C.shape_of(where), reduction=reduction,
        where_dtype=_where_dtype(where), pos_weight_shape=C.shape_of(pos_weight))
    if normalized and process_group is not None:
        raise ValueError(focal_spec.invalid_value("process_group", NORMALIZED_PROCESS_GROUP, process_group))
    cdt = torch.float64 if input.dtype == torch.float64 else torch.float32  # C.compute_dtype (uncached: compile)
    shape = input.shape
    with C.no_autocast(dev):
        g = schedule if schedule else _gamma_operand(gamma, o.gamma, cdt, dev)
        if isinstance(g, torch.Tensor):
            g = g.broadcast_to(shape)
        x = input.to(cdt)
        t = target.to(device=dev, dtype=cdt).broadcast_to(shape)
        mask = None if where is None else C.as_tensor(where, dtype=torch.bool, device=dev).broadcast_to(shape)
        count: Any = input.numel()
        if mask is not None:
            x = torch.where(mask, x, 0.0)  # masked garbage never reaches the math
            t = torch.where(mask, t, 0.0)
            count = mask.sum()
        if target.dtype != torch.bool:
            ok = (t >= 0) & (t <= 1)
            if C.can_check_values(t):
                if not bool(ok.all()):
                    raise ValueError(focal_spec.targets_out_of_range(t[~ok].reshape(-1)[0].item()))
            else:  # compiled or transformed: a counted target outside [0, 1] gives NaN
                t = torch.where(ok, t, float("nan"))
        eps = _smoothing(label_smoothing, o.label_smoothing, cdt, dev)
        tp = t if isinstance(eps, float) and eps == 0.0 else t * (1.0 - eps) + eps / 2.0

        p = _sigmoid(x)
        if pos_weight is None:
            ce = _cross_entropy(p, tp)
        else:
            pw = C.as_tensor(pos_weight, dtype=cdt, device=dev)
            ce = pw * tp * p.sp_neg + (1.0 - tp) * p.sp_pos
        q = tp * p.sn + (1.0 - tp) * p.s  # 1 - p_t, two terms >= 0
        log_q = _log_one_minus_pt(p, tp)
        qd = q.detach()  # selects a schedule's γ and the reduced branch only, on 1 - p_t (exact where p_t ~ 1)

        if th is None:
            m = _gamma_pow(q, log_q, g, qd, 0.0)
        else:  # ((1-p_t)/th)^γ where p_t >= th; the other branch sees (th/th)^γ = 1
            below = qd > 1.0 - th  # p_t < th
            u = torch.where(below, 1.0, q / th)
            log_u = torch.where(below, 0.0, log_q - math.log(th))
            m = torch.where(below, 1.0, _gamma_pow(u, log_u, g, qd, 0.0))
        out = m * ce
        if eps1:
            out = out + eps1 * _gamma_pow(q, log_q, g, qd, 1.0)
        if o.alpha is not None:
            a = C.as_tensor(alpha, dtype=cdt, device=dev) if o.alpha == "array" or C.is_differentiated(alpha) \
                else o.alpha
            out = out * (a * tp + (1.0 - a) * (1.0 - tp))
        if weight is not None:
            out = out * C.as_tensor(weight, dtype=cdt, device=dev)
        if mask is not None:
            out = torch.where(mask, out, 0.0)
        if normalized:
            z = (m if mask is None else torch.where(mask, m, 0.0)).sum()
            nz = z != 0
            out = torch.where(nz, out / torch.where(nz, z, 1.0), 0.0)
        if o.reduction != "none":
            out = out.sum()
            if o.reduction == "mean":
                out = out * _distributed.mean_scale(count, process_group, dtype=cdt, device=dev)
    return out.to(input.dtype)


# ----------------------------------------------------------------------------------------
# Softmax.
# ----------------------------------------------------------------------------------------


def _class_view(v: torch.Tensor, ndim: int, d: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[d] = -1
    return v.reshape(shape)


def _softmax_logs(x: torch.Tensor, d: int, nc: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p, log(1-p), 1-p) over dim ``d`` (C >= 2), without cancellation. With z = x - max x, the arg-max
    class has z = 0 and S = 1 + R, R the sum of the others' e^z: log S = log1p(R), its log p = -log1p(R) and
    its log(1-p) = log R - log S with log R a log-sum-exp of the others. Any other class has p <= 1/2, and
    log(1-p) = log1p(-p)."""
    classes = _class_view(torch.arange(nc, device=x.device), x.dim(), d)
    is_max = classes == x.detach().argmax(d, keepdim=True)
    z = x - torch.where(is_max, x, 0.0).sum(d, keepdim=True)  # the arg-max's own z is 0 with gradient 0
    e = torch.exp(z)
    log_s = torch.log1p(torch.where(is_max, 0.0, e).sum(d, keepdim=True))
    logp = z - log_s
    m2 = torch.where(is_max, -math.inf, z).detach().amax(d, keepdim=True)  # the largest of the others
    zz = torch.where(is_max, m2, z) - m2  # <= 0; the arg-max sees 0 (its term is then dropped)
    log_rest = m2 + torch.log(torch.where(is_max, 0.0, torch.exp(zz)).sum(d, keepdim=True))
    p_other = torch.where(is_max, 0.0, torch.exp(logp))
    log1mp = torch.where(is_max, log_rest - log_s, torch.log1p(-p_other))
    u = torch.where(is_max, torch.exp(log1mp), 1.0 - p_other)
    return logp, log1mp, u


def softmax_variant_loss(input: torch.Tensor, target: Any, *, gamma: Any, weight: Any, ignore_index: int,
                         label_smoothing: Any, where: Any, dim: int, reduction: str, process_group: Any,
                         poly1: Any) -> torch.Tensor:
    """:func:`focal_torch.softmax_focal_loss` with ``poly1`` (the same arguments; see that function)."""
    eps1 = _variants.check_poly1(poly1)
    target = C.checked_target(input, target, weight=weight, where=where)
    dev = input.device
    o = focal_spec.softmax_options(
        tuple(input.shape), input.dtype, tuple(target.shape), target.dtype, gamma=C.spec_gamma(gamma),
        weight_shape=C.shape_of(weight), ignore_index=ignore_index, label_smoothing=C.spec_value(label_smoothing),
        where_shape=C.shape_of(where), axis=dim, reduction=reduction, axis_arg="dim",
        where_dtype=_where_dtype(where))
    cdt = torch.float64 if input.dtype == torch.float64 else torch.float32  # C.compute_dtype (uncached: compile)
    d, nc = o.axis, o.num_classes
    positions = tuple(input.shape[:d] + input.shape[d + 1:])
    with C.no_autocast(dev):
        x = input.to(cdt)
        nd = x.dim()
        g = _gamma_operand(gamma, o.gamma, cdt, dev)
        if isinstance(g, torch.Tensor) and g.dim() == 1:
            g = _class_view(g, nd, d)
        w = None if weight is None else _class_view(C.as_tensor(weight, dtype=cdt, device=dev), nd, d)
        eps = _smoothing(label_smoothing, o.label_smoothing, cdt, dev)
        valid = None if where is None else C.as_tensor(where, dtype=torch.bool, device=dev).broadcast_to(positions)
        bad = None
        classes = _class_view(torch.arange(nc, device=dev), nd, d)
        if o.label_kind == "index":
            y = target.to(dev).long()
            keep = y != o.ignore_index
            valid = keep if valid is None else valid & keep
            out_of_range = valid & ((y < 0) | (y >= nc))
            if C.can_check_values(y):
                if bool(out_of_range.any()):
                    raise ValueError(focal_spec.label_out_of_range(int(y[out_of_range].reshape(-1)[0]), nc,
                                                                   o.ignore_index))
            else:  # compiled or transformed: a counted label outside [0, C) gives NaN
                bad = out_of_range
            onehot = (classes == torch.where(valid, y, 0).unsqueeze(d)).to(cdt)
            q = onehot * (1.0 - eps) + eps / max(nc, 1)
            wy = onehot if w is None else onehot * w
            count: Any = torch.where(valid, wy.sum(d), 0.0).sum()
        else:
            q = target.to(device=dev, dtype=cdt) * (1.0 - eps) + eps / max(nc, 1)
            count = math.prod(positions) if valid is None else valid.sum()
        vk = None if valid is None else valid.unsqueeze(d)
        if vk is not None:
            x = torch.where(vk, x, 0.0)  # masked garbage never reaches the math
            q = torch.where(vk, q, 0.0)
        if nc <= 1:  # p = 1 (or no class): the loss is 0, with zero gradients
            loss = torch.where(torch.zeros((), dtype=torch.bool, device=dev), x, 0.0).sum(d)
        else:
            logp, log1mp, u = _softmax_logs(x, d, nc)
            term = -_gamma_pow(u, log1mp, g, None, 0.0) * logp
            if eps1:
                term = term + eps1 * _gamma_pow(u, log1mp, g, None, 1.0)
            wq = q if w is None else q * w
            loss = (wq * term).sum(d)
        if valid is not None:
            loss = torch.where(valid, loss, 0.0)
        if bad is not None:
            loss = torch.where(bad, math.nan, loss)
        if o.reduction != "none":
            loss = loss.sum()
            if o.reduction == "mean":
                loss = _mean(loss, count, process_group, cdt, dev)
    return loss.to(input.dtype)
