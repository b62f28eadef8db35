"""The original blog modules ``SegmentationFocalLoss`` and ``ClassificationFocalLoss``, as immutable callables."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import focal_spec
from focal_jax import _common, _distributed
from focal_jax._sigmoid import binary_cross_entropy
from focal_jax._softmax import softmax_focal_loss

_NEVER = -(2**64)  # an ignore_index no integer dtype can hold: it matches no label


def _check_indices(teacher: jax.Array, c: int) -> jax.Array:
    """Class indices outside [0, C), negative ones included: a ValueError with the spec's message when the
    teacher is concrete (outside ``jit``); under ``jit`` they cannot raise, and the mask it returns makes
    those positions' loss NaN."""
    _, in_range = _common.label_masks(teacher, None, c)
    if not _common.is_traced(teacher):
        ok = np.asarray(in_range)
        if not ok.all():
            raise ValueError(focal_spec.label_out_of_range(int(np.asarray(teacher)[~ok].ravel()[0]), c, None))
    return ~in_range


def _original_loss(module: SegmentationFocalLoss | ClassificationFocalLoss, pred: jax.typing.ArrayLike,
                   teacher: jax.typing.ArrayLike, classification: bool) -> jax.Array:
    pred = _common.as_array(pred)
    teacher = _common.as_array(teacher)
    # classification is True only for a ClassificationFocalLoss, which has n_classes
    ax, kind = focal_spec.check_original_call(pred.shape, pred.dtype, teacher.shape, module.weights, module.axis,
                                              classification, module.n_classes if classification else None)  # type: ignore[union-attr]
    cdt = _common.compute_dtype(pred.dtype)
    c = pred.shape[ax]
    x = pred.astype(cdt)
    w = None if module.weights is None else jnp.asarray(module.weights, cdt)
    if not module.logits:
        # The softmax focal loss on the class indices, each position weighted by its class, plain mean.
        # The original has no ignore_index: _NEVER matches nothing, so a -100 label is out of range too.
        if kind == "index":
            _check_indices(teacher, c)
        y = teacher if kind == "index" else jnp.argmax(teacher, axis=ax)
        total = softmax_focal_loss(x, y, gamma=module.gamma, weight=w, axis=ax, reduction="sum",
                                   ignore_index=_NEVER)
        return (total / max(math.prod(y.shape), 1)).astype(pred.dtype)
    if kind == "index":
        bad = _check_indices(teacher, c)
        t = jax.nn.one_hot(jnp.where(bad, 0, teacher.astype(jnp.int32)), c, axis=ax, dtype=cdt)
        t = jnp.where(jnp.expand_dims(bad, ax), jnp.full((), jnp.nan, cdt), t)
    else:
        t = teacher.astype(cdt)
    t = jax.lax.stop_gradient(t)
    ce = binary_cross_entropy(x, t)
    gamma, gamma_int = module.gamma, focal_spec.integer_gamma(module.gamma)
    q = -jnp.expm1(-ce)  # geometric 1 - p_t = 1 - exp(-ce), without cancellation
    if gamma_int is not None:
        m = _common.power(q, gamma_int)
    else:
        m = jnp.exp(gamma * jnp.log(jnp.maximum(q, _common.tiny(cdt))))
    loss = m * ce
    if w is not None:
        loss = loss * w.reshape((c,) + (1,) * (x.ndim - 1 - ax))
    return _distributed.reduce_loss(loss, "mean", loss.size, None).astype(pred.dtype)


def _validated(module: SegmentationFocalLoss | ClassificationFocalLoss, n_classes: int | None) -> None:
    opts = focal_spec.original_options(module.gamma, module.weights, module.logits, n_classes)
    object.__setattr__(module, "gamma", opts.gamma)
    object.__setattr__(module, "weights", opts.weights)
    object.__setattr__(module, "logits", opts.logits)
    if not opts.logits and opts.weights is not None:
        warnings.warn(focal_spec.original_logits_false_weights(), RuntimeWarning, stacklevel=4)


@dataclasses.dataclass(frozen=True)
class SegmentationFocalLoss:
    r"""Focal loss for segmentation, with the constructor and call of the original blog module.

    .. math::
        \mathrm{ce} = \mathrm{BCE}(x, t), \qquad 1-p_t = 1 - e^{-\mathrm{ce}}, \qquad
        \ell = \mathrm{weights}_c \, (1-p_t)^γ \, \mathrm{ce}

    ``logits=True`` (the default) applies this sigmoid loss to each element of a one-hot (or soft)
    teacher, with ``weights`` along the class axis and a plain mean over every element. The original
    takes :math:`p_t = e^{-\mathrm{ce}}` (the geometric convention): for 0/1 teachers it equals the
    linear :math:`p_t` of :func:`focal_jax.sigmoid_focal_loss`, for soft teachers it keeps the
    original's numbers. ``logits=False`` applies :func:`focal_jax.softmax_focal_loss` to the argmax
    of the teacher over the class axis, each position weighted by ``weights`` of its class, with a
    plain mean over positions (and a RuntimeWarning at construction when ``weights`` are given, the
    warning the original only constructed).

    An instance is an immutable, hashable value (a frozen dataclass, ``weights`` stored as a tuple):
    close over it or pass it as a static argument to ``jax.jit``. The gradient flows to ``pred`` by
    plain autodiff; the teacher is a constant.

    Args:
      gamma: focusing parameter γ >= 0.
      weights: optional per-class weights, a sequence of C numbers.
      logits: ``True`` for the sigmoid path, ``False`` for the softmax path; both take raw scores.
      axis: the class axis of ``pred``, 1 as in the original (B, C, H, W) layout; -1 for
        channels-last.

    Call ``loss(pred, teacher)`` with floating ``pred`` (for example (B, C, H, W)) and ``teacher``
    of the same shape (one-hot or soft).

    A call returns:
      A scalar in ``pred``'s dtype: the mean loss.

    Raises:
      ValueError: ``gamma`` < 0 or not finite, or ``weights`` not 1-d (at construction); a teacher
        shape other than pred's, a ``weights`` length other than C, or an axis out of range (at call).
      TypeError: non-boolean ``logits`` (at construction); non-floating ``pred`` (at call).

    Examples:
      >>> import jax.numpy as jnp
      >>> import focal_jax
      >>> pred = jnp.array([[[[2.0]], [[-1.0]], [[0.5]]]])  # (1, 3, 1, 1)
      >>> teacher = jnp.array([[[[1.0]], [[0.0]], [[0.0]]]])
      >>> print(f"{focal_jax.SegmentationFocalLoss(weights=[1.0, 2.0, 0.5])(pred, teacher):.4f}")
      0.0786

    References:
      Lin et al., `Focal Loss for Dense Object Detection <https://arxiv.org/abs/1708.02002>`_, 2017.
    """

    gamma: float = 2
    weights: Sequence[float] | None = None
    logits: bool = True
    axis: int = focal_spec.ORIGINAL_CLASS_AXIS

    def __post_init__(self) -> None:
        _validated(self, None)

    def __call__(self, pred: jax.typing.ArrayLike, teacher: jax.typing.ArrayLike) -> jax.Array:
        return _original_loss(self, pred, teacher, classification=False)


@dataclasses.dataclass(frozen=True)
class ClassificationFocalLoss:
    r"""Focal loss for classification, with the constructor and call of the original blog module.

    .. math::
        \ell = \mathrm{weights}_c \, (1 - e^{-\mathrm{ce}})^γ \, \mathrm{ce}, \qquad
        \mathrm{ce} = \mathrm{BCE}(x, \mathrm{onehot}(y))

    The same two paths as :class:`SegmentationFocalLoss`: ``logits=True`` is the elementwise sigmoid
    loss against the one-hot teacher, with a mean over B*C elements; ``logits=False`` is the
    softmax focal loss on the class indices, weighted by ``weights`` of each position's class, with
    a mean over B. An immutable, hashable value, like :class:`SegmentationFocalLoss`.

    Args:
      n_classes: number of classes C (>= 1); ``weights`` must have that length.
      gamma: focusing parameter γ >= 0.
      weights: optional per-class weights, a sequence of C numbers.
      logits: ``True`` for the sigmoid path, ``False`` for the softmax path; both take raw scores.
      axis: the class axis of ``pred`` (1 by default).

    Call ``loss(pred, teacher)`` with floating ``pred`` of shape (B, C) and ``teacher`` either
    integer class indices of shape (B,) (any integer dtype) or a one-hot (B, C), in both modes.
    The original has no ignore_index: every class index must lie in [0, C).

    A call returns:
      A scalar in ``pred``'s dtype: the mean loss. Under ``jit`` a class index outside [0, C) cannot
      raise; it makes the loss NaN.

    Raises:
      ValueError: ``gamma`` < 0, ``n_classes`` < 1, or a ``weights`` length other than ``n_classes``
        (at construction); a teacher shape that fits neither form, a ``pred`` whose class count is
        not ``n_classes``, or (outside ``jit``, when the teacher's values can be read) a class index
        outside [0, C), negative ones included (at call).
      TypeError: non-boolean ``logits`` (at construction); non-floating ``pred`` (at call).

    Examples:
      >>> import jax.numpy as jnp
      >>> import focal_jax
      >>> pred = jnp.array([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]])
      >>> teacher = jnp.array([0, 1])
      >>> print(f"{focal_jax.ClassificationFocalLoss(3)(pred, teacher):.6f}")
      0.138106
      >>> print(f"{focal_jax.ClassificationFocalLoss(3, logits=False)(pred, teacher):.6f}")
      0.158530

    References:
      Lin et al., `Focal Loss for Dense Object Detection <https://arxiv.org/abs/1708.02002>`_, 2017.
    """

    n_classes: int
    gamma: float = 2
    weights: Sequence[float] | None = None
    logits: bool = True
    axis: int = focal_spec.ORIGINAL_CLASS_AXIS

    def __post_init__(self) -> None:
        _validated(self, self.n_classes)

    def __call__(self, pred: jax.typing.ArrayLike, teacher: jax.typing.ArrayLike) -> jax.Array:
        return _original_loss(self, pred, teacher, classification=True)
