"""Fused linear + softmax focal loss: the loss on ``hidden @ weight.T + bias`` without the (N, V) logits.

The positions are taken a chunk at a time (``chunk_size`` rows of ``hidden``, all V classes). A chunk's
logits are one matmul in the inputs' dtype with float32 accumulation; on them the chunk's per-position loss
and its logits' gradient are exactly those of :func:`focal_jax.softmax_focal_loss` (the same closed forms:
∂ℓ_i/∂x_ik = c_i (p_ik - [k = y_i]) for plain integer labels, the dense form with label smoothing), and
the gradient is multiplied into ∂hidden and ∂weight at once, then dropped.

Two custom VJPs share that chunk step:

- ``"sum"`` and ``"mean"``: the forward pass of ``jax.grad`` forms the gradients of Σ_i ℓ_i while the chunk's
  logits are at hand (3 matmuls in all, as the unfused loss: logits, ∂hidden, ∂weight) and keeps them
  (∂hidden, ∂weight, ∂bias, ∂class_weight: the inputs' sizes in float32); the backward pass multiplies them by
  the cotangent. A plain call (no gradient) runs the logits' matmul only.
- ``"none"``: the cotangent differs per position, so the backward pass recomputes each chunk's logits and
  forms its gradient there (4 matmuls; nothing kept beyond the inputs).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp

import focal_spec
from focal_jax import _common
from focal_jax._softmax import softmax_focal_loss

_Static = tuple  # the static facts of one call: (gamma, ignore_index, chunk, the inputs' dtype name)


def _chunks(a: jax.Array, chunk: int) -> jax.Array:
    return a.reshape((a.shape[0] // chunk, chunk) + a.shape[1:])


def _logits(h: jax.Array, w: jax.Array, b: jax.Array | None, cdt: Any) -> jax.Array:
    """h @ w.T (+ b) in the inputs' dtype, accumulated in (and returned as) the compute dtype."""
    x = jax.lax.dot_general(h, w, (((1,), (1,)), ((), ())), preferred_element_type=cdt)
    return x if b is None else x + b


def _chunk_loss(static: _Static, y: jax.Array, valid: jax.Array, x: jax.Array, cw: jax.Array | None,
                eps: jax.Array) -> jax.Array:
    gamma, ignore_index = static[0], static[1]
    return softmax_focal_loss(x, y, gamma=gamma, weight=cw, ignore_index=ignore_index, label_smoothing=eps,
                              where=valid, reduction="none")


def _chunk_grads(static: _Static, h: jax.Array, w: jax.Array, b: jax.Array | None, cw: jax.Array | None,
                 eps: jax.Array, y: jax.Array, valid: jax.Array, g: jax.Array | None) -> tuple[Any, ...]:
    """One chunk's loss and the gradients of Σ_i g_i ℓ_i (g = 1 where None): (loss, dh, dw, db, dcw, deps),
    all in the compute dtype. dh is (g ⊙ unit gradient) @ w with the unit gradient rounded to the inputs'
    dtype (it is O(1), so half precision neither underflows nor overflows); dw sums over the chunk in the
    compute dtype."""
    cdt = eps.dtype
    x = _logits(h, w, b, cdt)
    loss, vjp = jax.vjp(functools.partial(_chunk_loss, static, y, valid), x, cw, eps)
    ones = jnp.ones_like(loss)
    dx, dcw, deps = vjp(ones if g is None else g)
    dn = (((0,), (0,)), ((), ()))
    dw = jax.lax.dot_general(dx, h.astype(cdt), dn, preferred_element_type=cdt)
    db = None if b is None else jnp.sum(dx, axis=0)
    if h.dtype == cdt:
        dh = jax.lax.dot_general(dx, w, (((1,), (0,)), ((), ())), preferred_element_type=cdt)
    else:
        unit = dx if g is None else vjp(ones)[0]
        dh = jax.lax.dot_general(unit.astype(h.dtype), w, (((1,), (0,)), ((), ())), preferred_element_type=cdt)
        if g is not None:
            dh = dh * g[:, None]
    return loss, dh, dw, db, dcw, deps


def _scan_grads(static: _Static, h, w, b, cw, eps, y, valid, g):
    """Runs :func:`_chunk_grads` over every chunk: (per-position loss, dh, dw, db, dcw, deps)."""
    chunk, cdt = static[2], eps.dtype
    zeros = (jnp.zeros(w.shape, cdt), None if b is None else jnp.zeros_like(b),
             None if cw is None else jnp.zeros_like(cw), jnp.zeros_like(eps))

    def step(acc, xs):
        hc, yc, vc, gc = xs
        loss, dh, dw, db, dcw, deps = _chunk_grads(static, hc, w, b, cw, eps, yc, vc, gc)
        acc = jax.tree.map(jnp.add, acc, (dw, db, dcw, deps))
        return acc, (loss, dh)

    xs = (_chunks(h, chunk), _chunks(y, chunk), _chunks(valid, chunk), None if g is None else _chunks(g, chunk))
    (dw, db, dcw, deps), (loss, dh) = jax.lax.scan(step, zeros, xs)
    return loss.reshape(-1), dh.reshape(h.shape), dw, db, dcw, deps


def _scan_loss(static: _Static, h, w, b, cw, eps, y, valid) -> jax.Array:
    """The per-position loss, one chunk's logits at a time (one matmul per chunk, no gradient)."""
    chunk, cdt = static[2], eps.dtype

    def one(xs):
        hc, yc, vc = xs
        return _chunk_loss(static, yc, vc, _logits(hc, w, b, cdt), cw, eps)

    return jax.lax.map(one, (_chunks(h, chunk), _chunks(y, chunk), _chunks(valid, chunk))).reshape(-1)


# Σ_i ℓ_i, its gradients formed in the forward pass and scaled in the backward pass.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_sum(static, h, w, b, cw, eps, y, valid):
    return jnp.sum(_scan_loss(static, h, w, b, cw, eps, y, valid))


def _fused_sum_fwd(static, h, w, b, cw, eps, y, valid):
    loss, dh, dw, db, dcw, deps = _scan_grads(static, h, w, b, cw, eps, y, valid, None)
    return jnp.sum(loss), (dh, dw, db, dcw, deps)


def _fused_sum_bwd(static, res, ct):
    dh, dw, db, dcw, deps = jax.tree.map(lambda d: d * ct, res)
    return dh.astype(static[3]), dw.astype(static[3]), db, dcw, deps, None, None


_fused_sum.defvjp(_fused_sum_fwd, _fused_sum_bwd)


# The per-position loss; the backward pass recomputes each chunk's logits.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_none(static, h, w, b, cw, eps, y, valid):
    return _scan_loss(static, h, w, b, cw, eps, y, valid)


def _fused_none_fwd(static, h, w, b, cw, eps, y, valid):
    return _scan_loss(static, h, w, b, cw, eps, y, valid), (h, w, b, cw, eps, y, valid)


def _fused_none_bwd(static, res, ct):
    h, w, b, cw, eps, y, valid = res
    _, dh, dw, db, dcw, deps = _scan_grads(static, h, w, b, cw, eps, y, valid, ct)
    return dh.astype(h.dtype), dw.astype(w.dtype), db, dcw, deps, None, None


_fused_none.defvjp(_fused_none_fwd, _fused_none_bwd)


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
        (``focal_spec.pick_chunk_size``). It changes the memory held, not the result.
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
      1.0185
      >>> print(f"{focal_jax.softmax_focal_loss(hidden @ weight.T, labels):.4f}")
      1.0185
    """
    hidden, weight, labels = _common.as_array(hidden), _common.as_array(weight), _common.as_array(labels)
    opts = focal_spec.linear_options(
        hidden.shape, hidden.dtype, weight.shape, weight.dtype, _common.shape_of(bias), labels.shape,
        labels.dtype, gamma=gamma, class_weight_shape=_common.shape_of(class_weight), ignore_index=ignore_index,
        label_smoothing=_common.host_value(label_smoothing), reduction=reduction, chunk_size=chunk_size,
        where_shape=_common.shape_of(where), where_dtype=_common.dtype_of(where), bias_dtype=_common.dtype_of(bias),
    )
    cdt = _common.compute_dtype(hidden.dtype)
    n, d, chunk = opts.n_positions, opts.hidden_dim, opts.chunk_size
    h = hidden.reshape(n, d)
    y = labels.reshape(n)
    valid = jnp.ones((n,), bool) if where is None else jnp.broadcast_to(jnp.asarray(where, bool),
                                                                         opts.positions).reshape(n)
    b = None if bias is None else jnp.asarray(bias, cdt)
    cw = None if class_weight is None else jnp.asarray(class_weight, cdt)
    eps = jnp.asarray(label_smoothing, cdt)
    pad = -n % chunk
    if pad:
        h = jnp.concatenate([h, jnp.zeros((pad, d), h.dtype)])
        y = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)])
        valid = jnp.concatenate([valid, jnp.zeros((pad,), bool)])
    static = (opts.gamma, opts.ignore_index, chunk, opts.hidden_dtype)
    if opts.reduction == "none":
        loss = _fused_none(static, h, weight, b, cw, eps, y, valid)
        return loss[:n].reshape(opts.positions).astype(hidden.dtype)
    total = _fused_sum(static, h, weight, b, cw, eps, y, valid)
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    if opts.reduction == "sum":
        return total.astype(hidden.dtype)
    count = _denominator(labels.reshape(n), valid[:n], cw, opts)
    if axis_name is not None:
        count = jax.lax.psum(count, axis_name)
    nothing = count == 0
    mean = jnp.where(nothing, jnp.zeros_like(total), total / jnp.where(nothing, jnp.ones_like(count), count))
    return mean.astype(hidden.dtype)


def _denominator(y: jax.Array, valid: jax.Array, cw: jax.Array | None, opts: focal_spec.LinearOptions) -> jax.Array:
    """Σ w[y_i] over counted positions (their number without ``class_weight``); NaN with a counted label
    outside [0, V), as ``softmax_focal_loss``'s."""
    counted, in_range = _common.label_masks(y, opts.ignore_index, opts.num_classes)
    valid = valid & counted
    cdt = jnp.dtype(opts.compute_dtype)
    if cw is None:
        wy = valid.astype(cdt)
    else:
        wy = jnp.where(valid & in_range, cw[jnp.clip(y.astype(jnp.int32), 0, max(opts.num_classes - 1, 0))]
                       if opts.num_classes else jnp.zeros(y.shape, cdt), jnp.zeros((), cdt))
    wy = jnp.where(valid & ~in_range, jnp.full((), jnp.nan, cdt), wy)
    return jnp.sum(wy)

