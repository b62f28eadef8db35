"""Option defaults and allowed values shared by every backend."""

from __future__ import annotations

GAMMA: float = 2.0
"""Default focusing parameter γ (Lin et al. 2017 use 2)."""

ALPHA = None
"""Default class-balance weight: ``None`` means no alpha weighting."""

LABEL_SMOOTHING: float = 0.0
"""Default label smoothing ε."""

IGNORE_INDEX: int = -100
"""Default ignored class index for the softmax loss (as in ``F.cross_entropy``)."""

REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")
"""Allowed values of ``reduction``."""

REDUCTION: str = "mean"
"""Default reduction."""

JAX_CLASS_AXIS: int = -1
"""Default class axis of the JAX softmax loss (channels-last, as optax)."""

TORCH_CLASS_DIM: int = 1
"""Default class dim of the torch softmax loss ((N, C, ...), as F.cross_entropy)."""

ORIGINAL_CLASS_AXIS: int = 1
"""Class axis of the original blog modules ``SegmentationFocalLoss`` / ``ClassificationFocalLoss``."""

FLOAT_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")
"""Floating dtypes accepted for logits."""

HALF_DTYPES: tuple[str, ...] = ("float16", "bfloat16")
"""Dtypes computed internally in float32 and returned in their own dtype."""
