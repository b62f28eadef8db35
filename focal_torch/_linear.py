"""Fused linear + softmax focal loss: the loss of ``F.linear(input, weight, bias)``'s logits, computed a chunk of
positions at a time, so that the (positions, classes) logits and their gradient never exist whole."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F

import focal_spec
from focal_torch import _common as C
from focal_torch import _distributed
from focal_torch._modules import _check_options, _show, _store
from focal_torch._softmax import _kappa, _modulator, softmax_focal_loss


class _Opts(NamedTuple):
    gamma: float
    gamma_int: int | None
    eps: float  # label smoothing
    cdtype: torch.dtype  # the statistics' dtype: float32 (float64 for float64 inputs)
    rows: int  # positions per chunk
    reduction: str


# ----------------------------------------------------------------------------------------
# One chunk of positions. With z = x W^T + b (the matmul in the input's dtype, the rest in the compute dtype),
# e_k = exp(z_k - max z), S = Σ e_k:
# - no smoothing: ℓ = -w_y (1-p_y)^γ log p_y, with 1 - p_y = Σ_{k≠y} e_k / S (no cancellation) and
#   log p_y = log1p(-(1 - p_y)) where p_y > 1/2; dℓ/dz_k = κ w_y (δ_ky - p_k), one scalar κ per position
#   (``_softmax._kappa``), the label's entry κ w_y (1 - p_y).
# - smoothing ε: ℓ = -Σ_c w_c q_c (1-p_c)^γ log p_c with q = (1-ε) onehot(y) + ε/V; with g_c = w_c q_c κ_c
#   (κ_c = dℓ/d log p_c of class c's term), dℓ/dz_k = g_k - p_k Σ_c g_c. 1 - p_c is (S - e_c)/S, for the
#   arg-max class the sum of the others (S - e_max would cancel).
# Everything per position is multiplied by its cotangent ``cot`` (the mean's 1/Σw, 1, or grad_out's entry).
# ----------------------------------------------------------------------------------------


def _chunk_index(z: torch.Tensor, yk: torch.Tensor, cw: torch.Tensor | None, cot: Any, o: _Opts, grad: bool):
    """No smoothing. Returns (ℓ per position without the class weight, dℓ/dz · cot in ``z``'s storage or None,
    the class weight at the labels or None). ``z`` is overwritten (the softmax is formed in place)."""
    mx, am = z.max(1, keepdim=True)
    zy = z.gather(1, yk)
    p = torch.softmax(z, 1, out=z)
    lpy = (zy - mx).add_(torch.log(p.gather(1, am)))  # z_y - max - log S, as p at the arg-max is 1/S
    u = p.scatter_(1, yk, 0.0).sum(1, keepdim=True)  # 1 - p_y = Σ_{k≠y} p_k, no cancellation
    lpy = torch.where(lpy > -C.LN2, torch.log1p(-u), lpy)
    f = (_modulator(u, cast(Any, o)) * lpy).neg_() if o.gamma != 0.0 else lpy.neg()
    wy = None if cw is None else cw[yk]
    if not grad:
        return f.squeeze(1), None, wy
    c = _kappa(lpy, u, cast(Any, o))
    if wy is not None:
        c = c * wy
    c = c * cot
    if not isinstance(c, torch.Tensor):
        c = torch.full_like(u, c)
    p.mul_(c.neg()).scatter_(1, yk, c * u)
    return f.squeeze(1), p, wy


def _chunk_smooth(z: torch.Tensor, yk: torch.Tensor, cw: torch.Tensor | None, cot: Any, o: _Opts, grad: bool):
    """Label smoothing. Returns (ℓ per position with the class weights, dℓ/dz · cot or None, the per-class terms
    f_c = -(1-p_c)^γ log p_c (for the class weight's gradient) or None)."""
    nc = z.shape[1]
    mx, am = z.max(1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, 0.0)
    zs = z.sub_(mx)
    e = torch.exp(zs)
    rest_max = e.scatter(1, am, 0.0).sum(1, keepdim=True)  # Σ over the classes but the arg-max
    s = rest_max + e.gather(1, am)
    log_s = torch.log(s)
    u = (s - e).scatter_(1, am, rest_max).div_(s)  # 1 - p_c
    lp = zs.sub_(log_s)
    lp_max = lp.gather(1, am)
    lp.scatter_(1, am, torch.where(lp_max > -C.LN2, torch.log1p(-u.gather(1, am)), lp_max))
    f = (_modulator(u, cast(Any, o)) * lp).neg_() if o.gamma != 0.0 else lp.neg()
    wf = f if cw is None else f * cw
    a, b = 1.0 - o.eps, o.eps / nc
    loss = a * wf.gather(1, yk).squeeze(1) + b * wf.sum(1)
    if not grad:
        return loss, None, f
    g = _kappa(lp, u, cast(Any, o))  # dℓ/d log p_c of class c's term, without w_c q_c
    g = torch.full_like(lp, g) if not isinstance(g, torch.Tensor) else g
    if cw is not None:
        g = g * cw
    gy = g.gather(1, yk).mul_(a)
    g = g.mul_(b).scatter_add_(1, yk, gy)  # w_c q_c κ_c
    p = e.div_(s)
    grad_z = g.sub_(p.mul_(g.sum(1, keepdim=True))).mul_(cot)
    return loss, grad_z, f


def _sweep(x, weight, bias, cw, y, idx, cot, o: _Opts, want: tuple[bool, bool, bool, bool]):
    """Every chunk of the positions ``idx`` of ``x`` (None: all): (ℓ per position with the class weights (compute
    dtype), dℓ/dx (of ``x``'s shape, zero outside ``idx``), dℓ/dW, dℓ/db, dℓ/dw of Σ cot·ℓ, each None unless
    ``want``-ed). ``y`` and a (n,) ``cot`` are those of the positions ``idx``; ``cot`` may be a number or 0-d."""
    want_x, want_w, want_b, want_cw = want
    grad = any(want)
    n, v = y.shape[0], weight.shape[0]
    cd = o.cdtype
    loss = torch.empty(n, dtype=cd, device=x.device)
    acc = torch.promote_types(weight.dtype, cd)  # the weight's gradient is summed over chunks in float32 or wider
    dx = None
    if want_x:
        dx = (torch.empty_like if idx is None else torch.zeros_like)(x, memory_format=torch.contiguous_format)
    dw = torch.zeros(weight.shape, dtype=acc, device=x.device) if want_w else None
    db = torch.zeros(v, dtype=cd, device=x.device) if want_b else None
    dcw = torch.zeros(v, dtype=cd, device=x.device) if want_cw else None
    # the loop touches each accumulator only where it is wanted, and so allocated
    dx_a, dw_a, db_a, dcw_a = (cast(torch.Tensor, t) for t in (dx, dw, db, dcw))
    a, b = 1.0 - o.eps, o.eps / v if v else 0.0
    cot_t = isinstance(cot, torch.Tensor) and cot.dim() > 0  # per position (else a number or a 0-d tensor)
    rows = max(min(o.rows, n), 1)
    # one chunk's logits (and their gradient, in place), allocated once: fresh pages for each chunk cost as much
    # as the softmax
    buf = torch.empty((rows, v), dtype=cd, device=x.device)
    half = None if x.dtype == cd else torch.empty((rows, v), dtype=x.dtype, device=x.device)
    wt = weight.t()
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        xr = x[start:stop] if idx is None else x.index_select(0, idx[start:stop])
        yr = y[start:stop]
        yk = yr.unsqueeze(1)
        cr = cot[start:stop].unsqueeze(1) if cot_t else cot
        zo = buf[:stop - start] if half is None else half[:stop - start]
        if bias is not None:
            torch.addmm(bias, xr, wt, out=zo)
        else:
            torch.mm(xr, wt, out=zo)
        z = zo if half is None else buf[:stop - start].copy_(zo)
        if o.eps:
            lr, gz, f = _chunk_smooth(z, yk, cw, cr, o, grad)
            if want_cw:
                fc = f * cr if cot_t else f * cot
                dcw_a.add_(fc.sum(0), alpha=b).index_add_(0, yr, fc.gather(1, yk).squeeze(1), alpha=a)
        else:
            f, gz, wy = _chunk_index(z, yk, cw, cr, o, grad)
            lr = f if wy is None else f * wy.squeeze(1)
            if want_cw:
                dcw_a.index_add_(0, yr, f * cr.squeeze(1) if cot_t else f * cot)
        loss[start:stop] = lr
        if gz is None or not (want_x or want_w or want_b):
            continue
        if want_b:
            db_a.add_(gz.sum(0))
        gh = gz if half is None else zo.copy_(gz)  # the matmuls run in the input's dtype
        if want_x:
            if idx is None:
                torch.mm(gh, weight, out=dx_a[start:stop])
            else:
                dx_a.index_copy_(0, idx[start:stop], gh @ weight)
        if want_w:
            if dw_a.dtype == x.dtype:
                dw_a.addmm_(gh.t(), xr)
            else:
                dw_a.add_(gh.t() @ xr)
    return loss, dx, dw, db, dcw


def _in_dtypes(grads, inputs) -> list:
    """Each gradient in its input's dtype."""
    return [g if g is None or g.dtype == t.dtype else g.to(t.dtype) for g, t in zip(grads, inputs, strict=True)]


def _reduced(x, weight, bias, cw, y, idx, cnt, rw, scale, o: _Opts, want) -> tuple[torch.Tensor, list]:
    """(the reduced loss, the wanted gradients of it in the inputs' dtypes): one sweep over the chunks."""
    loss, dx, dw, db, dcw = _sweep(x, weight, bias, cw, y, idx, scale if rw is None else rw * scale, o, want)
    if rw is not None:
        loss = loss * rw
    total = loss.sum(dtype=torch.float64).to(o.cdtype) * scale
    if dcw is not None and cnt is not None:  # the mean's denominator Σ w[y] depends on the class weights
        dcw.sub_(cnt * (total * scale))
    return total, _in_dtypes((dx, dw, db, dcw), (x, weight, bias, cw))


class _LinearFocal(torch.autograd.Function):
    """The counted positions' loss of ``F.linear(x, weight, bias)``'s logits, chunk by chunk.

    Reduced (``"sum"``, ``"mean"``): the forward also forms every wanted gradient of the reduced loss (the
    logits' gradient of a chunk is used for its two matmuls and dropped) and keeps them on the node (eager) or as
    saved tensors (under ``torch.compile``); the backward scales them, in place, by the incoming gradient (none
    for ``loss.backward()``) and hands them over, so that no second weight-sized array exists. A later backward
    through a retained graph finds them gone and computes them again from the saved inputs. ``"none"``: the
    forward computes the losses only and keeps the inputs; the backward recomputes each chunk's logits with the
    incoming per-position gradients.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, cw, y, idx, cnt, rw, scale, o: _Opts, grad: bool):
        want = tuple(bool(grad and ctx.needs_input_grad[i]) for i in range(4))
        ctx.o = o
        ctx.want = want
        with torch.no_grad(), C.no_autocast(x.device):
            if o.reduction == "none":
                loss, *_ = _sweep(x, weight, bias, cw, y, idx, 1.0, o, (False,) * 4)
                ctx.save_for_backward(x, weight, bias, cw, y, idx, rw)
                return loss if rw is None else loss * rw
            total, grads = _reduced(x, weight, bias, cw, y, idx, cnt, rw, scale, o, want)
            ctx.kept = grads
            ctx.scale_t = isinstance(scale, torch.Tensor)
            ctx.scale = None if ctx.scale_t else scale
            ctx.save_for_backward(x, weight, bias, cw, y, idx, cnt, rw, scale if ctx.scale_t else None)
            return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        o: _Opts = ctx.o
        tail = (None,) * 7
        if o.reduction == "none":
            x, weight, bias, cw, y, idx, rw = ctx.saved_tensors
            cot = grad_out.to(o.cdtype)
            with C.no_autocast(x.device):
                _, dx, dw, db, dcw = _sweep(x, weight, bias, cw, y, idx, cot if rw is None else cot * rw, o,
                                            ctx.want)
            return *_in_dtypes((dx, dw, db, dcw), (x, weight, bias, cw)), *tail
        grads, ctx.kept = ctx.kept, None  # handed over: the caller owns them
        if grads is None:  # an earlier backward through this retained graph took them
            x, weight, bias, cw, y, idx, cnt, rw, scale_t = ctx.saved_tensors
            with torch.no_grad(), C.no_autocast(x.device):
                grads = _reduced(x, weight, bias, cw, y, idx, cnt, rw, scale_t if ctx.scale_t else ctx.scale, o,
                                 ctx.want)[1]
        if not (grad_out.numel() == 1 and C.is_host(grad_out) and grad_out.item() == 1.0):
            grads = [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads]
        return *grads, *tail


# ----------------------------------------------------------------------------------------
# Under torch.compile and torch.export: the same chunk loop as one custom operator (torch.library), which the
# compiler calls as it is, like an ATen op, and generates no code for. (Traced op by op, the loop was unrolled into
# the graph and its one chunk buffer was no longer reused: the compiled step held more than the whole logits, and
# its first call compiled for twice as long.) The forward returns the loss and, reduced, the wanted gradients (an
# empty placeholder for each gradient not wanted); the backward scales them, or, for ``"none"``, runs the backward
# operator with the per-position cotangents.
# ----------------------------------------------------------------------------------------


def _op_opts(x: torch.Tensor, gamma: float, gamma_int: int, eps: float, rows: int, reduction: str) -> _Opts:
    return _Opts(gamma, None if gamma_int < 0 else gamma_int, eps, C.compute_dtype(x.dtype), rows, reduction)


def _want4(want: list[bool]) -> tuple[bool, bool, bool, bool]:
    return want[0], want[1], want[2], want[3]


def _op_grads(grads, want: list[bool], x: torch.Tensor, cd: torch.dtype) -> list[torch.Tensor]:
    """The wanted gradients, an empty placeholder for the others (an operator returns tensors only)."""
    return [g if w and g is not None else x.new_empty((0,), dtype=cd) for g, w in zip(grads, want, strict=True)]


def _fake_grads(ins, want: list[bool], x: torch.Tensor, cd: torch.dtype) -> list[torch.Tensor]:
    return [t.new_empty(t.shape) if w and t is not None else x.new_empty((0,), dtype=cd)
            for t, w in zip(ins, want, strict=True)]


@torch.library.custom_op("focal_torch::linear_focal", mutates_args=())
def _linear_focal_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cw: torch.Tensor | None,
                     y: torch.Tensor, cnt: torch.Tensor | None, rw: torch.Tensor | None, scale: torch.Tensor,
                     gamma: float, gamma_int: int, eps: float, rows: int, reduction: str,
                     want: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    o = _op_opts(x, gamma, gamma_int, eps, rows, reduction)
    with torch.no_grad(), C.no_autocast(x.device):
        if reduction == "none":
            loss = _sweep(x, weight, bias, cw, y, None, 1.0, o, (False,) * 4)[0]
            total, grads = (loss if rw is None else loss * rw), [None] * 4
        else:
            total, grads = _reduced(x, weight, bias, cw, y, None, cnt, rw, scale, o, _want4(want))
    dx, dw, db, dcw = _op_grads(grads, want, x, o.cdtype)
    return total, dx, dw, db, dcw


@_linear_focal_op.register_fake
def _linear_focal_fake(x, weight, bias, cw, y, cnt, rw, scale, gamma, gamma_int, eps, rows, reduction, want):
    cd = _op_opts(x, gamma, gamma_int, eps, rows, reduction).cdtype
    if reduction == "none":
        return x.new_empty((x.shape[0],), dtype=cd), *_fake_grads((None,) * 4, want, x, cd)
    return x.new_empty((), dtype=cd), *_fake_grads((x, weight, bias, cw), want, x, cd)


@torch.library.custom_op("focal_torch::linear_focal_backward", mutates_args=())
def _linear_focal_backward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              cw: torch.Tensor | None, y: torch.Tensor, rw: torch.Tensor | None, cot: torch.Tensor,
                              gamma: float, gamma_int: int, eps: float, rows: int,
                              want: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    o = _op_opts(x, gamma, gamma_int, eps, rows, "none")
    cot = cot.to(o.cdtype)
    with torch.no_grad(), C.no_autocast(x.device):
        _, dx, dw, db, dcw = _sweep(x, weight, bias, cw, y, None, cot if rw is None else cot * rw, o, _want4(want))
    dx, dw, db, dcw = _op_grads(_in_dtypes((dx, dw, db, dcw), (x, weight, bias, cw)), want, x, o.cdtype)
    return dx, dw, db, dcw


@_linear_focal_backward_op.register_fake
def _linear_focal_backward_fake(x, weight, bias, cw, y, rw, cot, gamma, gamma_int, eps, rows, want):
    return tuple(_fake_grads((x, weight, bias, cw), want, x, _op_opts(x, gamma, gamma_int, eps, rows, "none").cdtype))


def _linear_focal_setup(ctx, inputs, output):
    x, weight, bias, cw, y, cnt, rw, scale, gamma, gamma_int, eps, rows, reduction, want = inputs
    ctx.args, ctx.want, ctx.reduction = (gamma, gamma_int, eps, rows), want, reduction
    if reduction == "none":
        ctx.save_for_backward(x, weight, bias, cw, y, rw)
    else:
        ctx.save_for_backward(*output[1:])


def _linear_focal_backward(ctx, grad_out, *unused):
    if ctx.reduction == "none":
        grads = torch.ops.focal_torch.linear_focal_backward(*ctx.saved_tensors, grad_out, *ctx.args, ctx.want)
    else:
        grads = [g * grad_out.to(g.dtype) for g in ctx.saved_tensors]
    return *(g if w else None for g, w in zip(grads, ctx.want, strict=True)), *(None,) * 10


_linear_focal_op.register_autograd(_linear_focal_backward, setup_context=_linear_focal_setup)


def _compiled_loss(x, weight, bias, cw, y, cnt, rw, scale, o: _Opts, grad: bool) -> torch.Tensor:
    """The loss through the custom operator (under ``torch.compile``; no positions left out)."""
    want = [bool(grad and t is not None and t.requires_grad) for t in (x, weight, bias, cw)]
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(scale, dtype=o.cdtype, device=x.device)
    return torch.ops.focal_torch.linear_focal(x, weight, bias, cw, y, cnt, rw, scale, o.gamma,
                                              -1 if o.gamma_int is None else o.gamma_int, o.eps, o.rows,
                                              o.reduction, want)[0]


def _option(value: Any) -> Any:
    """A number option as the spec checks it: plain numbers as they are (also under ``torch.compile``, where they
    are constants of the graph), tensors as :func:`C.spec_value` shows them."""
    return value if type(value) in (int, float) else C.spec_value(value)


def _unfused(input, weight, target, bias, gamma, class_weight, ignore_index, label_smoothing, where, reduction,
             process_group):
    """The definition: the loss of the materialised logits (class dim last)."""
    return softmax_focal_loss(F.linear(input, weight, bias), target, gamma=gamma, weight=class_weight,
                              ignore_index=ignore_index, label_smoothing=label_smoothing, where=where, dim=-1,
                              reduction=reduction, process_group=process_group)


def linear_softmax_focal_loss(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    gamma: float = focal_spec.GAMMA,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = focal_spec.IGNORE_INDEX,
    label_smoothing: float = focal_spec.LABEL_SMOOTHING,
    where: torch.Tensor | None = None,
    reduction: str = focal_spec.REDUCTION,
    chunk_size: int | None = None,
    process_group: Any = None,
) -> torch.Tensor:
    r"""Softmax focal loss of the logits ``F.linear(input, weight, bias)``, computed without materialising them.

    By definition the value and every gradient are those of
    ``softmax_focal_loss(F.linear(input, weight, bias), target, gamma=gamma, weight=class_weight,
    ignore_index=ignore_index, label_smoothing=label_smoothing, where=where, dim=-1, reduction=reduction,
    process_group=process_group)``; per counted position :math:`i`, with :math:`z_i = W x_i + b` and
    :math:`p = \mathrm{softmax}(z_i)`,

    .. math::
        \ell_i = -\sum_c w_c \, q_c \, (1-p_c)^{\gamma} \log p_c, \qquad
        q = (1-\varepsilon)\,\mathrm{onehot}(y_i) + \varepsilon/V,

    which is :math:`-w_{y}(1-p_{y})^{\gamma}\log p_{y}` without smoothing, and ``F.cross_entropy`` of the
    logits at ``gamma=0``. For a vocabulary-sized V the (positions, V) logits are the largest tensors of a
    training step (N=8192, V=128k: 4 GiB in float32, and as much again for their gradient); here only one
    chunk of ``chunk_size`` positions' logits exists at a time.

    How it is computed. The counted positions are taken ``chunk_size`` at a time. For each chunk the logits
    are one matmul (in the input's dtype) into a buffer allocated once; the softmax is formed in place, in the
    compute dtype, and from it :math:`1-p_y = \sum_{k\ne y} p_k` (no cancellation as :math:`p_y \to 1`) and
    :math:`\log p_y`; the logits' gradient is :math:`\kappa_i (p_k - [k = y_i])` with one scalar
    :math:`\kappa_i` per position (with smoothing, :math:`g_k - p_k \sum_c g_c`, :math:`g_c` the derivative by
    :math:`\log p_c` of class c's term), written over the softmax, and used at once for the chunk's two
    gradient matmuls, :math:`\partial/\partial x` and :math:`\partial/\partial W` (summed over chunks in float32
    or wider). With ``reduction="sum"`` or ``"mean"`` this happens in the forward (three matmuls, as the
    unfused forward and backward have); the gradients of the reduced loss are kept (the sizes of ``input``,
    ``weight``, ``bias`` and ``class_weight``, which the backward returns: as they are for ``loss.backward()``,
    else scaled by the incoming gradient). With ``reduction="none"`` the forward computes the losses only (one
    matmul) and the backward computes each chunk's logits again with the incoming per-position gradients (three
    more). Memory beyond the inputs and the gradients: one chunk's logits in the compute dtype (and one in
    the input's dtype for float16/bfloat16), plus arrays of the size of ``input``. Positions not counted
    (``ignore_index``, ``where=False``) are left out before the matmuls.

    Under ``torch.compile`` (and ``torch.export``) the same chunked computation runs as one custom operator,
    ``torch.ops.focal_torch.linear_focal`` (``torch.library``): the compiler calls it as it is and generates no code
    for it, so the memory stays one chunk's logits (uncounted positions masked instead of left out; a label
    outside [0, V) gives a NaN loss instead of the error). A reduced loss there holds one more array of
    ``weight``'s size than in eager mode: the backward scales a copy of the gradients formed in the forward.
    Under ``torch.func`` transforms (``grad``, ``vmap``, ...) the loss is computed as its definition, on
    materialised logits, with :func:`focal_torch.softmax_focal_loss`.

    Args:
      input: hidden states of shape (..., D), a floating ``torch.Tensor`` (any layout).
      weight: the output projection, shape (V, D) (``nn.Linear``'s layout; a tied embedding, or ``w.t()`` of a
        (D, V) parameter), ``input``'s dtype.
      target: integer class indices (any integer dtype, compared without wrapping) of shape ``input.shape[:-1]``.
      bias: optional (V,), any floating dtype: one other than ``input``'s is cast to it (its gradient comes back in
        its own dtype).
      gamma: focusing parameter :math:`\gamma \ge 0`, a number. Whole numbers up to 8 use multiplications only.
      class_weight: optional per-class weights of shape (V,) (differentiable); ``softmax_focal_loss``'s
        ``weight``.
      ignore_index: class index whose positions contribute 0.
      label_smoothing: :math:`\varepsilon \in [0, 1]`, a number.
      where: boolean tensor broadcasting to ``input.shape[:-1]``; ``False`` positions contribute 0, with an
        exactly zero gradient.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (divided by :math:`\sum_i w_{y_i}` over counted positions;
        0 when that is exactly 0).
      chunk_size: positions per chunk, an integer >= 1, or None: as many as keep one chunk's float32 logits
        within 1/9 of all the logits' bytes and 64 MiB (``focal_spec.pick_chunk_size``); under ``torch.compile``
        and ``torch.export``, within 64 MiB only (a chunk picked from the batch size would fix a dynamic batch).
      process_group: a ``torch.distributed`` process group: with ``"mean"`` the denominator is all-reduced, as
        for :func:`focal_torch.softmax_focal_loss`.

    Returns:
      ``"none"``: the per-position loss, shape ``input.shape[:-1]``, ``input``'s dtype. ``"mean"`` and ``"sum"``:
      a 0-d tensor of ``input``'s dtype.

    Precision: float32 and float64 as the unfused loss on the logits that the chunk's matmul gives. float16 and
    bfloat16: the matmuls run in that dtype (float32 accumulation, as torch's), the logits are rounded to it
    once, as ``F.linear`` rounds them, and everything after that is float32; the gradient by ``weight`` is
    summed over the chunks in float32 and rounded once.

    Raises:
      TypeError: ``input`` or ``weight`` not a tensor or not floating, of different dtypes; a floating ``target``;
        ``gamma`` not a number; a ``chunk_size`` that is not an integer.
      ValueError: shapes of ``weight``, ``bias``, ``target``, ``class_weight`` or ``where`` that do not fit; ``gamma``
        < 0; ``label_smoothing`` outside [0, 1]; an unknown ``reduction``; ``chunk_size`` < 1; in eager mode a
        counted label outside [0, V).

    Examples:
      >>> import torch
      >>> from focal_torch import linear_softmax_focal_loss
      >>> hidden = torch.tensor([[1.0, -0.5], [0.2, 0.3], [2.0, 1.0]], requires_grad=True)
      >>> weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]], requires_grad=True)
      >>> labels = torch.tensor([0, 2, -100])
      >>> loss = linear_softmax_focal_loss(hidden, weight, labels, gamma=2.0, chunk_size=2)
      >>> print(f"{loss.item():.6f}")
      0.301246
      >>> loss.backward()
      >>> print(hidden.grad[2])
      tensor([0., 0.])

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002.
    """
    C.check_tensor("input", input)
    C.check_tensor("weight", weight)
    target = C.checked_target(input, target, weight=weight, bias=bias, class_weight=class_weight, where=where)
    where_dtype = None if where is None else (where.dtype if isinstance(where, torch.Tensor) else
                                              torch.as_tensor(where).dtype)
    if chunk_size is None and C.is_compiling() and weight.dim() == 2:
        # the chunk from the memory budget alone: one picked from the batch size would specialise a dynamic batch
        chunk_size = focal_spec.pick_chunk_size(2**62, input.shape[-1], weight.shape[0], input.element_size())
    so = focal_spec.linear_options(
        tuple(input.shape), input.dtype, tuple(weight.shape), weight.dtype, C.shape_of(bias), tuple(target.shape),
        target.dtype, gamma=_option(gamma), class_weight_shape=C.shape_of(class_weight), ignore_index=ignore_index,
        label_smoothing=_option(label_smoothing), reduction=reduction, chunk_size=chunk_size,
        where_shape=C.shape_of(where), where_dtype="bool" if where_dtype is None else where_dtype,
        bias_dtype=None if bias is None else bias.dtype, class_weight=C.spec_value(class_weight))
    if bias is not None and bias.dtype != input.dtype:  # the spec has checked that it is floating
        bias = bias.to(input.dtype)
    if C.any_transformed(input, weight, bias, class_weight, target):
        return _unfused(input, weight, target, bias, gamma, class_weight, ignore_index, label_smoothing, where,
                        reduction, process_group)
    dev = input.device
    cd = torch.float64 if input.dtype == torch.float64 else torch.float32
    eps = so.label_smoothing if so.label_smoothing is not None else float(label_smoothing)
    rows = (so.chunk_size if chunk_size is not None
            else focal_spec.pick_chunk_size(so.n_positions, so.hidden_dim, so.num_classes, input.element_size()))
    o = _Opts(so.gamma, so.gamma_int, float(eps), cd, rows, so.reduction)
    v, d, n = so.num_classes, so.hidden_dim, so.n_positions
    x = input.reshape(n, d)
    y = target.reshape(n).to(device=dev, dtype=torch.int64)
    cw = None if class_weight is None else C.as_tensor(class_weight, dtype=None, device=dev)
    cw = None if cw is None else (cw if cw.dtype == cd else cw.to(cd))
    info = torch.iinfo(target.dtype)
    ii = so.ignore_index
    counted = (y != ii) if info.min <= ii <= info.max else None  # an index the dtype cannot hold matches nothing
    if where is not None:
        mask = torch.broadcast_to(cast(torch.Tensor, C.as_tensor(where, dtype=torch.bool, device=dev)),
                               so.positions).reshape(n)
        counted = mask if counted is None else counted & mask
    eager = not C.is_compiling()
    rw = None  # row weights: under torch.compile the uncounted rows are masked, not removed
    bad = None
    idx = None
    if eager:
        out = (y < 0) | (y >= v)
        if counted is not None:
            out &= counted
        if dev.type != "meta" and n and bool(out.any()):
            raise ValueError(focal_spec.label_out_of_range(int(y[out][0]), v, ii))
        if counted is not None and not bool(counted.all()):
            idx = counted.nonzero().squeeze(1)
            y = y[idx]
    else:
        bad = (y < 0) | (y >= v)
        if counted is not None:
            bad = bad & counted
            rw = counted.to(cd)
            # the uncounted rows are weighted by 0, and 0 · NaN is NaN: whatever they hold never enters the sweep
            x = torch.where(counted.unsqueeze(1), x, 0.0)
        y = torch.where(bad if counted is None else bad | ~counted, 0, y)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, cw))
    cnt = None
    scale: Any = 1.0
    if o.reduction == "mean":
        if cw is None:
            count: Any = y.shape[0] if rw is None else rw.sum()
        else:
            wy = cw.detach()[y]
            count = wy.sum() if rw is None else (wy * rw).sum()
            if process_group is None and cw.requires_grad:
                cnt = torch.zeros(v, dtype=cd, device=dev).index_add_(0, y, rw if rw is not None else
                                                                       torch.ones_like(wy))
        if eager and process_group is None and isinstance(count, torch.Tensor) and dev.type == "cpu":
            count = float(count)
        scale = _distributed.mean_scale(count, process_group, dtype=cd, device=dev)
    try:
        loss = (_LinearFocal.apply(x, weight, bias, cw, y, idx, cnt, rw, scale, o, grad) if eager else
                _compiled_loss(x, weight, bias, cw, y, cnt, rw, scale, o, grad))
    except RuntimeError:
        if not eager or not C.functions_refused():
            raise
        # a torch.func transform that wrapped none of the tensors: the unfused formula
        return _unfused(input, weight, target, bias, gamma, class_weight, ignore_index, label_smoothing, where,
                        reduction, process_group)
    if o.reduction == "none":
        if idx is not None:
            loss = torch.zeros(n, dtype=cd, device=dev).index_copy(0, idx, loss)
        if bad is not None:
            loss = torch.where(bad, math.nan, loss)
        return loss.reshape(so.positions).to(input.dtype)
    if bad is not None:
        loss = loss + torch.where(bad, math.nan, 0.0).sum()
    return loss.to(input.dtype)


class LinearSoftmaxFocalLoss(torch.nn.Module):
    r"""Module form of :func:`focal_torch.linear_softmax_focal_loss`.

    It holds the options only (``class_weight`` and ``where`` tensors as buffers), not the projection: the
    weight usually belongs to the model (its output layer, or an embedding tied to it), so it is passed at each
    call, ``loss(input, weight, target, bias=None)``; see the function for the semantics.

    Args:
      gamma: focusing parameter, a number >= 0.
      class_weight: optional per-class weights of shape (V,).
      ignore_index: class index whose positions contribute 0.
      label_smoothing: in [0, 1].
      where: optional boolean tensor broadcasting to the positions.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      chunk_size: positions per chunk, or None (picked from the sizes).
      process_group: optional ``torch.distributed`` process group for an exact global mean.

    A call returns what :func:`focal_torch.linear_softmax_focal_loss` returns.

    Raises:
      ValueError: ``gamma`` < 0, ``label_smoothing`` outside [0, 1], an unknown ``reduction`` or a
        ``chunk_size`` < 1 (at construction); the function's errors at call.
      TypeError: a ``chunk_size`` that is not an integer (at construction).

    Examples:
      >>> import torch
      >>> from focal_torch import LinearSoftmaxFocalLoss
      >>> head = torch.nn.Linear(2, 3)
      >>> loss = LinearSoftmaxFocalLoss(gamma=2.0, chunk_size=64)
      >>> loss
      LinearSoftmaxFocalLoss(gamma=2.0, class_weight=None, ignore_index=-100, label_smoothing=0.0, where=None,
                             reduction='mean', chunk_size=64)
      >>> value = loss(torch.randn(5, 2), head.weight, torch.tensor([0, 1, 2, 1, -100]), bias=head.bias)
      >>> value.shape, value.requires_grad
      (torch.Size([]), True)

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002.
    """

    class_weight: torch.Tensor | None
    where: torch.Tensor | None

    def __init__(self, gamma: float = focal_spec.GAMMA, class_weight: torch.Tensor | None = None,
                 ignore_index: int = focal_spec.IGNORE_INDEX, label_smoothing: float = focal_spec.LABEL_SMOOTHING,
                 where: torch.Tensor | None = None, reduction: str = focal_spec.REDUCTION,
                 chunk_size: int | None = None, process_group: Any = None) -> None:
        super().__init__()
        focal_spec.check_linear_gamma(C.spec_value(gamma))  # one number, as the function takes
        _check_options(gamma, reduction, label_smoothing)
        focal_spec.check_chunk_size(chunk_size)
        self.gamma = gamma
        _store(self, "class_weight", class_weight)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        _store(self, "where", where)
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.process_group = process_group

    def forward(self, input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_softmax_focal_loss(input, weight, target, bias=bias, gamma=self.gamma,
                                         class_weight=self.class_weight, ignore_index=self.ignore_index,
                                         label_smoothing=self.label_smoothing, where=self.where,
                                         reduction=self.reduction, chunk_size=self.chunk_size,
                                         process_group=self.process_group)

    def extra_repr(self) -> str:
        s = (f"gamma={_show(self.gamma)}, class_weight={_show(self.class_weight)}, "
             f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, where={_show(self.where)}, "
             f"reduction={self.reduction!r}, chunk_size={self.chunk_size!r}")
        return s + (f", process_group={self.process_group!r}" if self.process_group is not None else "")
