"""Fused linear + softmax focal loss: the loss on ``hidden @ weight.T + bias`` without the (N, V) logits.

The classes are taken a block at a time (and the positions a chunk at a time when there are more of them
than ``chunk_size``); a block's logits are one matmul in the inputs' dtype accumulated in float32 (float64 for
float64 inputs), and everything after it runs in that dtype. One ``jax.custom_vjp``:

- forward, pass 1 over the class blocks: per position the running maximum M, S = Σ_k e_k with e_k = exp(x_k - M),
  Σ_{k≠y} e_k (so that 1 - p_y is a sum, never 1 - p_y), the sum over every class but one arg-max, and x_y;
  the sums are rescaled when a block raises M. Without label smoothing the loss -w_y (1-p_y)^γ log p_y and the
  one scalar a = w_y κ_y of the gradient ∂ℓ/∂x_k = a (δ_ky - p_k) follow from these (``_softmax``'s closed
  forms). With label smoothing every class has its own modulator, so pass 2 recomputes each block's logits and
  sums Σ_k w_k q_k F_k (the loss) and Σ_k w_k q_k κ_k (the gradient's ∂ℓ/∂x_k = A_k (1-p_k) - p_k Σ_{c≠k} A_c).
- backward: one more pass over the class blocks recomputes the logits, forms their gradient times the
  cotangent, and multiplies it into ∂hidden (summed over blocks: N×D) and the block's rows of ∂weight and
  ∂bias (written once, never accumulated: no second weight-sized buffer).

Cost: 4 matmuls of N·D·V (5 with label smoothing) against the materialised loss's 3; kept between the passes,
O(N) numbers per position; at any time one block's logits and a few same-sized temporaries.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp

import focal_spec
from focal_jax import _common, _softmax
from focal_jax._softmax import softmax_focal_loss

_Static = tuple  # (gamma, gamma_int, smoothing?, positions per chunk, classes per block, V, the inputs' dtype)


def _block_logits(h: jax.Array, wb: jax.Array, bb: jax.Array | None, real: jax.Array, cdt: Any) -> jax.Array:
    """One block's logits h @ wb.T (+ bb): a matmul in the inputs' dtype accumulated in ``cdt``; -inf at the
    padding classes beyond V."""
    x = jax.lax.dot_general(h, wb, (((1,), (1,)), ((), ())), preferred_element_type=cdt)
    if bb is not None:
        x = x + bb
    return jnp.where(real, x, -jnp.inf)


def _classes(start: jax.Array, vc: int, v: int) -> tuple[jax.Array, jax.Array]:
    cls = start + jnp.arange(vc, dtype=jnp.int32)
    return cls, cls < v


def _stats(static: _Static, h, w3, b2, code):
    """Pass 1 over the class blocks, per position: M = max_k x_k, S = Σ_k e_k (e_k = exp(x_k - M)), the sum
    over every class but one arg-max (cancellation-free 1 - p at the arg-max), Σ_{k≠y} e_k and x_y. Sums are
    rescaled when a block raises the running maximum."""
    vc, v, cdt = static[4], static[5], h.dtype if h.dtype == jnp.float64 else jnp.float32

    def step(carry, xs):
        m, s_all, s_wo1, s_noty, xy = carry
        wb, bb, start = xs
        cls, real = _classes(start, vc, v)
        x = _block_logits(h, wb, bb, real, cdt)
        bm = jnp.max(x, axis=1)
        m_new = jnp.maximum(m, bm)
        safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        r = jnp.exp(m - safe)
        e = jnp.exp(x - safe[:, None])
        at_max = (x == bm[:, None]) & real
        blk = jnp.sum(e, axis=1)
        blk_wo1 = jnp.sum(jnp.where(at_max, 0.0, e), axis=1) + (jnp.sum(at_max, axis=1, dtype=cdt) - 1.0)
        s_wo1 = jnp.where(bm > m, s_all * r + blk_wo1, s_wo1 * r + blk)
        is_y = cls[None, :] == code[:, None]
        s_noty = s_noty * r + jnp.sum(jnp.where(is_y, 0.0, e), axis=1)
        xy = xy + jnp.sum(jnp.where(is_y, x, 0.0), axis=1)
        return (m_new, s_all * r + blk, s_wo1, s_noty, xy), None

    zero = jnp.zeros_like(code, cdt)  # of the positions' type (varying inside shard_map)
    init = (zero - jnp.inf, zero, zero, zero, zero)
    starts = jnp.arange(w3.shape[0], dtype=jnp.int32) * vc
    (m, s_all, s_wo1, s_noty, xy), _ = jax.lax.scan(step, init, (w3, b2, starts))
    return jnp.where(code >= 0, m, 0.0), s_all, s_wo1, s_noty, xy


def _dense_terms(static, x, cls, real, code, m, s, s_wo1, cwb, eps, rs):
    """Per class of a block, for the smoothed loss: p, 1-p, κ, the focal term F = -(1-p)^γ log p, the class
    weight (0 beyond V) and w_k q_k times the row scale (as ``softmax_focal_loss``'s dense kernel)."""
    gamma, gamma_int, v = static[0], static[1], static[5]
    z = jnp.where(real, x - m[:, None], 0.0)
    e = jnp.where(real, jnp.exp(z), 0.0)
    at_max = (z == 0) & real
    others = jnp.where(at_max, s_wo1[:, None], s[:, None] - e)
    logp, log1mp, omp = _softmax._log_parts(others, s[:, None], z)
    p = e / s[:, None]
    mod, kappa = _softmax._modulator_and_kappa(p, logp, log1mp, omp, gamma, gamma_int)
    f = -(mod * logp)
    wk = real.astype(x.dtype) if cwb is None else jnp.where(real, cwb, 0.0)
    is_y = cls[None, :] == code[:, None]
    q = jnp.where(is_y, 1.0 - eps + eps / v, eps / v)
    wq = jnp.where(real, wk * q * rs[:, None], 0.0)
    return p, omp, kappa, f, wk, wq, is_y


def _forward(static: _Static, h, w3, b2, cw2, eps, code, rs):
    """Per-position loss and what the backward pass needs of each position."""
    smoothing, vc, v = static[2], static[4], static[5]
    m, s_all, s_wo1, s_noty, xy = _stats(static, h, w3, b2, code)
    if not smoothing:
        z_y = jnp.where(code >= 0, xy - m, 0.0)
        s = s_noty + jnp.exp(z_y)
        logp, log1mp, omp = _softmax._log_parts(s_noty, s, z_y)
        mod, kappa = _softmax._modulator_and_kappa(jnp.exp(logp), logp, log1mp, omp, static[0], static[1])
        f = -(mod * logp)
        wy = rs if cw2 is None else rs * cw2.reshape(-1)[jnp.maximum(code, 0)]
        # dℓ/dx_k = a (δ_ky (1 - p_y) - (1 - δ_ky) p_k), a = w_y κ_y
        return wy * f, (m, s, s_noty, wy * kappa, jnp.where(code >= 0, f, 0.0))
    cdt = s_all.dtype
    starts = jnp.arange(w3.shape[0], dtype=jnp.int32) * vc

    def step(carry, xs):
        loss, sum_a, t, wfy = carry
        wb, bb, cwb, start = xs
        cls, real = _classes(start, vc, v)
        x = _block_logits(h, wb, bb, real, cdt)
        p, omp, kappa, f, wk, wq, is_y = _dense_terms(static, x, cls, real, code, m, s_all, s_wo1, cwb, eps, rs)
        wf = jnp.where(real, wk * f, 0.0)
        return (loss + jnp.sum(wq * f, axis=1), sum_a + jnp.sum(wq * kappa, axis=1), t + jnp.sum(wf, axis=1),
                wfy + jnp.sum(jnp.where(is_y, wf, 0.0), axis=1)), None

    zero = jnp.zeros_like(code, cdt)
    (loss, sum_a, t, wfy), _ = jax.lax.scan(step, (zero, zero, zero, zero), (w3, b2, cw2, starts))
    # dℓ/dε = Σ_k w_k F_k / V - w_y F_y
    return loss, (m, s_all, s_wo1, sum_a, rs * (t / v - wfy))


def _backward(static: _Static, h, w3, b2, cw2, eps, code, rs, saved, ct):
    """Recomputes each class block's logits, forms their gradient (times the cotangent ``ct`` per position)
    and multiplies it into the gradients of the hidden states, of the block's weight rows and of its bias."""
    smoothing, vc, v, hdt = static[2], static[4], static[5], static[6]
    cdt = saved[0].dtype
    h32 = h.astype(cdt)
    starts = jnp.arange(w3.shape[0], dtype=jnp.int32) * vc

    def step(dh, xs):
        wb, bb, cwb, start = xs
        cls, real = _classes(start, vc, v)
        x = _block_logits(h, wb, bb, real, cdt)
        dcw = None
        if not smoothing:
            m, s, others, a, _ = saved
            per_e = a / s
            e = jnp.exp(x - m[:, None])
            unit = jnp.where(cls[None, :] == code[:, None], (per_e * others)[:, None], -e * per_e[:, None])
        else:
            m, s, s_wo1, sum_a, _ = saved
            p, omp, kappa, f, _, wq, _ = _dense_terms(static, x, cls, real, code, m, s, s_wo1, cwb, eps, rs)
            a = wq * kappa
            unit = a * omp - p * (sum_a[:, None] - a)
            if cwb is not None:  # dℓ/dw_k = q_k F_k
                q = jnp.where(real, jnp.where(cls[None, :] == code[:, None], 1.0 - eps + eps / v, eps / v), 0.0)
                dcw = jnp.sum((ct * rs)[:, None] * q * f, axis=0)
        dx = ct[:, None] * unit
        dw = jax.lax.dot_general(dx, h32, (((0,), (0,)), ((), ())), preferred_element_type=cdt)
        dh = dh + jax.lax.dot_general(unit.astype(hdt), wb, (((1,), (0,)), ((), ())), preferred_element_type=cdt)
        db = None if bb is None else jnp.sum(dx, axis=0)
        return dh, (dw, db, dcw)

    dh0 = jnp.zeros_like(h, cdt)
    dh, (dw, db, dcw) = jax.lax.scan(step, dh0, (w3, b2, cw2, starts))
    dh = dh * ct[:, None]
    if cw2 is not None and not smoothing:
        f = saved[4]
        dcw = jnp.zeros((w3.shape[0] * vc,), cdt).at[jnp.maximum(code, 0)].add(ct * rs * f).reshape(w3.shape[0], vc)
    deps = jnp.sum(ct * saved[4]) if smoothing else jnp.zeros((), cdt)
    return dh, dw, db, dcw, deps


def _varying_alike(*args: Any) -> tuple[Any, ...]:
    """Inside ``shard_map``, every argument made varying over the mapped axes that any of them varies over, so
    that each cotangent has its input's type (the replicated weight's is then summed over the devices by
    ``pcast``'s transpose, as for any replicated input)."""
    vma = [frozenset() if a is None else _varying(jax.typeof(a)) for a in args]
    axes = frozenset().union(*vma)
    return tuple(a if a is None or not (axes - m) else jax.lax.pcast(a, tuple(sorted(axes - m)), to="varying")
                 for a, m in zip(args, vma, strict=True))


def _varying(aval: Any) -> frozenset:
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def _row_chunks(a: Any, rows: int) -> Any:
    return None if a is None else a.reshape((a.shape[0] // rows, rows) + a.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(static: _Static, h, w3, b2, cw2, eps, code, rs):
    """Per-position loss of the (position-padded, class-blocked) inputs."""
    return _fused_fwd(static, h, w3, b2, cw2, eps, code, rs)[0]


def _fused_fwd(static, h, w3, b2, cw2, eps, code, rs):
    rows = static[3]
    if h.shape[0] == rows:
        loss, saved = _forward(static, h, w3, b2, cw2, eps, code, rs)
    else:
        loss, saved = jax.lax.map(lambda xs: _forward(static, xs[0], w3, b2, cw2, eps, xs[1], xs[2]),
                                  (_row_chunks(h, rows), _row_chunks(code, rows), _row_chunks(rs, rows)))
        loss, saved = loss.reshape(-1), jax.tree.map(lambda a: a.reshape(-1), saved)
    return loss, (h, w3, b2, cw2, eps, code, rs, saved)


def _fused_bwd(static, res, ct):
    h, w3, b2, cw2, eps, code, rs, saved = res
    rows, hdt = static[3], static[6]
    if h.shape[0] == rows:
        dh, dw, db, dcw, deps = _backward(static, h, w3, b2, cw2, eps, code, rs, saved, ct)
    else:
        # chunks of positions: the weight's (and bias', class weights') gradient is summed over them
        def step(acc, xs):
            hc, cc, rc, sc, tc = xs
            dh, *grads = _backward(static, hc, w3, b2, cw2, eps, cc, rc, sc, tc)
            return jax.tree.map(jnp.add, acc, tuple(grads)), dh

        z = jnp.sum(jnp.zeros_like(rs))  # 0 of the positions' type (varying inside shard_map)
        zeros = (jnp.zeros(w3.shape, z.dtype) + z, None if b2 is None else jnp.zeros_like(b2) + z,
                 None if cw2 is None else jnp.zeros_like(cw2) + z, z)
        xs = (_row_chunks(h, rows), _row_chunks(code, rows), _row_chunks(rs, rows),
              jax.tree.map(lambda a: _row_chunks(a, rows), saved), _row_chunks(ct, rows))
        (dw, db, dcw, deps), dh = jax.lax.scan(step, zeros, xs)
        dh = dh.reshape(h.shape)
    return dh.astype(hdt), dw.astype(hdt), db, dcw, deps.astype(eps.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def linear_softmax_focal_loss(
    hidden: jax.typing.ArrayLike,
    weight: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    gamma: float = focal_spec.GAMMA,
    class_weight: jax.typing.ArrayLike | None = None,
    ignore_index: int = focal_spec.IGNORE_INDEX,
    label_smoothing: jax.typing.ArrayLike = focal_spec.LABEL_SMOOTHING,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = focal_spec.REDUCTION,
    chunk_size: int | None = None,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Softmax focal loss of a linear layer's output, without materialising the logits.

    By definition the value is

    .. code-block:: python

        softmax_focal_loss(hidden @ weight.T + bias, labels, gamma=gamma, weight=class_weight,
                           ignore_index=ignore_index, label_smoothing=label_smoothing, where=where,
                           reduction=reduction, axis=-1, axis_name=axis_name)

    and so is every gradient (``hidden``, ``weight``, ``bias``, ``class_weight``, ``label_smoothing``), but the
    (..., V) logits are never held: ``chunk_size`` positions are computed at a time. ``gamma=0`` is the fused
    linear cross-entropy. Each chunk's logits are a matmul in the inputs' dtype accumulated in float32
    (float64 for float64 inputs), and everything after it runs in that dtype.

    Args:
      hidden: hidden states (..., D), floating.
      weight: (V, D), the output layer's weight (``nn.Linear``'s layout, or a tied embedding), of the
        hidden states' dtype.
      labels: integer class indices of shape ``hidden.shape[:-1]`` (any integer dtype).
      bias: optional (V,) bias.
      gamma: focusing parameter γ >= 0, a number (static under ``jit``).
      class_weight: optional per-class weights (V,) (``softmax_focal_loss``'s ``weight``).
      ignore_index: labels equal to it contribute 0 and are not counted.
      label_smoothing: ε in [0, 1] (0-d), as in ``F.cross_entropy``.
      where: optional boolean mask broadcasting to ``hidden.shape[:-1]``; False positions contribute 0,
        are not counted and get a zero gradient.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      chunk_size: positions per chunk, an integer >= 1, or None to pick one from the sizes
        (``focal_spec.pick_blocks``). It changes the memory held, not the result.
      axis_name: inside ``shard_map`` or ``pmap``, the mapped axis to ``psum`` the sum and the mean's
        denominator over (the exact global mean). Ignored for ``"none"``.

    Returns:
      As ``softmax_focal_loss``: the per-position loss of shape ``hidden.shape[:-1]`` for ``"none"``, else a
      scalar; in the hidden states' dtype. A label outside [0, V) that is not ``ignore_index`` makes its
      position's loss NaN.

    Raises:
      TypeError: non-floating ``hidden``, a ``weight`` of another dtype, non-integer labels, a non-boolean
        ``where``, an array ``gamma``, a non-integer ``chunk_size``.
      ValueError: shapes of ``weight``, ``bias``, ``labels``, ``class_weight`` or ``where`` that do not fit,
        ``chunk_size`` <= 0, or an option out of range.

    Examples:
      >>> import jax.numpy as jnp
      >>> import focal_jax
      >>> hidden = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> weight = jnp.array([[2.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
      >>> labels = jnp.array([0, 1, 2])
      >>> print(f"{focal_jax.linear_softmax_focal_loss(hidden, weight, labels, chunk_size=2):.4f}")
      0.7618
      >>> print(f"{focal_jax.softmax_focal_loss(hidden @ weight.T, labels):.4f}")
      0.7618
    """
    hidden, weight, labels = _common.as_array(hidden), _common.as_array(weight), _common.as_array(labels, "labels")
    opts = focal_spec.linear_options(
        hidden.shape, hidden.dtype, weight.shape, weight.dtype, _common.shape_of(bias), labels.shape,
        labels.dtype, gamma=gamma, class_weight_shape=_common.shape_of(class_weight), ignore_index=ignore_index,
        label_smoothing=_common.host_value(label_smoothing), reduction=reduction, chunk_size=chunk_size,
        where_shape=_common.shape_of(where), where_dtype=_common.dtype_of(where), bias_dtype=_common.dtype_of(bias),
        class_weight=_common.host_value(class_weight),
    )
    cdt = _common.compute_dtype(hidden.dtype)
    n, d, v = opts.n_positions, opts.hidden_dim, opts.num_classes
    rows, vc = (focal_spec.pick_blocks(n, d, v, hidden.dtype.itemsize) if chunk_size is None
                else (opts.chunk_size, focal_spec.class_block(opts.chunk_size, v)))
    rows = max(min(rows, n), 1)
    y = labels.reshape(n)
    valid = jnp.ones((n,), bool) if where is None else jnp.broadcast_to(jnp.asarray(where, bool),
                                                                         opts.positions).reshape(n)
    counted, in_range = _common.label_masks(y, opts.ignore_index, v)
    valid = valid & counted
    # the row scale: 1 at counted positions, 0 elsewhere, NaN at a counted label outside [0, V)
    rs = jnp.where(valid & ~in_range, jnp.nan, valid.astype(cdt)).astype(cdt)
    code = jnp.where(valid & in_range, y.astype(jnp.int32), -1)
    b = None if bias is None else jnp.asarray(bias, cdt)
    cw = None if class_weight is None else jnp.asarray(class_weight, cdt)
    eps = jnp.asarray(label_smoothing, cdt)
    if n == 0 or v == 0:  # nothing to chunk: the logits are empty
        x = _block_logits(hidden.reshape(n, d), weight, b, jnp.ones((v,), bool), cdt)
        return softmax_focal_loss(x.reshape(opts.positions + (v,)), labels, gamma=opts.gamma, weight=cw,
                                  ignore_index=opts.ignore_index, label_smoothing=eps, where=where,
                                  reduction=opts.reduction, axis_name=axis_name).astype(hidden.dtype)
    # masked positions' hidden states never reach the arithmetic (NaN or inf there gives a zero gradient)
    h = jnp.where(valid[:, None], hidden.reshape(n, d), jnp.zeros((), hidden.dtype))
    pad = -n % rows
    if pad:
        h = jnp.concatenate([h, jnp.zeros((pad, d), h.dtype)])
        code = jnp.concatenate([code, jnp.full((pad,), -1, code.dtype)])
        rs = jnp.concatenate([rs, jnp.zeros((pad,), cdt)])
    nb, vpad = -(-v // vc), -v % vc
    w = weight if not vpad else jnp.concatenate([weight, jnp.zeros((vpad, d), weight.dtype)])
    b2 = None if b is None else (b if not vpad else jnp.concatenate([b, jnp.zeros((vpad,), cdt)])).reshape(nb, vc)
    cw2 = None if cw is None else (cw if not vpad else jnp.concatenate([cw, jnp.zeros((vpad,), cdt)])).reshape(nb, vc)
    smoothing = opts.label_smoothing is None or opts.label_smoothing != 0.0
    static = (opts.gamma, opts.gamma_int, smoothing, rows, vc, v, jnp.dtype(hidden.dtype))
    loss = _fused(static, *_varying_alike(h, w.reshape(nb, vc, d), b2, cw2, eps, code, rs))[:n]
    if opts.reduction == "none":
        return loss.reshape(opts.positions).astype(hidden.dtype)
    total = jnp.sum(loss)
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    if opts.reduction == "sum":
        return total.astype(hidden.dtype)
    count = jnp.sum(rs if cw is None else rs * cw[jnp.clip(code, 0, v - 1)])
    if axis_name is not None:
        count = jax.lax.psum(count, axis_name)
    nothing = count == 0
    mean = jnp.where(nothing, jnp.zeros_like(total), total / jnp.where(nothing, jnp.ones_like(count), count))
    return mean.astype(hidden.dtype)
