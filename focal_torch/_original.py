"""The original blog modules ``SegmentationFocalLoss`` and ``ClassificationFocalLoss``, repaired."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import focal_spec
from focal_torch import _common as C
from focal_torch._softmax import softmax_focal_loss


def _binary_cross_entropy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """softplus(x) - t x without cancellation: log1p(e^-|x|) plus the one non-negative linear term of x's side,
    with exp(-|x|) spelled per side so that autograd's derivative is exact at x = 0 too."""
    pos = x >= 0
    e = torch.exp(torch.where(pos, -x, x))
    return torch.log1p(e) + torch.where(pos, (1.0 - t) * x, -t * x)


def _one_minus_exp_neg(c: torch.Tensor) -> torch.Tensor:
    """1 - e^-c for c >= 0 without cancellation, in eager mode and under ``torch.compile`` alike (inductor's
    CPU code for ``expm1`` is exp(x) - 1, which loses every digit near 0): a Taylor polynomial below a
    threshold (float32: 1/4, truncation < 2e-9 relative; float64: 1/100, < 1e-20), 1 - e^-c above it (where
    the subtraction loses under 2 bits in float32 and under 7 in float64)."""
    small = c < (0.01 if c.dtype == torch.float64 else 0.25)
    z = torch.where(small, c, 0.0)
    series = z * (1 - z / 2 * (1 - z / 3 * (1 - z / 4 * (1 - z / 5 * (1 - z / 6 * (1 - z / 7))))))
    return torch.where(small, series, 1.0 - torch.exp(-torch.where(small, 1.0, c)))


def _check_indices(y: torch.Tensor, n_classes: int, teacher: torch.Tensor) -> bool:
    """Class indices ``y`` (of ``teacher``) outside [0, C) raise in eager mode (the original modules have no
    ignore_index). Returns whether the check ran: not under ``torch.compile`` nor on a ``teacher`` that a
    ``torch.func`` transform wraps."""
    if not C.can_check_values(teacher):
        return False
    bad = (y < 0) | (y >= n_classes)
    if bool(bad.any()):
        raise ValueError(focal_spec.label_out_of_range(int(y[bad][0]), n_classes, None))
    return True


def _original_loss(pred: torch.Tensor, teacher: torch.Tensor, *, gamma: float, gamma_int: int | None,
                   weights: torch.Tensor | None, logits: bool, classification: bool,
                   n_classes: int | None = None) -> torch.Tensor:
    C.check_tensor("pred", pred)
    if not isinstance(teacher, torch.Tensor):
        teacher = torch.as_tensor(teacher, device=pred.device)
    shapes = (tuple(pred.shape), pred.dtype, tuple(teacher.shape))
    ax, kind = focal_spec.check_original_call(*shapes, None, focal_spec.ORIGINAL_CLASS_AXIS, classification,
                                              n_classes)
    n_classes = pred.shape[ax]
    if weights is not None and weights.shape[0] != n_classes:  # the spec's error, with the values
        focal_spec.check_original_call(*shapes, tuple(weights.tolist()), ax, classification, n_classes)
    cdtype = C.compute_dtype(pred.dtype)
    w = None if weights is None else weights.to(device=pred.device, dtype=cdtype)
    if not logits:
        # Softmax focal loss on the class indices, weighted per position by its class, plain mean.
        y = teacher.long() if kind == "index" else teacher.argmax(ax)
        if kind == "index":
            _check_indices(y, n_classes, teacher)
        # ignore_index -1 can never hold a class: under compile an out-of-range index gives NaN, never 0
        # summed in the compute dtype (a float16 sum overflows past 65504) and rounded once, after the division
        total = softmax_focal_loss(pred.to(cdtype), y, gamma=gamma, weight=w, dim=ax, reduction="sum",
                                   ignore_index=-(2**62))
        return (total / max(y.numel(), 1)).to(pred.dtype)
    with C.no_autocast(pred.device):
        x = pred.to(cdtype)
        unchecked = None  # positions whose index is outside [0, C) where the check could not run: NaN
        if kind == "index":
            y = teacher.long()
            if not _check_indices(y, n_classes, teacher):
                unchecked = ((y < 0) | (y >= n_classes)).unsqueeze(ax)
            # One-hot built where the teacher lives.
            t = F.one_hot(y.clamp(0, n_classes - 1), n_classes).to(cdtype).movedim(-1, ax)
        else:
            t = teacher.to(device=pred.device, dtype=cdtype)
        ce = _binary_cross_entropy(x, t)
        if gamma == 0.0:
            loss = ce
        else:
            q = _one_minus_exp_neg(ce)  # geometric 1-p_t = 1 - exp(-BCE), without cancellation
            if gamma_int is not None:
                m = C.ipow(q, gamma_int, inplace=False)
            else:
                m = torch.exp(gamma * torch.log(torch.clamp(q, min=torch.finfo(cdtype).tiny)))
            loss = m * ce
        if w is not None:
            shape = [1] * x.dim()
            shape[ax] = n_classes
            loss = loss * w.view(shape)
        if unchecked is not None:
            loss = torch.where(unchecked, math.nan, loss)
        return loss.mean().to(pred.dtype)


class _OriginalBase(nn.Module):
    class_weight: torch.Tensor | None

    def __init__(self, gamma: float, weights: Sequence[float] | torch.Tensor | None, logits: bool,
                 n_classes: int | None) -> None:
        super().__init__()
        opts = focal_spec.original_options(gamma, weights, logits, n_classes)
        self.gamma = opts.gamma
        self.logits = opts.logits
        # the one copy of the weights: float64 (exact for a float64 pred), in state_dict, moved by module.to(...)
        self.register_buffer("class_weight", None if opts.weights is None else
                             torch.tensor(opts.weights, dtype=torch.float64))
        if not opts.logits and opts.weights is not None:
            warnings.warn(focal_spec.original_logits_false_weights(), RuntimeWarning, stacklevel=3)

    def _loss(self, pred: torch.Tensor, teacher: torch.Tensor, classification: bool,
              n_classes: int | None = None) -> torch.Tensor:
        # gamma and logits as they are now (attributes may be changed after construction), checked as at construction
        opts = focal_spec.original_options(self.gamma, None, self.logits)
        return _original_loss(pred, teacher, gamma=opts.gamma, gamma_int=focal_spec.integer_gamma(opts.gamma),
                              weights=self.class_weight, logits=opts.logits, classification=classification,
                              n_classes=n_classes)

    def extra_repr(self) -> str:
        weights = None if self.class_weight is None else self.class_weight.tolist()
        return f"gamma={self.gamma}, weights={weights}, logits={self.logits}"


class SegmentationFocalLoss(_OriginalBase):
    r"""Focal loss for segmentation, with the constructor and call of the original blog module.

    .. math::
        \mathrm{ce} = \mathrm{BCE}(x, t), \qquad 1-p_t = 1 - e^{-\mathrm{ce}}, \qquad
        \ell = \mathrm{weights}_c \, (1-p_t)^\gamma \, \mathrm{ce}

    ``logits=True`` (the default) applies this sigmoid loss to each element of a one-hot (or soft)
    teacher, with ``weights`` along the class dim and a plain mean over every element. The original
    takes :math:`p_t = e^{-\mathrm{ce}}` (the geometric convention): for 0/1 teachers it equals the
    linear :math:`p_t` of :func:`focal_torch.sigmoid_focal_loss`, for soft teachers it keeps the
    original's numbers. ``logits=False`` applies :func:`focal_torch.softmax_focal_loss` to
    ``teacher.argmax(1)``, each position weighted by ``weights`` of its class, over a plain mean over
    positions.

    The original's defects are fixed: ``weights`` works (the original crashed on any weights with more
    than one class) in both modes, nothing is moved to CUDA (device and dtype follow ``pred``), no
    deprecated ``reduce=`` is used, a ``weights`` length that does not match the classes raises, and
    ``logits=False`` with ``weights`` emits the RuntimeWarning the original only constructed.

    Args:
      gamma: focusing parameter :math:`\gamma \ge 0`.
      weights: optional per-class weights, a sequence of C numbers, stored as the float64 buffer
        ``class_weight`` (the weights the call uses: ``load_state_dict`` and ``module.to(...)`` change them).
      logits: ``True`` for the sigmoid path, ``False`` for the softmax path; both take raw scores.
        ``gamma`` and ``logits`` may be changed on the module; they are checked again at each call.

    Call ``loss(pred, teacher)`` with ``pred`` of shape (B, C, H, W) (any floating dtype; gradients
    flow to it) and ``teacher`` of the same shape (one-hot or soft).

    A call returns:
      A 0-d tensor of ``pred``'s dtype: the mean loss.

    Raises:
      ValueError: ``gamma`` < 0 or not finite, ``weights`` not 1-d (at construction); a teacher shape
        that is not pred's, or a ``weights`` length other than C (at call).
      TypeError: non-boolean ``logits``; integer ``pred``.

    Examples:
      >>> import torch
      >>> from focal_torch import SegmentationFocalLoss
      >>> pred = torch.tensor([[[[2.0]], [[-1.0]], [[0.5]]]])  # (1, 3, 1, 1)
      >>> teacher = torch.tensor([[[[1.0]], [[0.0]], [[0.0]]]])
      >>> print(f"{SegmentationFocalLoss(weights=[1.0, 2.0, 0.5])(pred, teacher).item():.4f}")
      0.0786

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002.
    """

    def __init__(self, gamma: float = 2, weights: Sequence[float] | torch.Tensor | None = None,
                 logits: bool = True) -> None:
        super().__init__(gamma, weights, logits, None)

    def forward(self, pred: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return self._loss(pred, teacher, classification=False)


class ClassificationFocalLoss(_OriginalBase):
    r"""Focal loss for classification, with the constructor and call of the original blog module.

    .. math::
        \ell = \mathrm{weights}_c \, (1 - e^{-\mathrm{ce}})^\gamma \, \mathrm{ce}, \qquad
        \mathrm{ce} = \mathrm{BCE}(x, \mathrm{onehot}(y))

    The same two paths as :class:`SegmentationFocalLoss`: ``logits=True`` is the elementwise sigmoid
    loss against the one-hot teacher (built on the teacher's device) with a mean over B*C elements;
    ``logits=False`` is the softmax focal loss on the class indices, weighted by ``weights`` of each
    position's class, with a mean over B.

    Args:
      n_classes: number of classes C (>= 1); ``weights`` must have that length.
      gamma: focusing parameter :math:`\gamma \ge 0`.
      weights: optional per-class weights, a sequence of C numbers, stored as the float64 buffer
        ``class_weight`` (the weights the call uses: ``load_state_dict`` and ``module.to(...)`` change them).
      logits: ``True`` for the sigmoid path, ``False`` for the softmax path; both take raw scores.
        ``gamma`` and ``logits`` may be changed on the module; they are checked again at each call.

    Call ``loss(pred, teacher)`` with ``pred`` of shape (B, C) and ``teacher`` either integer class
    indices of shape (B,) or a one-hot (B, C), in both modes.

    A call returns:
      A 0-d tensor of ``pred``'s dtype: the mean loss.

    Raises:
      ValueError: ``gamma`` < 0, ``n_classes`` < 1, or a ``weights`` length other than ``n_classes`` (at
        construction); a ``pred`` whose class count is not ``n_classes``, a teacher shape that fits neither
        form, or, in eager mode, a class index outside [0, C), negative ones included (at call). Under
        ``torch.compile``, or on labels a ``torch.func`` transform wraps, the index check is skipped and
        such a loss is NaN.
      TypeError: non-boolean ``logits``; integer ``pred``.

    Examples:
      >>> import torch
      >>> from focal_torch import ClassificationFocalLoss
      >>> pred = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]])
      >>> teacher = torch.tensor([0, 1])
      >>> print(f"{ClassificationFocalLoss(3)(pred, teacher).item():.6f}")
      0.138106
      >>> print(f"{ClassificationFocalLoss(3, logits=False)(pred, teacher).item():.6f}")
      0.158530

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002.
    """

    def __init__(self, n_classes: int, gamma: float = 2, weights: Sequence[float] | torch.Tensor | None = None,
                 logits: bool = True) -> None:
        super().__init__(gamma, weights, logits, n_classes)
        self._n_classes = int(n_classes)

    def forward(self, pred: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return self._loss(pred, teacher, classification=True, n_classes=self._n_classes)

    def extra_repr(self) -> str:
        return f"n_classes={self._n_classes}, " + super().extra_repr()
