"""Sigmoid focal loss (binary and multi-label) with a closed-form, recomputing backward."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

import focal_spec
from focal_torch import _common as C
from focal_torch import _distributed


class _Opts(NamedTuple):
    gamma: float
    gamma_int: int | None
    eps: float
    alpha: float | None  # a scalar alpha; a tensor alpha travels as a Function input
    reduction: str
    cdtype: torch.dtype
    divisor: int | None = None  # the plain element count of an unmasked, local mean


# ----------------------------------------------------------------------------------------
# Elementwise math. Two versions of each formula: an eager kernel that works in place on
# pieces of the input (no autograd), and a plain out-of-place one that autograd and
# torch.compile can trace (used for double backward and under torch.compile).
# ----------------------------------------------------------------------------------------


def _prepare(x, t, mask, o: _Opts, *, bits=None):
    """Casts to the compute dtype, sanitizes masked positions and smooths the targets.

    Sanitizing before any math means NaN/inf logits or garbage targets at excluded positions never
    reach a formula, so the loss and gradient there are exactly 0 (not NaN). The eager kernels clear
    bits (``bits`` given); the plain, differentiable path uses ``torch.where``.
    """
    x = x.to(o.cdtype)
    t = t.to(o.cdtype)
    if mask is not None:
        if bits is None:
            x, t = torch.where(mask, x, 0.0), torch.where(mask, t, 0.0)
        else:
            x, t = C.zero_unless(x, mask, bits), C.zero_unless(t, mask, bits)
    if o.eps:
        t = t * (1.0 - o.eps) + o.eps / 2.0
    return x, t


def _factors(tp, alpha, weight, mask, o: _Opts) -> list[torch.Tensor]:
    """α_t, weight and the mask: the per-element factors of a, the loss' scale."""
    out = []
    if alpha is not None:
        out.append(torch.addcmul(1.0 - alpha, tp, 2.0 * alpha - 1.0))
    elif o.alpha is not None:
        out.append(tp * (2.0 * o.alpha - 1.0) + (1.0 - o.alpha))
    if weight is not None:
        out.append(weight)
    if mask is not None:
        out.append(mask)
    return out


def _bits(mask, o: _Opts):
    return None if mask is None else C.keep_bits(mask, o.cdtype)


def _scale_inplace(buf, tp, alpha, weight, mask, o: _Opts) -> float:
    """Multiplies ``buf`` in place by the factors of a (α_t, weight, mask) and returns the scalar part
    still to be applied: a scalar α_t = (1-α)(1 + t'(2α-1)/(1-α)) costs one pass, not three."""
    k = 1.0
    if alpha is not None:
        buf.mul_(torch.addcmul(1.0 - alpha, tp, 2.0 * alpha - 1.0))
    elif o.alpha is not None:
        if o.alpha == 1.0:
            buf.mul_(tp)
        else:
            buf.addcmul_(buf, tp, value=(2.0 * o.alpha - 1.0) / (1.0 - o.alpha))
            k = 1.0 - o.alpha
    if weight is not None:
        buf.mul_(weight)
    if mask is not None:
        buf.mul_(mask)
    return k


def _loss_inplace(x, t, alpha, weight, mask, o: _Opts, *, reduce: bool) -> torch.Tensor:
    """Elementwise loss of one piece (or, with ``reduce``, its sum), in two buffers, in place."""
    x, tp = _prepare(x, t, mask, o, bits=_bits(mask, o))
    ce = F.softplus(x, 1.0, C.SOFTPLUS_THRESHOLD).addcmul_(tp, x, value=-1.0)  # softplus(x) - t'x
    k = _scale_inplace(ce, tp, alpha, weight, mask, o)  # the factors broadcast to the logits' shape
    if o.gamma == 0.0:
        return ce.sum() * k if reduce else ce.mul_(k)
    q = torch.sigmoid(x)
    q.addcmul_(q, tp, value=-2.0).add_(tp)  # 1-p_t = s + t' - 2st' (exactly 1-s for t' = 1)
    if o.gamma_int is not None:  # ce q^n = (ce q^(n-1)) q: the last factor goes into the sum
        for _ in range(o.gamma_int - 1):
            ce.mul_(q)
        m = q
    else:
        m = q.clamp_(min=torch.finfo(o.cdtype).tiny).pow_(o.gamma)
    if reduce:
        return torch.dot(ce.view(-1), m.view(-1)) * k
    return ce.mul_(m).mul_(k) if k != 1.0 else ce.mul_(m)


def _grad_inplace(x, t, alpha, weight, mask, o: _Opts, coef, divisor, out) -> None:
    """Writes coef * dℓ/dx (/ divisor) of one piece into ``out``, with in-place ops:

    dℓ/dx = a q^(γ-1) [γ (1-2t') s(1-s) ce + q (s-t')],  q = 1-p_t, s = σ(x).
    """
    x, tp = _prepare(x, t, mask, o, bits=_bits(mask, o))
    s = torch.sigmoid(x)
    k = 1.0  # a scalar still to multiply in
    if o.gamma == 0.0:
        g = s.sub_(tp)  # exactly the BCE gradient
    else:
        ce = F.softplus(x, 1.0, C.SOFTPLUS_THRESHOLD).addcmul_(tp, x, value=-1.0)
        g = torch.ops.aten.sigmoid_backward(ce, s)  # ce s(1-s)
        g.addcmul_(g, tp, value=-2.0)  # ce s(1-s)(1-2t') = ce d(1-p_t)/dx
        q = torch.addcmul(s, s, tp, value=-2.0).add_(tp)  # 1-p_t
        d = s.sub_(tp)  # s - t'
        if o.gamma_int is None:
            q.clamp_(min=torch.finfo(o.cdtype).tiny)
        g.addcmul_(d, q, value=1.0 / o.gamma)
        if o.gamma_int is None:
            g.mul_(q.pow_(o.gamma - 1.0))  # q^(γ-1) <= 1/tiny: finite
        elif o.gamma_int >= 2:
            g.mul_(C.ipow(q, o.gamma_int - 1, inplace=True))
        k = o.gamma
    k *= _scale_inplace(g, tp, alpha, weight, mask, o)
    if isinstance(coef, torch.Tensor):
        g.mul_(coef)
    else:
        k *= coef
    if divisor is not None:  # a mean, divided as F.binary_cross_entropy_with_logits does: same bits at γ = 0
        if k != 1.0 and o.gamma == 0.0:
            g.mul_(k)
            k = 1.0
        if k == 1.0:
            if out.dtype == g.dtype:
                torch.div(g, divisor, out=out)
            else:
                out.copy_(g.div_(divisor))
            return
        k /= divisor
    if k == 1.0:
        out.copy_(g)
    elif out.dtype == g.dtype:
        torch.mul(g, k, out=out)
    else:
        out.copy_(g.mul_(k))


def _modulator_parts(x, tp, o: _Opts):
    """s, σ(-x), log σ(x), log σ(-x), ce, 1-p_t and log max(1-p_t, tiny): smooth, autodiff-safe ops."""
    s, sn = torch.sigmoid(x), torch.sigmoid(-x)
    lp, ln = F.logsigmoid(x), F.logsigmoid(-x)
    ce = -(tp * lp + (1.0 - tp) * ln)
    q = tp * sn + (1.0 - tp) * s
    log_q = torch.log(torch.clamp(q, min=torch.finfo(o.cdtype).tiny))
    return s, lp, ln, ce, q, log_q


def _modulator(q, log_q, o: _Opts):
    if o.gamma_int is not None:
        return C.ipow(q, o.gamma_int, inplace=False)
    return torch.exp(o.gamma * log_q)


def _loss_plain(x, t, alpha, weight, mask, o: _Opts) -> torch.Tensor:
    x, tp = _prepare(x, t, mask, o)
    if o.gamma == 0.0:
        loss = F.softplus(x, 1.0, C.SOFTPLUS_THRESHOLD) - tp * x
    else:
        _, _, _, ce, q, log_q = _modulator_parts(x, tp, o)
        loss = _modulator(q, log_q, o) * ce
    for f in _factors(tp, alpha, weight, mask, o):
        loss = loss * f
    return loss


def _grad_plain(x, t, alpha, weight, mask, o: _Opts) -> torch.Tensor:
    """The same gradient with out-of-place smooth ops, so that it can itself be differentiated:
    r = σ(x)σ(-x)/(1-p_t) is exp(log σ(x) + log σ(-x) - log max(1-p_t, tiny)), finite everywhere."""
    x, tp = _prepare(x, t, mask, o)
    if o.gamma == 0.0:
        g = torch.sigmoid(x) - tp
    else:
        s, lp, ln, ce, q, log_q = _modulator_parts(x, tp, o)
        m = _modulator(q, log_q, o)
        r = torch.exp(lp + ln - log_q)
        g = o.gamma * m * (1.0 - 2.0 * tp) * r * ce + m * (s - tp)
    for f in _factors(tp, alpha, weight, mask, o):
        g = g * f
    return g


# ----------------------------------------------------------------------------------------
# The autograd Function.
# ----------------------------------------------------------------------------------------


class _SigmoidFocal(torch.autograd.Function):
    """Saves only the inputs (logits, targets and the small option tensors) and recomputes the rest.

    The reduction happens inside, so a reduced loss saves nothing of the input's size but the
    inputs themselves. The backward is written with differentiable ops: when autograd asks for a
    graph (double backward), it runs the plain, smooth formulas on the saved inputs.
    """

    @staticmethod
    def forward(ctx, x, t, alpha, weight, mask, scale, o: _Opts):  # type: ignore[override]
        ctx.o = o
        ctx.scale_is_tensor = isinstance(scale, torch.Tensor)
        if not ctx.scale_is_tensor:
            ctx.scale = scale
            scale_t = None
        else:
            scale_t = scale
        ctx.save_for_backward(x, t, alpha, weight, mask, scale_t)
        with C.no_autocast(x.device):
            if C.is_compiling():
                loss = _loss_plain(x, t, alpha, weight, mask, o)
                if o.reduction == "none":
                    return loss.to(x.dtype)
                total = loss.sum()
            else:
                out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if o.reduction == "none" else None
                parts = []
                for region, (xp, tp, ap, wp, mp) in C.chunked(x, t, alpha, weight, mask):
                    piece = _loss_inplace(xp, tp, ap, wp, mp, o, reduce=out is None)
                    if out is not None:
                        C.piece_of(out, region).copy_(piece)
                    else:
                        parts.append(piece)
                if out is not None:
                    return out
                total = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
            if o.reduction == "mean":
                total = total * scale
            return total.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, t, alpha, weight, mask, scale_t = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        o: _Opts = ctx.o
        scale = scale_t if ctx.scale_is_tensor else ctx.scale
        with C.no_autocast(x.device):
            if o.reduction == "none":
                coef: Any = grad_out.to(o.cdtype)
            else:
                coef = grad_out.to(o.cdtype) * scale if o.reduction == "mean" else grad_out.to(o.cdtype)
            if C.is_compiling() or torch.is_grad_enabled():
                g = _grad_plain(x, t, alpha, weight, mask, o) * coef
                return g.to(x.dtype), None, None, None, None, None, None
            grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            divisor = None
            if o.reduction == "none":
                pieces = C.chunked(x, t, alpha, weight, mask, coef)
            else:
                if o.divisor is not None and C.scalar_or_tensor(grad_out) is not grad_out:
                    coef, divisor = float(grad_out), o.divisor
                coef = C.scalar_or_tensor(coef)
                pieces = ((r, (*p, coef)) for r, p in C.chunked(x, t, alpha, weight, mask))
            for region, (xp, tp, ap, wp, mp, cp) in pieces:
                _grad_inplace(xp, tp, ap, wp, mp, o, cp, divisor, C.piece_of(grad, region))
            return grad, None, None, None, None, None, None


def sigmoid_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = focal_spec.GAMMA,
    alpha: float | torch.Tensor | None = focal_spec.ALPHA,
    weight: torch.Tensor | None = None,
    label_smoothing: float = focal_spec.LABEL_SMOOTHING,
    where: torch.Tensor | None = None,
    reduction: str = focal_spec.REDUCTION,
    process_group: Any = None,
) -> torch.Tensor:
    r"""Sigmoid focal loss for binary and multi-label classification.

    Each element is an independent binary problem. With :math:`x` the logit, :math:`t` the
    target and :math:`\sigma` the sigmoid:

    .. math::
        t' = t(1-\varepsilon) + \varepsilon/2, \qquad
        \mathrm{ce} = -t'\log\sigma(x) - (1-t')\log\sigma(-x),

        1-p_t = t'\sigma(-x) + (1-t')\sigma(x), \qquad
        \alpha_t = \alpha t' + (1-\alpha)(1-t'),

        \ell = \alpha_t \, w \, (1-p_t)^\gamma \, \mathrm{ce}.

    With ``gamma=0`` and no ``alpha`` this is ``F.binary_cross_entropy_with_logits``, in value and
    gradient. The gradient is closed-form (:math:`d(1-p_t)/dx = (1-2t')\sigma(x)\sigma(-x)`) and
    recomputed in the backward pass from the saved inputs; it supports double backward.

    Args:
      input: logits, any shape, floating dtype. float16 and bfloat16 are computed in float32 and the
        result is returned in ``input``'s dtype. Gradients flow to ``input`` only.
      target: targets in [0, 1] (hard or soft), a shape that broadcasts to ``input``; floating,
        integer or boolean dtype. Cast to the compute dtype (never to a half ``input`` dtype). A
        constant: no gradient flows to it.
      gamma: focusing parameter :math:`\gamma \ge 0`. Whole values up to 8 use multiplications only.
      alpha: class-balance weight: ``None`` (off), a number in [0, 1], or a tensor that broadcasts to
        ``input`` (per class, for example). A constant.
      weight: a tensor that broadcasts to ``input``, multiplied into each element's loss. A constant.
      label_smoothing: :math:`\varepsilon \in [0, 1]`, pulls targets towards 1/2.
      where: boolean tensor broadcasting to ``input``; ``False`` elements contribute 0 and get an
        exactly zero gradient, whatever the logits or targets hold there (NaN, inf, 255).
      reduction: ``"none"``, ``"mean"`` (sum over the number of counted elements) or ``"sum"``.
      process_group: a ``torch.distributed`` process group. With ``reduction="mean"``, the number of
        counted elements is all-reduced over the group (without gradient), and each rank returns
        ``world_size * local_sum / global_count``: DDP's gradient averaging then yields exactly the
        gradient of the mean over the global batch. The returned value is world_size times this
        rank's share of the global mean. Ignored for ``"sum"`` and ``"none"``.

    Returns:
      ``"none"``: the elementwise loss, ``input``'s shape and dtype. ``"mean"`` and ``"sum"``: a 0-d
      tensor of ``input``'s dtype. A mean over zero counted elements is 0, with zero gradients.

    Raises:
      TypeError: integer or boolean ``input``; a non-numeric ``target`` dtype.
      ValueError: ``gamma`` < 0 or not finite; ``alpha`` or ``label_smoothing`` outside [0, 1]; an
        unknown ``reduction``; a ``target``, ``alpha``, ``weight`` or ``where`` shape that does not
        broadcast to ``input``. Messages come from :mod:`focal_spec`.

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
    if not isinstance(target, torch.Tensor):
        target = torch.as_tensor(target, device=input.device)
    o = focal_spec.sigmoid_options(
        tuple(input.shape), input.dtype, tuple(target.shape), target.dtype, gamma=gamma, alpha=alpha,
        weight_shape=C.shape_of(weight), label_smoothing=label_smoothing, where_shape=C.shape_of(where),
        reduction=reduction)
    cdtype = C.compute_dtype(input.dtype)
    dev = input.device
    alpha_t = C.as_tensor(alpha, dtype=cdtype, device=dev) if o.alpha == "array" else None
    weight_t = C.as_tensor(weight, dtype=cdtype, device=dev)
    mask = C.as_tensor(where, dtype=torch.bool, device=dev)
    if target.device != dev:
        target = target.to(dev)
    if target.dtype == torch.float64 and cdtype != torch.float64:
        target = target.to(cdtype)  # saved for backward: keep it no larger than the compute dtype
    plain_mean = o.reduction == "mean" and mask is None and process_group is None and input.numel() > 0
    opts = _Opts(o.gamma, o.gamma_int, o.label_smoothing, None if o.alpha == "array" else o.alpha, o.reduction,
                 cdtype, input.numel() if plain_mean else None)
    scale: torch.Tensor | float = 1.0
    if o.reduction == "mean":
        if mask is None:
            count: torch.Tensor | int = input.numel()
        else:
            count = torch.broadcast_to(mask, input.shape).sum()
        scale = _distributed.mean_scale(count, process_group, dtype=cdtype, device=dev)
    return _SigmoidFocal.apply(input, target, alpha_t, weight_t, mask, scale, opts)
