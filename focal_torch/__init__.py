"""PyTorch focal losses: functional API and ``nn.Module`` wrappers.

The semantics, defaults and error messages are those of :mod:`focal_spec`. The class dim is 1,
as in ``F.cross_entropy`` ((N, C, ...)). Device and dtype follow the input.
"""

from focal_spec import __version__ as __version__  # one version for the three packages
from focal_torch._distributed import positive_normalizer
from focal_torch._family import (
    AsymmetricLoss,
    QualityFocalLoss,
    VarifocalLoss,
    asymmetric_loss,
    class_balanced_weights,
    quality_focal_loss,
    varifocal_loss,
)
from focal_torch._linear import LinearSoftmaxFocalLoss, linear_softmax_focal_loss
from focal_torch._modules import SigmoidFocalLoss, SoftmaxFocalLoss
from focal_torch._original import ClassificationFocalLoss, SegmentationFocalLoss
from focal_torch._sigmoid import sigmoid_focal_loss
from focal_torch._softmax import softmax_focal_loss

__all__ = [
    "AsymmetricLoss",
    "ClassificationFocalLoss",
    "LinearSoftmaxFocalLoss",
    "QualityFocalLoss",
    "SegmentationFocalLoss",
    "SigmoidFocalLoss",
    "SoftmaxFocalLoss",
    "VarifocalLoss",
    "asymmetric_loss",
    "class_balanced_weights",
    "linear_softmax_focal_loss",
    "positive_normalizer",
    "quality_focal_loss",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "varifocal_loss",
]
