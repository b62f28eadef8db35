"""``nn.Module`` wrappers: they store the options and call the functional losses."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import focal_spec
from focal_torch import _common as C
from focal_torch._sigmoid import sigmoid_focal_loss
from focal_torch._softmax import softmax_focal_loss

TENSOR_OPTIONS = ("weight", "pos_weight", "where", "class_weight")
"""Options that are a tensor or None: None is registered as an empty buffer, so that a tensor assigned later
(``loss.weight = w``) is a buffer too (in ``state_dict``, moved by ``module.to(...)``), as in ``torch.nn``'s
losses. Options that may also be numbers (``gamma``, ``alpha``) stay plain attributes when not tensors."""


def _store(module: nn.Module, name: str, value: Any) -> None:
    """Tensors become buffers (they follow ``module.to(...)``), and so does None for a tensor-only option;
    anything else a plain attribute."""
    if isinstance(value, torch.Tensor) or (value is None and name in TENSOR_OPTIONS):
        module.register_buffer(name, value)
    else:
        setattr(module, name, value)


def _check_options(gamma: Any, reduction: Any, label_smoothing: Any, alpha: Any = None) -> None:
    """What the constructor can check without the logits: values of numbers and of readable tensors (a
    :class:`focal_spec.GammaSchedule` was checked when it was made)."""
    if not isinstance(gamma, focal_spec.GammaSchedule):
        focal_spec.check_gamma(C.spec_value(gamma))
    focal_spec.check_reduction(reduction)
    focal_spec.check_label_smoothing(C.spec_value(label_smoothing))
    a = C.spec_value(alpha)
    if a is not None and not isinstance(a, focal_spec.Unknown):
        focal_spec.check_alpha(a, tuple(getattr(a, "shape", ())))


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    return repr(value)


def _show_variants(module: nn.Module, defaults: dict[str, Any]) -> str:
    """``, name=value`` for each focal-family option that is not at its default (none: an empty string)."""
    return "".join(f", {name}={getattr(module, name)!r}" for name, default in defaults.items()
                   if getattr(module, name) is not default and getattr(module, name) != default)


_SIGMOID_VARIANTS = {"poly1": 0.0, "normalized": False, "reduced_threshold": None}
_SOFTMAX_VARIANTS = {"poly1": 0.0}


class SigmoidFocalLoss(nn.Module):
    r"""Module form of :func:`focal_torch.sigmoid_focal_loss`.

    .. math::
        \ell = \alpha_t \, w \, [(1-p_t)^\gamma \, \mathrm{ce} + \varepsilon_1 (1-p_t)^{\gamma+1}]

    It stores the options (``alpha``, ``weight`` and ``where`` tensors as buffers) and calls the
    functional with them; see that function for the semantics.

    Args:
      gamma: focusing parameter, >= 0: a number, or a tensor broadcasting to the logits (stored as a
        buffer). A 0-d tensor is the way to schedule γ under ``torch.compile`` without recompiling:
        update it in place (``loss.gamma.fill_(g)``). Or a :class:`focal_spec.GammaSchedule` (γ per
        element from the detached p_t, such as ``focal_spec.FLSD_53``).
      alpha: ``None``, a number in [0, 1], or a tensor broadcasting to the logits.
      weight: optional tensor broadcasting to the logits.
      pos_weight: optional tensor broadcasting to the logits, the weight of the positive term of the
        cross-entropy (``F.binary_cross_entropy_with_logits``' meaning).
      label_smoothing: in [0, 1].
      where: optional boolean tensor broadcasting to the logits.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      process_group: optional ``torch.distributed`` process group for an exact global mean.
      poly1: ε₁ of Poly-1, any finite number (keyword only); 0 is off.
      normalized: divide each element's loss by Σ (1-p_t)^γ over the counted elements (keyword only).
      reduced_threshold: ``None`` or th in (0, 1]: the reduced focal loss (keyword only).

    Call ``loss(input, target)`` with logits and targets as for the functional. Options at their
    defaults are left out of the repr.

    A call returns:
      What :func:`focal_torch.sigmoid_focal_loss` returns.

    Raises:
      ValueError: ``gamma`` < 0, ``alpha`` or ``label_smoothing`` outside [0, 1], an unknown
        ``reduction``, a non-finite ``poly1`` or a ``reduced_threshold`` outside (0, 1] (at
        construction); the functional's errors at call.
      TypeError: a ``normalized`` that is not a bool (at construction).

    Examples:
      >>> import torch
      >>> from focal_torch import SigmoidFocalLoss
      >>> loss = SigmoidFocalLoss(gamma=2.0, alpha=0.25)
      >>> loss
      SigmoidFocalLoss(gamma=2.0, alpha=0.25, weight=None, pos_weight=None, label_smoothing=0.0, where=None,
                       reduction='mean')
      >>> print(f"{loss(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])).item():.6f}")
      0.008722

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002.
    """

    # Stored by _store as buffers or plain attributes; declared here so that type checkers do not read them
    # through nn.Module.__getattr__ (Tensor | Module).
    gamma: float | torch.Tensor
    alpha: float | torch.Tensor | None
    weight: torch.Tensor | None
    pos_weight: torch.Tensor | None
    where: torch.Tensor | None

    def __init__(self, gamma: float | torch.Tensor = focal_spec.GAMMA,
                 alpha: float | torch.Tensor | None = focal_spec.ALPHA, weight: torch.Tensor | None = None,
                 label_smoothing: float = focal_spec.LABEL_SMOOTHING, where: torch.Tensor | None = None,
                 reduction: str = focal_spec.REDUCTION, process_group: Any = None, *,
                 pos_weight: torch.Tensor | None = None, poly1: float = 0.0, normalized: bool = False,
                 reduced_threshold: float | None = None) -> None:
        super().__init__()
        _check_options(gamma, reduction, label_smoothing, alpha)
        focal_spec.variants.check_poly1(poly1)
        focal_spec.variants.check_normalized(normalized)
        focal_spec.variants.check_reduced_threshold(reduced_threshold)
        self.poly1 = poly1
        self.normalized = normalized
        self.reduced_threshold = reduced_threshold
        _store(self, "gamma", gamma)
        _store(self, "alpha", alpha)
        _store(self, "weight", weight)
        _store(self, "pos_weight", pos_weight)
        self.label_smoothing = label_smoothing
        _store(self, "where", where)
        self.reduction = reduction
        self.process_group = process_group

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sigmoid_focal_loss(input, target, gamma=self.gamma, alpha=self.alpha, weight=self.weight,
                                  pos_weight=self.pos_weight, label_smoothing=self.label_smoothing, where=self.where,
                                  reduction=self.reduction, process_group=self.process_group, poly1=self.poly1,
                                  normalized=self.normalized, reduced_threshold=self.reduced_threshold)

    def extra_repr(self) -> str:
        s = (f"gamma={_show(self.gamma)}, alpha={_show(self.alpha)}, weight={_show(self.weight)}, "
             f"pos_weight={_show(self.pos_weight)}, label_smoothing={self.label_smoothing}, "
             f"where={_show(self.where)}, reduction={self.reduction!r}")
        s += _show_variants(self, _SIGMOID_VARIANTS)
        return s + (f", process_group={self.process_group!r}" if self.process_group is not None else "")


class SoftmaxFocalLoss(nn.Module):
    r"""Module form of :func:`focal_torch.softmax_focal_loss`.

    .. math::
        \ell_i = \sum_c w_c \, q_c \, [-(1-p_c)^\gamma \log p_c + \varepsilon_1 (1-p_c)^{\gamma+1}]

    It stores the options (``weight`` and ``where`` tensors as buffers) and calls the functional
    with them; see that function for the semantics.

    Args:
      gamma: focusing parameter, >= 0: a number, or a tensor of shape () or (C,) (stored as a buffer). A
        0-d tensor is the way to schedule γ under ``torch.compile`` without recompiling: update it in
        place (``loss.gamma.fill_(g)``).
      weight: optional per-class weights of shape (C,).
      ignore_index: class index whose positions contribute 0.
      label_smoothing: in [0, 1].
      where: optional boolean tensor broadcasting to the positions.
      dim: the class dim of the logits.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      process_group: optional ``torch.distributed`` process group for an exact global mean.
      poly1: ε₁ of Poly-1, any finite number (keyword only); 0 is off (and left out of the repr).

    Call ``loss(input, target)`` with logits and labels as for the functional.

    A call returns:
      What :func:`focal_torch.softmax_focal_loss` returns.

    Raises:
      ValueError: ``gamma`` < 0, ``label_smoothing`` outside [0, 1], an unknown ``reduction`` or a
        non-finite ``poly1`` (at construction); the functional's errors at call.

    Examples:
      >>> import torch
      >>> from focal_torch import SoftmaxFocalLoss
      >>> loss = SoftmaxFocalLoss(weight=torch.tensor([1.0, 2.0, 0.5]))
      >>> loss
      SoftmaxFocalLoss(gamma=2.0, weight=tensor(shape=(3,), dtype=torch.float32), ignore_index=-100,
                       label_smoothing=0.0, where=None, dim=1, reduction='mean')
      >>> print(f"{loss(torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([1])).item():.6f}")
      1.184346

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002.
    """

    # Stored by _store as buffers or plain attributes (see SigmoidFocalLoss).
    gamma: float | torch.Tensor
    weight: torch.Tensor | None
    where: torch.Tensor | None

    def __init__(self, gamma: float | torch.Tensor = focal_spec.GAMMA, weight: torch.Tensor | None = None,
                 ignore_index: int = focal_spec.IGNORE_INDEX, label_smoothing: float = focal_spec.LABEL_SMOOTHING,
                 where: torch.Tensor | None = None, dim: int = focal_spec.TORCH_CLASS_DIM,
                 reduction: str = focal_spec.REDUCTION, process_group: Any = None, *, poly1: float = 0.0) -> None:
        super().__init__()
        _check_options(gamma, reduction, label_smoothing)
        focal_spec.variants.check_poly1(poly1)
        self.poly1 = poly1
        _store(self, "gamma", gamma)
        _store(self, "weight", weight)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        _store(self, "where", where)
        self.dim = dim
        self.reduction = reduction
        self.process_group = process_group

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return softmax_focal_loss(input, target, gamma=self.gamma, weight=self.weight, ignore_index=self.ignore_index,
                                  label_smoothing=self.label_smoothing, where=self.where, dim=self.dim,
                                  reduction=self.reduction, process_group=self.process_group, poly1=self.poly1)

    def extra_repr(self) -> str:
        s = (f"gamma={_show(self.gamma)}, weight={_show(self.weight)}, ignore_index={self.ignore_index}, "
             f"label_smoothing={self.label_smoothing}, where={_show(self.where)}, dim={self.dim}, "
             f"reduction={self.reduction!r}")
        s += _show_variants(self, _SOFTMAX_VARIANTS)
        return s + (f", process_group={self.process_group!r}" if self.process_group is not None else "")
