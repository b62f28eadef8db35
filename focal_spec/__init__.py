"""The focal loss, defined once: defaults, validation, messages and a float64 reference.

This package imports no deep-learning framework. ``focal_jax`` and ``focal_torch`` call
it to validate their options, so both raise the same exceptions with the same text, and
the parity suite checks both against its NumPy reference.

Notation: x is a logit, t a target, σ the sigmoid, ε = ``label_smoothing``, γ = ``gamma``.

Sigmoid focal loss (binary and multi-label), elementwise:

- t' = t(1-ε) + ε/2
- ce = -t' log σ(x) - (1-t') log σ(-x), from log-sigmoid
- 1-p_t = t'σ(-x) + (1-t')σ(x) (the linear p_t of torchvision and optax)
- m = (1-p_t)^γ, and m = 1 when γ = 0
- α_t = α t' + (1-α)(1-t') when ``alpha`` is given, else 1
- loss = α_t · weight · m · ce; ``where=False`` elements give 0
- mean = sum / number of counted elements

Softmax focal loss (multi-class), per position i, over the class axis:

- log p = log_softmax(x); log(1-p_c) = log Σ_{k≠c} exp(x_k) - logsumexp(x)
- integer labels y: q = (1-ε) onehot(y) + ε/C; probabilities q: q(1-ε) + ε/C
- loss_i = -Σ_c w_c q_c (1-p_c)^γ log p_c (with ε = 0 and integer labels this is
  -w_y (1-p_y)^γ log p_y)
- positions with y == ignore_index, or ``where=False``, give 0
- mean = Σ loss / Σ w[y_i] over counted positions for integer labels (F.cross_entropy's
  weighted mean), and Σ loss / number of counted positions for probabilities

Fused linear + softmax focal loss (``focal_spec.linear``): the softmax loss above on the logits
hidden @ weight.T + bias, computed a chunk of positions at a time; its options are checked by
``linear_options``.

Both: a mean over zero counted elements is 0, not NaN. Half-precision inputs are computed
in float32 and returned in their own dtype.
"""

__version__ = "0.2.0"  # the one place the version is written besides pyproject.toml (a test checks they agree)

from focal_spec import _linear as linear
from focal_spec import _options as options
from focal_spec import _reference as reference
from focal_spec import _variants as variants
from focal_spec._linear import (
    LinearOptions,
    check_chunk_size,
    check_linear_gamma,
    class_block,
    linear_options,
    pick_blocks,
    pick_chunk_size,
)
from focal_spec._options import (
    ALPHA,
    FLOAT_DTYPES,
    GAMMA,
    HALF_DTYPES,
    IGNORE_INDEX,
    JAX_CLASS_AXIS,
    LABEL_SMOOTHING,
    ORIGINAL_CLASS_AXIS,
    REDUCTION,
    REDUCTIONS,
    TORCH_CLASS_DIM,
)
from focal_spec._validate import (
    GAMMA_EXPECTED,
    OriginalOptions,
    SigmoidOptions,
    SoftmaxOptions,
    Unknown,
    check_alpha,
    check_gamma,
    check_label_smoothing,
    check_original_call,
    check_reduction,
    check_weight,
    check_where_dtype,
    compute_dtype,
    dtype_kind,
    dtype_name,
    integer_gamma,
    integers_narrowed,
    invalid_device,
    invalid_dtype,
    invalid_shape,
    invalid_type,
    invalid_value,
    label_out_of_range,
    original_logits_false_weights,
    original_options,
    sigmoid_options,
    softmax_options,
    targets_out_of_range,
)
from focal_spec._variants import FLSD_53, FamilyOptions, GammaSchedule, class_balanced_weights, family_options

__all__ = [
    "LinearOptions", "check_chunk_size", "check_linear_gamma", "class_block", "linear", "linear_options",
    "pick_blocks", "pick_chunk_size",
    "GAMMA_EXPECTED",
    "FLSD_53", "FamilyOptions", "GammaSchedule", "class_balanced_weights", "family_options", "variants",
    "ALPHA", "FLOAT_DTYPES", "GAMMA", "HALF_DTYPES", "IGNORE_INDEX", "JAX_CLASS_AXIS", "LABEL_SMOOTHING",
    "ORIGINAL_CLASS_AXIS", "REDUCTION", "REDUCTIONS", "TORCH_CLASS_DIM", "OriginalOptions", "SigmoidOptions",
    "SoftmaxOptions", "Unknown", "check_alpha", "check_gamma", "check_label_smoothing", "check_original_call",
    "check_reduction", "check_weight",
    "check_where_dtype", "compute_dtype", "dtype_kind", "dtype_name", "integer_gamma", "integers_narrowed",
    "invalid_device", "invalid_dtype", "invalid_shape", "invalid_type", "invalid_value", "label_out_of_range",
    "options", "original_logits_false_weights", "original_options", "reference", "sigmoid_options", "softmax_options",
    "targets_out_of_range",
]
