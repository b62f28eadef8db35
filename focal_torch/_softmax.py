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


def _index_row_terms(xmy, ey, others, wy, valid, bad, o: _Opts):
    """Per-position loss and backward coefficient w_y κ_y from x_y - M, e_y, Σ_{k≠y} e_k.

    ``others`` is summed without the label's own term, so log(1-p_y) = log(others) - log S has no
    cancellation even when p_y rounds to 1.
    """
    s = others + ey
    log_s = torch.log(s)
    log1mp = torch.log(others) - log_s  # -inf when others underflow (and for C = 1)
    logp = _log_p(log1mp, xmy - log_s)
    u = others / s
    m = _modulator_from(u, log1mp, o)
    if o.gamma == 0.0:
        kappa: torch.Tensor | float = -1.0
    else:
        kappa = m * (o.gamma * (ey / s) * _rho(logp, u) - 1.0)
    loss = -(m * logp)
    coef = kappa * torch.ones_like(loss) if isinstance(kappa, float) else kappa
    if wy is not None:
        loss, coef = loss * wy, coef * wy
    loss = torch.where(valid, loss, 0.0)
    coef = torch.where(valid, coef, 0.0)
    if bad is not None:  # under torch.compile only: an out-of-range label makes its loss NaN
        loss = torch.where(bad, math.nan, loss)
        coef = torch.where(bad, math.nan, coef)
    return loss, coef, s


class _SoftmaxIndexFocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ys, weight, valid, bad, scale, o: _Opts, mask_grad: bool):  # type: ignore[override]
        d = o.dim
        yk = ys.unsqueeze(d)
        with C.no_autocast(x.device):
            xc = x.to(o.cdtype)
            mx = xc.amax(d, keepdim=True)
            e = torch.sub(xc, mx).exp_()
            ey = e.gather(d, yk)
            others = e.scatter_(d, yk, 0.0).sum(d, keepdim=True)
            del e
            xmy = xc.gather(d, yk) - mx
            wy = None if weight is None else weight[ys].unsqueeze(d)
            vk = valid.unsqueeze(d)
            loss, coef, s = _index_row_terms(xmy, ey, others, wy, vk, None if bad is None else bad.unsqueeze(d), o)
            ctx.o, ctx.mask_grad = o, mask_grad
            ctx.scale_is_tensor = isinstance(scale, torch.Tensor)
            if not ctx.scale_is_tensor:
                ctx.scale = scale
            ctx.save_for_backward(x, ys, weight, valid, bad, scale if ctx.scale_is_tensor else None, mx, s, coef)
            loss = loss.squeeze(d)
            if o.reduction == "none":
                return loss.to(x.dtype)
            total = loss.sum()
            if o.reduction == "mean":
                total = total * scale
            return total.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, ys, weight, valid, bad, scale_t, mx, s, coef = ctx.saved_tensors
        none = (None,) * 7
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
            if torch.is_grad_enabled() and not C.is_compiling():
                # Double backward: the general closed form, built from the logits with differentiable
                # ops, instead of the saved statistics (which carry no graph).
                go = torch.where(valid.unsqueeze(d), go, 0.0)
                return (_general_grad(x, ys, weight, valid, o) * go).to(x.dtype), *none
            c = coef * go
            g = torch.sub(x.to(o.cdtype), mx).exp_()
            g.mul_(-c / s)  # -c p_k
            g.scatter_add_(d, ys.unsqueeze(d), c)  # + c δ_ky
            if ctx.mask_grad:  # ignored positions may hold NaN/inf logits: their gradient is exactly 0
                g.masked_fill_(~valid.unsqueeze(d), 0.0)
            return g.to(x.dtype), *none


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
    d = o.dim
    xs = x.to(o.cdtype)
    if valid is not None:
        vk = valid.unsqueeze(d)
        xs = torch.where(vk, xs, 0.0)
        if labels.dtype.is_floating_point:
            labels = torch.where(vk, labels, 0.0)
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
    compiling = C.is_compiling()
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
        # The gradient of an ignored position must be masked unless every position counts; on the CPU
        # finding out is free, elsewhere (or under compile) the mask is simply applied.
        mask_grad = compiling or dev.type != "cpu" or not bool(valid.all())
        return _SoftmaxIndexFocal.apply(input, labels, weight_t, valid, bad, scale, opts, mask_grad)
    return _SoftmaxGeneralFocal.apply(input, labels, weight_t, valid, bad, scale, opts)
