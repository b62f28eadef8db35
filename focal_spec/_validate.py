"""Validation of every option, with the one set of error messages both backends raise.

Everything here works on static facts only: Python numbers, shapes as tuples and
dtypes as names (``"float32"``, ``"int64"``, ``"bool"``...). Nothing touches array
values that could live on a device, so a check never syncs a GPU and works under
``jax.jit`` (where it runs at trace time).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from focal_spec import _options

# ----------------------------------------------------------------------------------------
# Messages. Keras' shape: name the argument, what is allowed, what was received.
# ----------------------------------------------------------------------------------------


def invalid_value(arg: str, expected: str, received: Any) -> str:
    return f"Invalid value for argument `{arg}`. Expected {expected}. Received: {arg}={received!r}"


def invalid_dtype(arg: str, expected: str, received: str) -> str:
    return f"Invalid dtype for argument `{arg}`. Expected {expected}. Received: {arg}.dtype={received}"


def invalid_shape(arg: str, expected: str, received: tuple[int, ...], logits_shape: tuple[int, ...]) -> str:
    logits = "" if arg == "logits" else f", logits.shape={tuple(logits_shape)}"
    return f"Invalid shape for argument `{arg}`. Expected {expected}. Received: {arg}.shape={tuple(received)}{logits}"


def invalid_type(arg: str, expected: str, received: Any) -> str:
    return f"Invalid type for argument `{arg}`. Expected {expected}. Received: {arg} of type {type(received).__name__}"


def invalid_device(arg: str, expected: Any, received: Any) -> str:
    return (f"Invalid device for argument `{arg}`. Expected the logits' device ({expected}). "
            f"Received: {arg}.device={received}")


def targets_out_of_range(value: float) -> str:
    """Message for a sigmoid target outside [0, 1] (a void value such as 255 in a uint8 mask)."""
    return invalid_value("targets", "values in [0, 1] (mask void elements with `where=`)", float(value))


def integers_narrowed(arg: str, value: int, wide: str, narrow: str) -> str:
    """Message for a host integer that a backend would narrow from ``wide`` to ``narrow`` with wraparound (JAX
    without x64: int64 to int32), where the wrapped value would be another class or the ignored index."""
    return invalid_value(arg, f"integers that {narrow} holds (JAX narrows {wide} to {narrow} unless "
                         "jax_enable_x64 is set)", int(value))


def label_out_of_range(value: int, num_classes: int, ignore_index: int | None) -> str:
    """Message for a class index outside ``[0, num_classes)`` that is not ``ignore_index`` (None: the loss
    has no ignore_index, as the original ``ClassificationFocalLoss``)."""
    allowed = f"class indices in [0, {num_classes})"
    if ignore_index is not None:
        allowed += f" or ignore_index={ignore_index}"
    return invalid_value("labels", allowed, int(value))


def original_logits_false_weights() -> str:
    """Text of the RuntimeWarning that the original modules meant to raise with logits=False and weights."""
    return (
        "`weights` with logits=False now weight each position by the weight of its target class "
        "(the original module dropped them silently); the mean stays the plain mean over positions."
    )


# ----------------------------------------------------------------------------------------
# Dtypes as names.
# ----------------------------------------------------------------------------------------


def dtype_name(dtype: Any) -> str:
    """Canonical name of a NumPy, JAX or torch dtype: ``torch.float32`` -> ``"float32"``."""
    name = str(dtype)
    for prefix in ("torch.", "dtype(", "<class 'numpy."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.strip("')\"")


def dtype_kind(name: str) -> str:
    """One of ``"float"``, ``"int"``, ``"bool"``, ``"complex"`` or ``"other"``."""
    if name == "bool":
        return "bool"
    if name in _options.FLOAT_DTYPES or name.startswith("float"):
        return "float"
    if name.startswith("int") or name.startswith("uint"):
        return "int"
    if name.startswith("complex"):
        return "complex"
    return "other"


def compute_dtype(logits_dtype: str) -> str:
    """The dtype the math runs in: float64 for float64 logits, else float32.

    Half-precision logits (float16, bfloat16) are computed in float32 and the result is
    cast back to the logits' dtype.
    """
    return "float64" if dtype_name(logits_dtype) == "float64" else "float32"


def check_logits_dtype(dtype: Any) -> str:
    name = dtype_name(dtype)
    if dtype_kind(name) != "float":
        raise TypeError(invalid_dtype("logits", "a floating dtype " + str(_options.FLOAT_DTYPES), name))
    return name


# ----------------------------------------------------------------------------------------
# Scalar options.
# ----------------------------------------------------------------------------------------


class Unknown(NamedTuple):
    """An array argument known by its shape (and its dtype, when the backend gives it) only: traced
    (``jax.jit``, ``torch.compile``, ``vmap``) or on a device where reading it would cost a sync. Validation
    checks its shape and dtype and skips its values."""

    shape: tuple[int, ...]
    dtype: Any = None


def is_bool(value: Any) -> bool:
    """Whether ``value`` is a boolean: a Python bool, ``np.bool_``, or an array of any backend (or an
    :class:`Unknown`) of dtype bool. A boolean is never read as the number 0 or 1."""
    if isinstance(value, (bool, np.bool_)):
        return True
    if isinstance(value, (int, float)):  # also a number that torch.compile traces symbolically: no attributes
        return False
    dtype = getattr(value, "dtype", None)
    return dtype is not None and dtype_name(dtype) == "bool"


def _reject_non_numeric(arg: str, value: Any, expected: str) -> None:
    if value is None or isinstance(value, (str, bytes)) or is_bool(value):
        raise TypeError(invalid_value(arg, expected, value))


def _as_float(arg: str, value: Any, expected: str) -> float:
    _reject_non_numeric(arg, value, expected)
    try:
        return float(value)
    except Exception:  # a many-element array, an object...
        raise TypeError(invalid_value(arg, expected, value)) from None


def _host_array(arg: str, value: Any, expected: str) -> np.ndarray:
    """A NumPy array of a host value (number, NumPy array, nested sequence) in its own numeric dtype, or
    TypeError. Comparisons are exact in it; messages show its values as that dtype prints them."""
    _reject_non_numeric(arg, value, expected)
    try:
        arr = np.asarray(value)
        arr.astype(np.float64)
    except Exception:
        raise TypeError(invalid_value(arg, expected, value)) from None
    if arr.dtype.kind not in "iuf":
        raise TypeError(invalid_value(arg, expected, value))
    return arr


def _first_bad(arr: np.ndarray, ok: np.ndarray) -> float:
    """The first value that fails ``ok``, as its own dtype prints it (float32 1.2 is 1.2, not 1.2000000476...)."""
    v = arr[~ok].ravel()[0]
    return float(str(v)) if isinstance(v, np.floating) else float(v)


GAMMA_EXPECTED = "a finite number >= 0, or an array of them"


def check_gamma(gamma: Any) -> float | np.ndarray | Unknown:
    """γ as a float (one known number), a float64 array (known values), or ``Unknown`` (shape only).

    Known values must be finite and >= 0. A 0-d array becomes a float.
    """
    if isinstance(gamma, Unknown):
        _reject_non_numeric("gamma", gamma, GAMMA_EXPECTED)
        return gamma
    if isinstance(gamma, numbers.Real) and not is_bool(gamma):
        g = float(gamma)
        if not 0.0 <= g < math.inf:  # NaN fails too; comparisons only (a traced number has no isfinite)
            raise ValueError(invalid_value("gamma", GAMMA_EXPECTED, gamma))
        return g
    arr = _host_array("gamma", gamma, GAMMA_EXPECTED)
    ok = np.isfinite(arr) & (arr >= 0)
    if not ok.all():
        raise ValueError(invalid_value("gamma", GAMMA_EXPECTED, _first_bad(arr, ok)))
    return float(arr) if arr.ndim == 0 else arr


def integer_gamma(gamma: float | None, largest: int = 8) -> int | None:
    """``int(gamma)`` when γ is a small whole number (a multiply-only fast path), else None."""
    if gamma is None:
        return None
    if gamma == int(gamma) and 0 <= gamma <= largest:
        return int(gamma)
    return None


def check_unit_interval(arg: str, value: Any) -> float:
    expected = "a number in [0, 1]"
    v = _as_float(arg, value, expected)
    if not 0.0 <= v <= 1.0:
        raise ValueError(invalid_value(arg, expected, value))
    return v


def check_label_smoothing(label_smoothing: Any) -> float | None:
    """ε as a float, or None when it is ``Unknown`` (traced): then it must be 0-d and is not range-checked."""
    if isinstance(label_smoothing, Unknown):
        _reject_non_numeric("label_smoothing", label_smoothing, "a number in [0, 1]")
        if tuple(label_smoothing.shape) != ():
            raise ValueError(invalid_value("label_smoothing", "a number in [0, 1] (0-d)",
                                           f"array of shape {tuple(label_smoothing.shape)}"))
        return None
    if isinstance(label_smoothing, np.ndarray) and label_smoothing.ndim != 0:
        raise ValueError(invalid_value("label_smoothing", "a number in [0, 1] (0-d)",
                                       f"array of shape {label_smoothing.shape}"))
    return check_unit_interval("label_smoothing", label_smoothing)


def check_reduction(reduction: Any) -> str:
    if not isinstance(reduction, str) or reduction not in _options.REDUCTIONS:
        raise ValueError(invalid_value("reduction", f"one of {_options.REDUCTIONS}", reduction))
    return reduction


def check_ignore_index(ignore_index: Any) -> int:
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(invalid_value("ignore_index", "an integer", ignore_index))
    return int(ignore_index)


def normalize_axis(axis: Any, ndim: int, arg: str = "axis") -> int:
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(invalid_value(arg, "an integer", axis))
    # numbers.Integral compares with int at run time; typeshed's ABC declares no comparison
    if not -ndim <= axis < ndim:  # type: ignore[operator]
        raise ValueError(invalid_value(arg, f"an integer in [{-ndim}, {ndim}) for {ndim}-d logits", axis))
    return int(axis) % ndim


def is_scalar(value: Any) -> bool:
    """A Python or NumPy number, or a 0-d NumPy array: something checkable on the host."""
    return isinstance(value, numbers.Real) or (isinstance(value, np.ndarray) and value.ndim == 0)


ALPHA_EXPECTED = "None, a number in [0, 1], or an array of them"


def check_alpha(alpha: Any, logits_shape: tuple[int, ...]) -> float | None | str:
    """Returns None (off), a float in [0, 1], or ``"array"`` for an array that broadcasts to the logits.

    Host values (numbers, NumPy arrays, sequences) are range-checked; backends pass a CPU tensor or a
    concrete JAX array as NumPy data, and a traced or device array as ``Unknown`` (shape only), so
    that the check never syncs a device.
    """
    if alpha is None:
        return None
    if isinstance(alpha, Unknown):
        _reject_non_numeric("alpha", alpha, ALPHA_EXPECTED)
        check_broadcast("alpha", alpha.shape, logits_shape)
        return "array"
    if isinstance(alpha, numbers.Real) and not is_bool(alpha):
        return check_unit_interval("alpha", alpha)
    arr = _host_array("alpha", alpha, ALPHA_EXPECTED)
    ok = (arr >= 0) & (arr <= 1)  # False for NaN
    if not ok.all():
        raise ValueError(invalid_value("alpha", "values in [0, 1]", _first_bad(arr, ok)))
    if arr.ndim == 0:
        return float(arr)
    check_broadcast("alpha", arr.shape, logits_shape)
    return "array"


WEIGHT_EXPECTED = "None, or an array of finite numbers"


def check_weight(arg: str, weight: Any) -> tuple[int, ...] | None:
    """A weight array (``weight``, ``pos_weight``, a softmax class ``weight``): None, an :class:`Unknown`
    (its dtype checked when known), or host values, which must be finite numbers (a NaN or ±inf weight is
    an error, not a NaN loss). Returns its shape (None for None); the caller checks that shape."""
    if weight is None:
        return None
    if isinstance(weight, Unknown):
        _reject_non_numeric(arg, weight, WEIGHT_EXPECTED)
        return tuple(weight.shape)
    arr = _host_array(arg, weight, WEIGHT_EXPECTED)
    ok = np.isfinite(arr)
    if not ok.all():
        raise ValueError(invalid_value(arg, "finite values", _first_bad(arr, ok)))
    return tuple(arr.shape)


def check_where_dtype(dtype: Any) -> None:
    """``where`` is a boolean mask, as optax's and torch's masks are (0.3 is not silently True)."""
    name = dtype_name(dtype)
    if name != "bool":
        raise TypeError(invalid_dtype("where", "bool (a boolean mask)", name))


# ----------------------------------------------------------------------------------------
# Shapes.
# ----------------------------------------------------------------------------------------


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    offset = len(target) - len(shape)
    # indices, not zip(..., strict=False): torch.compile traces this, and Dynamo before torch 2.5 reads any
    # ``strict`` argument of zip as strict=True
    return all(shape[i] == 1 or shape[i] == target[offset + i] for i in range(len(shape)))


def check_broadcast(arg: str, shape: tuple[int, ...], logits_shape: tuple[int, ...],
                    target_shape: tuple[int, ...] | None = None, what: str = "the logits' shape") -> None:
    """``shape`` must broadcast to ``target_shape`` (default: the logits' shape) without changing it."""
    target = tuple(logits_shape) if target_shape is None else tuple(target_shape)
    if not _broadcasts_to(tuple(shape), target):
        raise ValueError(invalid_shape(arg, f"a shape that broadcasts to {what} {target}", tuple(shape), logits_shape))


def check_class_weight(arg: str, shape: tuple[int, ...], num_classes: int, logits_shape: tuple[int, ...]) -> None:
    if tuple(shape) != (num_classes,):
        raise ValueError(
            invalid_shape(arg, f"one weight per class, shape ({num_classes},)", tuple(shape), logits_shape)
        )


# ----------------------------------------------------------------------------------------
# Whole-call validation. Backends pass shapes and dtype names, and get normalized options back.
# ----------------------------------------------------------------------------------------


def _gamma_fields(g: float | np.ndarray | Unknown) -> tuple[float | None, int | None, tuple[int, ...] | None]:
    """(gamma, gamma_int, gamma_shape): a known number gives (g, whole-number fast path, None); an array,
    known or not, gives (None, None, its shape) and takes the general path."""
    if isinstance(g, float):
        return g, integer_gamma(g), None
    return None, None, tuple(g.shape)


@dataclasses.dataclass(frozen=True)
class SigmoidOptions:
    gamma: float | None  # None when gamma is an array (gamma_shape), known or traced
    gamma_int: int | None
    alpha: float | None | str  # None, a float, or "array"
    label_smoothing: float | None  # None when traced (0-d, not range-checked)
    reduction: str
    compute_dtype: str
    logits_dtype: str
    gamma_shape: tuple[int, ...] | None = None  # None for a number; an array's shape (broadcasts to the logits)


def sigmoid_options(
    logits_shape: tuple[int, ...], logits_dtype: Any, targets_shape: tuple[int, ...], targets_dtype: Any, *,
    gamma: Any, alpha: Any, weight_shape: tuple[int, ...] | None, label_smoothing: Any,
    where_shape: tuple[int, ...] | None, reduction: Any, where_dtype: Any = "bool",
    pos_weight_shape: tuple[int, ...] | None = None, weight: Any = None, pos_weight: Any = None,
) -> SigmoidOptions:
    """Validates a ``sigmoid_focal_loss`` call. Shapes are tuples; dtypes are dtype objects or names.

    ``gamma``, ``alpha`` and ``label_smoothing`` are host values (checked in full) or :class:`Unknown`
    (checked by shape and dtype only). ``weight`` and ``pos_weight``, when given, are their host values or
    :class:`Unknown` (:func:`check_weight`): their values are checked before their shapes.
    """
    check_weight("weight", weight)
    check_weight("pos_weight", pos_weight)
    logits_shape = tuple(logits_shape)
    ldt = check_logits_dtype(logits_dtype)
    tdt = dtype_name(targets_dtype)
    if dtype_kind(tdt) not in ("float", "int", "bool"):
        raise TypeError(invalid_dtype("targets", "a floating, integer or boolean dtype", tdt))
    check_broadcast("targets", targets_shape, logits_shape)
    g, g_int, g_shape = _gamma_fields(check_gamma(gamma))
    if g_shape is not None:
        check_broadcast("gamma", g_shape, logits_shape)
    a = check_alpha(alpha, logits_shape)
    if weight_shape is not None:
        check_broadcast("weight", weight_shape, logits_shape)
    if pos_weight_shape is not None:
        check_broadcast("pos_weight", pos_weight_shape, logits_shape)
    if where_shape is not None:
        check_where_dtype(where_dtype)
        check_broadcast("where", where_shape, logits_shape)
    return SigmoidOptions(
        gamma=g, gamma_int=g_int, alpha=a, label_smoothing=check_label_smoothing(label_smoothing),
        reduction=check_reduction(reduction), compute_dtype=compute_dtype(ldt), logits_dtype=ldt,
        gamma_shape=g_shape,
    )


@dataclasses.dataclass(frozen=True)
class SoftmaxOptions:
    gamma: float | None  # None when gamma is an array (gamma_shape () or (C,)), known or traced
    gamma_int: int | None
    label_kind: str  # "index" (integer class labels) or "probs" (class probabilities)
    axis: int  # normalized class axis, in [0, ndim)
    num_classes: int
    ignore_index: int
    label_smoothing: float | None  # None when traced (0-d, not range-checked)
    reduction: str
    compute_dtype: str
    logits_dtype: str
    gamma_shape: tuple[int, ...] | None = None  # None for a number; () or (C,) for an array


def softmax_options(
    logits_shape: tuple[int, ...], logits_dtype: Any, labels_shape: tuple[int, ...], labels_dtype: Any, *,
    gamma: Any, weight_shape: tuple[int, ...] | None, ignore_index: Any, label_smoothing: Any,
    where_shape: tuple[int, ...] | None, axis: Any, reduction: Any, axis_arg: str = "axis",
    where_dtype: Any = "bool", weight: Any = None,
) -> SoftmaxOptions:
    """Validates a ``softmax_focal_loss`` call (``axis_arg`` is ``"dim"`` in torch). ``weight``, when given,
    is the class weights' host value or :class:`Unknown` (:func:`check_weight`), checked before any shape.

    ``gamma`` and ``label_smoothing`` are host values (checked in full) or :class:`Unknown` (shape only).
    An array ``gamma`` is 0-d or has one value per class, shape (C,): γ_c applies to class c's modulator.
    C = 0 is allowed: there is no class to predict, so every integer label is out of range (torch raises,
    JAX gives NaN) unless it is ignored, and a loss over no counted position is 0.
    """
    check_weight("weight", weight)
    logits_shape = tuple(logits_shape)
    labels_shape = tuple(labels_shape)
    ldt = check_logits_dtype(logits_dtype)
    if len(logits_shape) == 0:
        raise ValueError(invalid_shape("logits", "at least one dimension (the class axis)", logits_shape, logits_shape))
    ax = normalize_axis(axis, len(logits_shape), axis_arg)
    positions = logits_shape[:ax] + logits_shape[ax + 1:]
    num_classes = logits_shape[ax]
    ydt = dtype_name(labels_dtype)
    kind = dtype_kind(ydt)
    if kind == "int":
        if labels_shape != positions:
            raise ValueError(invalid_shape(
                "labels", f"class indices of the logits' shape without the class axis, {positions}",
                labels_shape, logits_shape))
        label_kind = "index"
    elif kind == "float":
        if labels_shape == positions:
            raise TypeError(invalid_dtype(
                "labels", f"an integer dtype for class indices of shape {positions} "
                f"(floating labels must be class probabilities of the logits' shape {logits_shape})", ydt))
        if labels_shape != logits_shape:
            raise ValueError(invalid_shape(
                "labels", f"class probabilities of the logits' shape {logits_shape}, "
                f"or integer class indices of shape {positions}", labels_shape, logits_shape))
        label_kind = "probs"
    else:
        raise TypeError(invalid_dtype("labels", "integer class indices or floating class probabilities", ydt))
    g, g_int, g_shape = _gamma_fields(check_gamma(gamma))
    if g_shape is not None and g_shape not in ((), (num_classes,)):
        raise ValueError(invalid_shape("gamma", f"a number, or one gamma per class, shape ({num_classes},)",
                                       g_shape, logits_shape))
    if weight_shape is not None:
        check_class_weight("weight", weight_shape, num_classes, logits_shape)
    if where_shape is not None:
        check_where_dtype(where_dtype)
        check_broadcast("where", where_shape, logits_shape, positions, "the logits' shape without the class axis")
    return SoftmaxOptions(
        gamma=g, gamma_int=g_int, label_kind=label_kind, axis=ax, num_classes=num_classes,
        ignore_index=check_ignore_index(ignore_index), label_smoothing=check_label_smoothing(label_smoothing),
        reduction=check_reduction(reduction), compute_dtype=compute_dtype(ldt), logits_dtype=ldt,
        gamma_shape=g_shape,
    )


# ----------------------------------------------------------------------------------------
# The original blog modules.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OriginalOptions:
    gamma: float
    weights: tuple[float, ...] | None
    logits: bool


def original_options(gamma: Any, weights: Any, logits: Any, n_classes: Any = None) -> OriginalOptions:
    """Validates the constructor of ``SegmentationFocalLoss`` / ``ClassificationFocalLoss``."""
    g = check_gamma(gamma)
    if not isinstance(g, float):
        raise TypeError(invalid_value("gamma", "a finite number >= 0", gamma))
    if not isinstance(logits, (bool, np.bool_)):
        raise TypeError(invalid_value("logits", "True or False", logits))
    if n_classes is not None:
        if is_bool(n_classes) or not isinstance(n_classes, numbers.Integral):
            raise TypeError(invalid_value("n_classes", "an integer >= 1", n_classes))
        if n_classes < 1:
            raise ValueError(invalid_value("n_classes", "an integer >= 1", n_classes))
    w = None
    if weights is not None:
        expected = "a 1-d sequence of one finite weight per class"
        raw = weights.tolist() if hasattr(weights, "tolist") else weights
        if is_bool(weights) or (isinstance(raw, (list, tuple)) and any(is_bool(v) for v in raw)):
            raise TypeError(invalid_value("weights", expected, weights))  # True is not the weight 1
        arr = np.asarray(raw, dtype=np.float64)
        if arr.ndim == 1 and not np.isfinite(arr).all():
            raise ValueError(invalid_value("weights", expected, weights))
        if arr.ndim != 1:
            raise ValueError(invalid_value("weights", "a 1-d sequence of one weight per class", weights))
        if n_classes is not None and arr.shape[0] != n_classes:
            raise ValueError(invalid_value("weights", f"{n_classes} weights, one per class (n_classes={n_classes})",
                                           tuple(arr.tolist())))
        w = tuple(float(v) for v in arr)
    return OriginalOptions(gamma=g, weights=w, logits=bool(logits))


def check_original_call(pred_shape: tuple[int, ...], pred_dtype: Any, teacher_shape: tuple[int, ...],
                        weights: Sequence[float] | None, axis: int, classification: bool,
                        n_classes: int | None = None) -> tuple[int, str]:
    """Validates a call of an original module. Returns (normalized class axis, teacher kind).

    Teacher kind is ``"dense"`` (one-hot or soft, the pred's shape) or ``"index"`` (class indices,
    the pred's shape without the class axis; ClassificationFocalLoss only). ``n_classes`` (the
    ClassificationFocalLoss constructor's) must equal the pred's number of classes.
    """
    pred_shape, teacher_shape = tuple(pred_shape), tuple(teacher_shape)
    check_logits_dtype(pred_dtype)
    if len(pred_shape) < 2:
        raise ValueError(invalid_shape("pred", "at least (batch, classes)", pred_shape, pred_shape))
    ax = normalize_axis(axis, len(pred_shape))
    if n_classes is not None and pred_shape[ax] != n_classes:
        raise ValueError(invalid_shape("pred", f"{n_classes} classes on axis {ax} (n_classes={n_classes})",
                                       pred_shape, pred_shape))
    positions = pred_shape[:ax] + pred_shape[ax + 1:]
    if teacher_shape == pred_shape:
        kind = "dense"
    elif classification and teacher_shape == positions:
        kind = "index"
    else:
        expected = f"the pred's shape {pred_shape}"
        if classification:
            expected += f", or class indices of shape {positions}"
        raise ValueError(invalid_shape("teacher", expected, teacher_shape, pred_shape))
    if weights is not None and len(weights) != pred_shape[ax]:
        raise ValueError(invalid_value(
            "weights", f"{pred_shape[ax]} weights, one per class of pred.shape={pred_shape}", weights))
    return ax, kind
