"""Softmax focal loss (multi-class) with a closed-form, recomputing backward."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

import focal_spec
from focal_torch import _common as C
from focal_torch import _distributed


class _Opts(NamedTuple):
    gamma: float
    gamma_int: int | None
    eps: float
    dim: int
    num_classes: int
    reduction: str
    cdtype: torch.dtype


def _modulator_from(u: torch.Tensor, log1mp: torch.Tensor, o: _Opts) -> torch.Tensor | float:
    """m = (1-p)^γ: 1 for γ = 0, multiplications for whole γ, exp(γ log(1-p)) otherwise."""
    if o.gamma == 0.0:
        return 1.0
    if o.gamma_int is not None:
        return C.ipow(u, o.gamma_int, inplace=False)
    return torch.exp(o.gamma * log1mp)


def _safe_log(v: torch.Tensor) -> torch.Tensor:
    """log v, with -inf at v = 0 and a zero (not NaN) derivative there."""
    pos = v > 0
    return torch.where(pos, torch.log(torch.where(pos, v, 1.0)), -math.inf)


def _log_p(log1mp: torch.Tensor, direct: torch.Tensor) -> torch.Tensor:
    """log p from log(1-p) where p is close to 1 (log(1-p) < -ln 2), else the direct x - M - log S."""
    near_one = log1mp < -C.LN2
    safe = torch.where(near_one, log1mp, -1.0)
    return torch.where(near_one, torch.log1p(-torch.exp(safe)), direct)


def _rho(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """ρ = log p / (1-p), which tends to -1 as p -> 1; -1 where 1-p underflows to 0."""
    pos = u > 0
    return torch.where(pos, logp / torch.where(pos, u, 1.0), -1.0)


# ----------------------------------------------------------------------------------------
# Integer labels without smoothing: only the label's class matters, so everything but the
# softmax itself is per position. Forward keeps per-position statistics (max, sum of
# exponentials and the backward coefficient); backward recomputes p from the logits.
# ----------------------------------------------------------------------------------------


def _index_row_terms(xmy, others, wy, o: _Opts):
    """Per-position loss and backward coefficient w_y κ_y, from x_y - M and Σ_{k≠y} e^(x_k - M).

    ``others`` is summed without the label's own term, so 1-p_y = others/S has no cancellation
    even when p_y rounds to 1, and log S is log1p(others + expm1(x_y - M)): for a label at the
    max that is log1p(others), accurate however small, so log p_y = x_y - M - log S is too. Plain
    arithmetic only (no ``where``, whose boolean kernels are slow on the CPU): an uncounted
    position may come out as garbage here, and the caller zeroes it.
    """
    ey = torch.exp(xmy)
    s = others + ey
    log_s = torch.log1p(torch.expm1(xmy).add_(others))
    logp = xmy - log_s
    u = others / s  # 1 - p_y
    if o.gamma == 0.0:
        loss, coef = logp.neg_(), torch.full_like(logp, -1.0)
    else:
        if o.gamma_int is not None:
            m = C.ipow(u, o.gamma_int, inplace=False)
        else:
            m = torch.log(others).sub_(log_s).mul_(o.gamma).exp_()
        # κ = m (γ p ρ - 1), ρ = log p / (1-p); where 1-p underflows to 0, m = 0 and ρ does not matter.
        coef = (ey / s).mul_(logp).div_(u.clamp(min=torch.finfo(u.dtype).tiny)).mul_(o.gamma).sub_(1.0).mul_(m)
        loss = logp.mul_(m).neg_()
    if wy is not None:
        loss, coef = loss.mul_(wy), coef.mul_(wy)
    return loss, coef, s, u


def _label_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer dtype holding every class index and the -1 marking an uncounted position."""
    if num_classes <= torch.iinfo(torch.int16).max:
        return torch.int16
    return torch.int32 if num_classes <= torch.iinfo(torch.int32).max else torch.int64


def _index_stats(xc, mx, yk, weight, o: _Opts, out=None, exact=True):
    """exp(x - M) (in ``out`` if given), and the per-position loss, coefficient, S and 1-p_y.
    ``yk`` holds the labels (>= 0) with the class dim kept.

    ``exact``: Σ_{k≠y} e_k is summed with the label's entry zeroed (as the forward value needs), and
    that entry of the returned exp(x - M) is 0. Otherwise (the backward, which only needs the
    coefficient to within rounding) it is S - e_y, one scatter cheaper, and exp(x - M) is whole.
    """
    d = o.dim
    e = torch.sub(xc, mx, out=out).mul_(C.LOG2E).exp2_()  # exp(x - M); exp2 is the fast vectorized one
    xmy = xc.gather(d, yk) - mx
    if exact:
        others = e.scatter_(d, yk, 0.0).sum(d, keepdim=True)
    else:
        others = e.sum(d, keepdim=True).sub_(torch.exp(xmy)).clamp_(min=0.0)
    wy = None if weight is None else weight[yk]
    loss, coef, s, u = _index_row_terms(xmy, others, wy, o)
    return e, loss, coef, s, u


def _pieces(x, *operands, d: int):
    """Pieces of the batch (dim 0) for the eager kernels; the whole tensor when dim 0 is the class dim
    or when compiling (the compiler fuses the passes itself)."""
    if d == 0 or C.is_compiling():
        return [(None, (x, *operands))]
    return C.chunked(x, *operands, chunk=C.SOFTMAX_CHUNK)


class _SoftmaxIndexFocal(torch.autograd.Function):
    """Class indices, no smoothing. Saves the logits, the labels in a small integer dtype (-1 where a
    position is not counted) and the per-position max: no more than ``F.cross_entropy`` keeps (its
    log-probabilities and labels). Backward recomputes exp(x - M) and the rest from them. Both passes
    go over pieces of the batch, so that their temporaries stay in cache."""

    @staticmethod
    def forward(ctx, x, ys, weight, bad, scale, o: _Opts, check_garbage: bool):  # type: ignore[override]
        d = o.dim
        with C.no_autocast(x.device):
            yk = ys.unsqueeze(d)  # (N, 1, ...): sliced along with x
            mx = torch.empty(yk.shape, dtype=o.cdtype, device=x.device)
            loss = torch.empty(yk.shape, dtype=o.cdtype, device=x.device)
            for region, (xp, ykp) in _pieces(x, yk, d=d):
                xc = xp.to(o.cdtype)
                m = xc.amax(d, keepdim=True)
                _, lp, _, _, _ = _index_stats(xc, m, ykp.clamp(min=0).long(), weight, o)
                C.piece_of(mx, region).copy_(m)
                C.piece_of(loss, region).copy_(lp)
            counted = yk >= 0
            # An uncounted position may hold NaN/inf logits; its gradient must then be masked, which
            # costs a pass. Whether any does is free to find out on the CPU; elsewhere, assume so.
            ctx.mask_grad = bool((~counted & ~torch.isfinite(mx)).any()) if check_garbage else True
            loss = C.zero_unless(loss, counted)
            if bad is not None:  # under torch.compile only: an out-of-range label makes its loss NaN
                loss = torch.where(bad.unsqueeze(d), math.nan, loss)
            ctx.o = o
            ctx.scale_is_tensor = isinstance(scale, torch.Tensor)
            if not ctx.scale_is_tensor:
                ctx.scale = scale
            ctx.save_for_backward(x, ys, weight, scale if ctx.scale_is_tensor else None, mx)
            loss = loss.squeeze(d)
            if o.reduction == "none":
                return loss.to(x.dtype)
            total = loss.sum()
            if o.reduction == "mean":
                total = total * scale
            return total.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, ys, weight, scale_t, mx = ctx.saved_tensors
        none = (None,) * 6
        if not ctx.needs_input_grad[0]:
            return (None, *none)
        o: _Opts = ctx.o
        d = o.dim
        scale = scale_t if ctx.scale_is_tensor else ctx.scale
        with C.no_autocast(x.device):
            yk = ys.unsqueeze(d)
            go = grad_out.to(o.cdtype)
            if o.reduction == "none":
                go = go.unsqueeze(d)
            elif o.reduction == "mean":
                go = go * scale
            if torch.is_grad_enabled() and not C.is_compiling():
                # Double backward: the general closed form, built from the logits with differentiable
                # ops (the saved max carries no graph).
                go = torch.where(yk >= 0, go, 0.0)
                return (_general_grad(x, ys.clamp(min=0).long(), weight, ys >= 0, o) * go).to(x.dtype), *none
            grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            if go.dim() == 0:
                go = go.expand(yk.shape)
            for region, (xp, ykp, mp, gp) in _pieces(x, yk, mx, go, d=d):
                out = C.piece_of(grad, region)
                counted = ykp >= 0
                ykl = ykp.clamp(min=0).long()
                e, _, coef, s, _ = _index_stats(xp.to(o.cdtype), mp, ykl, weight, o,
                                                out=out if out.dtype == o.cdtype else None, exact=False)
                c = C.zero_unless(coef * gp, counted)
                e.mul_(-c / s)  # -c p_k
                e.scatter_add_(d, ykl, c)  # + c at k = y: c (δ_ky - p_k)
                if ctx.mask_grad:  # uncounted positions holding NaN/inf logits: their gradient is exactly 0
                    e = C.zero_unless(e, counted)
                if e is not out:
                    out.copy_(e)
            return grad, *none


# ----------------------------------------------------------------------------------------
# The general case: class probabilities, or label smoothing. Plain out-of-place ops, used for
# the forward and backward here and for the double backward of the integer path.
# ----------------------------------------------------------------------------------------


def _class_view(w: torch.Tensor, ndim: int, d: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[d] = -1
    return w.view(shape)


def _softmax_parts(x: torch.Tensor, d: int):
    """log p_c, log(1-p_c), p_c and 1-p_c over dim d, without cancellation.

    Σ_{k≠c} e_k is S - e_c except for one arg-max class, whose others-sum is accumulated with
    that class left out, so log(1-p_c) stays accurate as p_c rounds to 1.
    """
    mx = x.amax(d, keepdim=True).detach()
    z = x - mx
    e = torch.exp(z)
    s = e.sum(d, keepdim=True)
    idx = x.argmax(d, keepdim=True)
    s_wo_max = e.scatter(d, idx, 0.0).sum(d, keepdim=True)
    others = (s - e).scatter(d, idx, s_wo_max)
    log_s = torch.log(s)
    log1mp = _safe_log(others) - log_s
    logp = _log_p(log1mp, z - log_s)
    return logp, log1mp, torch.exp(logp), others / s


def _targets(x, labels, o: _Opts):
    """Smoothed class probabilities q (for probability labels), or None for class indices."""
    if labels.dtype.is_floating_point:
        return labels.to(o.cdtype) * (1.0 - o.eps) + o.eps / o.num_classes
    return None


def _sanitize(x, labels, valid, o: _Opts):
    """Zeroes the logits (and probability labels) of uncounted positions before any math. With
    autograd recording (double backward) this is ``torch.where``; otherwise bits are cleared."""
    d = o.dim
    xs = x.to(o.cdtype)
    if valid is not None:
        vk = valid.unsqueeze(d)
        if torch.is_grad_enabled() and xs.requires_grad:
            xs = torch.where(vk, xs, 0.0)
        else:
            xs = C.zero_unless(xs, vk)
        if labels.dtype.is_floating_point:
            labels = C.zero_unless(labels, vk)
    return xs, labels


def _general_loss(x, labels, weight, valid, o: _Opts) -> torch.Tensor:
    d = o.dim
    xs, labels = _sanitize(x, labels, valid, o)
    logp, log1mp, _, u = _softmax_parts(xs, d)
    term = _modulator_from(u, log1mp, o) * logp
    if weight is not None:
        term = term * _class_view(weight, xs.dim(), d)
    q = _targets(xs, labels, o)
    if q is None:
        loss = -((1.0 - o.eps) * term.gather(d, labels.unsqueeze(d)) + (o.eps / o.num_classes) * term.sum(d, True))
    else:
        loss = -(term * q).sum(d, keepdim=True)
    if valid is not None:
        loss = torch.where(valid.unsqueeze(d), loss, 0.0)
    return loss.squeeze(d)


def _general_grad(x, labels, weight, valid, o: _Opts) -> torch.Tensor:
    """dℓ_i/dx_k = A_k - p_k Σ_c A_c with A_c = w_c q_c κ_c and κ_c = m_c (γ p_c ρ_c - 1)."""
    d = o.dim
    xs, labels = _sanitize(x, labels, valid, o)
    logp, log1mp, p, u = _softmax_parts(xs, d)
    m = _modulator_from(u, log1mp, o)
    kappa = m * (o.gamma * p * _rho(logp, u) - 1.0) if o.gamma != 0.0 else -torch.ones_like(p)
    if weight is not None:
        kappa = kappa * _class_view(weight, xs.dim(), d)
    q = _targets(xs, labels, o)
    if q is None:
        yk = labels.unsqueeze(d)
        a = (o.eps / o.num_classes) * kappa
        a = a.scatter_add(d, yk, (1.0 - o.eps) * kappa.gather(d, yk))
    else:
        a = kappa * q
    return a - p * a.sum(d, keepdim=True)


class _SoftmaxGeneralFocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, weight, valid, bad, scale, o: _Opts):  # type: ignore[override]
        with C.no_autocast(x.device):
            loss = _general_loss(x, labels, weight, valid, o)
            if bad is not None:
                loss = torch.where(bad, math.nan, loss)
            ctx.o = o
            ctx.scale_is_tensor = isinstance(scale, torch.Tensor)
            if not ctx.scale_is_tensor:
                ctx.scale = scale
            ctx.save_for_backward(x, labels, weight, valid, scale if ctx.scale_is_tensor else None)
            if o.reduction == "none":
                return loss.to(x.dtype)
            total = loss.sum()
            if o.reduction == "mean":
                total = total * scale
            return total.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, labels, weight, valid, scale_t = ctx.saved_tensors
        none = (None,) * 6
        if not ctx.needs_input_grad[0]:
            return (None, *none)
        o: _Opts = ctx.o
        d = o.dim
        scale = scale_t if ctx.scale_is_tensor else ctx.scale
        with C.no_autocast(x.device):
            go = grad_out.to(o.cdtype)
            if o.reduction == "none":
                go = go.unsqueeze(d)
            elif o.reduction == "mean":
                go = go * scale
            if valid is not None:
                go = torch.where(valid.unsqueeze(d), go, 0.0)
            g = _general_grad(x, labels, weight, valid, o) * go
            return g.to(x.dtype), *none


def softmax_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = focal_spec.GAMMA,
    weight: torch.Tensor | None = None,
    ignore_index: int = focal_spec.IGNORE_INDEX,
    label_smoothing: float = focal_spec.LABEL_SMOOTHING,
    where: torch.Tensor | None = None,
    dim: int = focal_spec.TORCH_CLASS_DIM,
    reduction: str = focal_spec.REDUCTION,
    process_group: Any = None,
) -> torch.Tensor:
    r"""Softmax focal loss for multi-class classification, with ``F.cross_entropy``'s conventions.

    With :math:`p = \mathrm{softmax}(x)` over the class dim and :math:`q` the (smoothed) target
    distribution, per position :math:`i`:

    .. math::
        \ell_i = -\sum_c w_c \, q_c \, (1-p_c)^\gamma \log p_c, \qquad
        q = (1-\varepsilon)\,\mathrm{onehot}(y) + \varepsilon/C
        \ \text{(class indices)}, \quad q = (1-\varepsilon)\,t + \varepsilon/C \ \text{(probabilities)}.

    For class indices without smoothing this is :math:`-w_y (1-p_y)^\gamma \log p_y`, computed
    without a one-hot. :math:`\log(1-p_c)` is formed as :math:`\log\sum_{k\ne c} e^{x_k} - \log\sum_k
    e^{x_k}`, so the modulator and its gradient stay finite and accurate when one class dominates.
    With ``gamma=0`` every option combination equals ``F.cross_entropy``, in value and gradient.

    Args:
      input: logits of shape (N, C, ...) (class dim ``dim``), floating dtype. float16 and bfloat16 are
        computed in float32 and the result is returned in ``input``'s dtype. Gradients flow to
        ``input`` only. C = 1 is allowed (the loss is 0).
      target: integer class indices of ``input``'s shape without the class dim, or floating class
        probabilities of ``input``'s shape. A constant.
      gamma: focusing parameter :math:`\gamma \ge 0`. Whole values up to 8 use multiplications only.
      weight: per-class weights of shape (C,). A constant.
      ignore_index: class index whose positions contribute 0 (class indices only).
      label_smoothing: :math:`\varepsilon \in [0, 1]`.
      where: boolean tensor broadcasting to the positions (``input``'s shape without the class dim);
        ``False`` positions contribute 0 with an exactly zero gradient, whatever they hold.
      dim: the class dim of ``input``.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``. For class indices the mean divides by
        :math:`\sum_i w_{y_i}` over counted positions (``F.cross_entropy``'s weighted mean); for
        probabilities, by the number of counted positions. A mean over nothing is 0, not NaN (unlike
        ``F.cross_entropy``), with zero gradients.
      process_group: a ``torch.distributed`` process group. With ``reduction="mean"`` the denominator
        is all-reduced over the group (without gradient) and each rank returns
        ``world_size * local_sum / global_denominator``, so that DDP's gradient averaging gives exactly
        the gradient of the global-batch mean. Ignored for ``"sum"`` and ``"none"``.

    Returns:
      ``"none"``: the per-position loss, ``input``'s shape without the class dim, ``input``'s dtype.
      ``"mean"`` and ``"sum"``: a 0-d tensor of ``input``'s dtype.

    Raises:
      TypeError: integer or boolean ``input``; floating ``target`` where class indices are required, or
        a target dtype that is neither.
      ValueError: ``gamma`` < 0 or not finite; ``label_smoothing`` outside [0, 1]; an unknown
        ``reduction``; a ``target``, ``weight`` or ``where`` shape that does not fit; ``dim`` out of
        range; and, in eager mode, a class index outside [0, C) that is not ``ignore_index``. That
        last check reads the labels (on an accelerator, one host sync per call). Under
        ``torch.compile`` it is skipped, to keep the graph whole, and such a position's loss is NaN
        instead, never a silently wrong number.

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
    if not isinstance(target, torch.Tensor):
        target = torch.as_tensor(target, device=input.device)
    o = focal_spec.softmax_options(
        tuple(input.shape), input.dtype, tuple(target.shape), target.dtype, gamma=gamma,
        weight_shape=C.shape_of(weight), ignore_index=ignore_index, label_smoothing=label_smoothing,
        where_shape=C.shape_of(where), axis=dim, reduction=reduction, axis_arg="dim")
    cdtype = C.compute_dtype(input.dtype)
    dev = input.device
    d = o.axis
    positions = tuple(input.shape[:d] + input.shape[d + 1:])
    opts = _Opts(o.gamma, o.gamma_int, o.label_smoothing, d, o.num_classes, o.reduction, cdtype)
    weight_t = C.as_tensor(weight, dtype=cdtype, device=dev)
    mask = C.as_tensor(where, dtype=torch.bool, device=dev)
    if mask is not None:
        mask = torch.broadcast_to(mask, positions)
    if target.device != dev:
        target = target.to(dev)
    compiling = not C.can_read_values(target)
    bad = None
    if o.label_kind == "index":
        y = target.long()
        valid = y != o.ignore_index
        if mask is not None:
            valid = valid & mask
        in_range = (y >= 0) & (y < o.num_classes)
        if compiling:
            bad = valid & ~in_range
        else:
            out_of_range = valid & ~in_range
            if bool(out_of_range.any()):
                raise ValueError(focal_spec.label_out_of_range(int(y[out_of_range][0]), o.num_classes, o.ignore_index))
        ys = torch.where(valid & in_range, y, 0)
        count: torch.Tensor | int = valid.sum() if weight_t is None else torch.where(valid, weight_t[ys], 0.0).sum()
        labels = ys
    else:
        valid = mask
        labels = target if target.dtype == cdtype else target.to(cdtype)
        count = math.prod(positions) if mask is None else mask.sum()
    scale: torch.Tensor | float = 1.0
    if o.reduction == "mean":
        scale = _distributed.mean_scale(count, process_group, dtype=cdtype, device=dev)
    if o.label_kind == "index" and o.label_smoothing == 0.0:
        ys_small = torch.where(valid if bad is None else valid & ~bad, labels, -1).to(_label_dtype(o.num_classes))
        check_garbage = dev.type == "cpu" and not C.is_compiling()
        return _SoftmaxIndexFocal.apply(input, ys_small, weight_t, bad, scale, opts, check_garbage)
    return _SoftmaxGeneralFocal.apply(input, labels, weight_t, valid, bad, scale, opts)
