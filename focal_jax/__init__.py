"""The focal loss (Lin et al. 2017) for JAX: pure functions for ``jax.jit``, ``jax.vmap``, ``jax.grad``
and ``jax.hessian``, with closed-form gradients (``jax.custom_jvp``).

Options are validated by :mod:`focal_spec` at trace time, so a bad argument raises the same exception,
with the same message, as :mod:`focal_torch`. The class axis is last by default (channels-last, as
optax); the original blog modules keep their class axis 1.
"""

from focal_jax._distributed import positive_normalizer
from focal_jax._original import ClassificationFocalLoss, SegmentationFocalLoss
from focal_jax._sigmoid import sigmoid_focal_loss
from focal_jax._softmax import softmax_focal_loss

__all__ = [
    "ClassificationFocalLoss",
    "SegmentationFocalLoss",
    "positive_normalizer",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
]
