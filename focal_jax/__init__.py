"""The focal loss (Lin et al. 2017) for JAX: pure functions for ``jax.jit``, ``jax.vmap``, ``jax.grad``,
``jax.jvp``, ``jax.hessian``, ``jax.checkpoint`` and ``lax.scan``, with closed-form derivatives
(``jax.custom_jvp``) for every floating input: logits, targets or probability labels, ``gamma``,
``alpha``, ``weight``, ``pos_weight`` and ``label_smoothing``.

``gamma``, ``alpha`` and ``label_smoothing`` may be numbers, concrete arrays or traced arrays (a ``jit``
argument compiles once for every value). Options are validated by :mod:`focal_spec` at trace time, so a
bad argument raises the same exception, with the same message, as :mod:`focal_torch`; traced values are
checked by shape only. The class axis is last by default (channels-last, as optax); the original blog
modules keep their class axis 1.
"""

from focal_jax._distributed import positive_normalizer
from focal_jax._family import asymmetric_loss, class_balanced_weights, quality_focal_loss, varifocal_loss
from focal_jax._linear import linear_softmax_focal_loss
from focal_jax._original import ClassificationFocalLoss, SegmentationFocalLoss
from focal_jax._sigmoid import sigmoid_focal_loss
from focal_jax._softmax import softmax_focal_loss
from focal_spec import __version__ as __version__  # one version for the three packages

__all__ = [
    "ClassificationFocalLoss",
    "SegmentationFocalLoss",
    "asymmetric_loss",
    "class_balanced_weights",
    "linear_softmax_focal_loss",
    "positive_normalizer",
    "quality_focal_loss",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "varifocal_loss",
]
