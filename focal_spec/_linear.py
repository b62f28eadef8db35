"""The fused linear + softmax focal loss: validation, messages and the choice of chunk.

``linear_softmax_focal_loss(hidden, weight, labels, *, bias, gamma, class_weight, ignore_index,
label_smoothing, where, reduction, chunk_size)`` is, by definition,
``softmax_focal_loss(hidden @ weight.T + bias, labels, gamma=gamma, weight=class_weight, ...)`` with the class
axis last, computed without ever holding the (N, V) logits: the positions are taken ``chunk_size`` at a time.

Shapes: ``hidden`` (..., D), ``weight`` (V, D) (``nn.Linear``'s layout, or a tied embedding), ``bias`` (V,),
``labels`` integer class indices of shape ``hidden.shape[:-1]``, ``class_weight`` (V,), ``where`` a boolean
mask broadcasting to ``hidden.shape[:-1]``. Messages name, as ``logits.shape``, the shape of the logits the
call stands for, ``hidden.shape[:-1] + (V,)``.

Functions (static facts only: shapes as tuples, dtypes as names or dtype objects):

- ``linear_options(hidden_shape, hidden_dtype, weight_shape, weight_dtype, bias_shape, labels_shape,
  labels_dtype, *, gamma, class_weight_shape, ignore_index, label_smoothing, reduction, chunk_size,
  where_shape=None, where_dtype="bool", bias_dtype=None) -> LinearOptions``: validates a call and resolves
  the chunk size.
- ``pick_chunk_size(n_positions, hidden_dim, n_classes, itemsize) -> int``: the number of positions per chunk
  when ``chunk_size`` is None, for a backend that chunks the positions only (PyTorch).
- ``class_block(rows, n_classes) -> int``: classes per block for a backend that also blocks the class axis
  (JAX), given ``rows`` positions per chunk.
- ``pick_blocks(n_positions, hidden_dim, n_classes, itemsize) -> (rows, classes)``: both, when ``chunk_size`` is
  None, for such a backend: every position in one chunk (up to ``BLOCK_ROWS``), the classes in blocks.
- ``check_chunk_size(chunk_size) -> int | None``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np

from focal_spec import _options
from focal_spec import _validate as V

CHUNK_EXPECTED = "None or an integer >= 1 (positions per chunk)"
CHUNK_BYTES = 64 * 2**20
"""Bytes of float32 logits one chunk of positions may hold when ``chunk_size`` is None ..."""
CHUNK_FRACTION = 9
"""... and at most this fraction of the whole logits' bytes (the fused loss keeps under 1/8 of them; on 2 CPU cores at
(512, 256, 131072), 48-position chunks (1/10) took 1.23x the unfused loss's time, 56 (1/9) 1.08x) ..."""
MIN_CHUNK_ROWS = 8
"""... but at least this many positions (a matmul needs rows to run at speed)."""
BLOCK_BYTES = 4 * 2**20
"""Bytes of float32 logits of one (positions, classes) block for a backend that blocks both axes."""
BLOCK_ROWS = 8192
"""The most positions ``pick_blocks`` puts in one chunk."""
BLOCK_FRACTION = 16
"""... and at most 1/16 of the classes (at least 16 blocks where the classes allow it)."""
MIN_BLOCK_CLASSES = 128
"""The fewest classes ``class_block`` puts in one block (fewer only when there are fewer classes)."""


@dataclasses.dataclass(frozen=True)
class LinearOptions:
    gamma: float
    gamma_int: int | None  # a whole γ up to 8 (multiplications only), else None
    num_classes: int  # V
    hidden_dim: int  # D
    positions: tuple[int, ...]  # hidden.shape[:-1], the labels' shape
    n_positions: int  # math.prod(positions)
    ignore_index: int
    label_smoothing: float | None  # None when traced (0-d, not range-checked)
    reduction: str
    compute_dtype: str  # float64 for float64 inputs, else float32 (the statistics' dtype)
    hidden_dtype: str  # the dtype of the result and of the matmul operands
    chunk_size: int  # positions per chunk, >= 1 (resolved when given as None)
    has_bias: bool


def check_chunk_size(chunk_size: Any) -> int | None:
    """``None`` (picked from the sizes) or an integer >= 1; a float, a bool or a string is a TypeError."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(V.invalid_value("chunk_size", CHUNK_EXPECTED, chunk_size))
    if chunk_size < 1:
        raise ValueError(V.invalid_value("chunk_size", CHUNK_EXPECTED, chunk_size))
    return int(chunk_size)


def check_linear_gamma(gamma: Any) -> float:
    """γ of the fused linear loss: one finite number >= 0 (a host value, or a 0-d array of one). The kernel takes
    a number, so an array of γ (which the other losses accept) is a TypeError here.

    >>> check_linear_gamma(2)
    2.0
    """
    expected = "a finite number >= 0"
    try:
        g = V.check_gamma(gamma)
    except ValueError:  # the message without the "or an array of them" that other losses accept
        raise ValueError(V.invalid_value("gamma", expected, gamma)) from None
    if not isinstance(g, float):
        raise TypeError(V.invalid_value("gamma", expected, gamma if not isinstance(g, V.Unknown)
                                        else f"array of shape {tuple(g.shape)}"))
    return g


def pick_chunk_size(n_positions: int, hidden_dim: int, n_classes: int, itemsize: int) -> int:
    """Positions per chunk for a backend that chunks the positions only (all V classes per chunk; PyTorch). Each
    chunk streams the whole weight through three matmuls, so a chunk needs a few hundred positions to run them at
    the speed of one large matmul: it is as large as ``CHUNK_BYTES`` and ``1/CHUNK_FRACTION`` of all the logits'
    bytes allow, a multiple of 8, at least ``MIN_CHUNK_ROWS``, and all positions when the logits are at most
    ``CHUNK_BYTES / CHUNK_FRACTION``. ``hidden_dim`` and ``itemsize`` are part of the signature for backends that
    weigh the hidden states too.

    >>> pick_chunk_size(2048, 256, 32768, 4), pick_chunk_size(512, 256, 131072, 4), pick_chunk_size(100, 16, 1000, 4)
    (224, 56, 100)
    """
    n, v = max(int(n_positions), 1), max(int(n_classes), 1)
    if n * v * 4 * CHUNK_FRACTION <= CHUNK_BYTES:
        return n
    rows = min(n * v * 4 // CHUNK_FRACTION, CHUNK_BYTES) // (4 * v)
    rows = max(rows - rows % 8, MIN_CHUNK_ROWS)
    return int(min(rows, n))


def class_block(rows: int, n_classes: int) -> int:
    """Classes per block so that a block's float32 logits take about ``BLOCK_BYTES`` and at most
    ``1/BLOCK_FRACTION`` of the classes, but at least ``MIN_BLOCK_CLASSES`` and at most ``n_classes``; a
    divisor of ``n_classes`` where one lies within a factor 2 below that size (no padding of the weight then).

    >>> class_block(2048, 32768), class_block(512, 131072), class_block(64, 50), class_block(256, 4096)
    (512, 2048, 50, 256)
    """
    v = max(int(n_classes), 1)
    size = max(min(BLOCK_BYTES // (4 * max(int(rows), 1)), v // BLOCK_FRACTION), MIN_BLOCK_CLASSES)
    if size >= v:
        return v
    for c in range(size, size // 2, -1):
        if v % c == 0:
            return c
    return size


def pick_blocks(n_positions: int, hidden_dim: int, n_classes: int, itemsize: int) -> tuple[int, int]:
    """(positions per chunk, classes per block) when ``chunk_size`` is None, for a backend that blocks both
    axes: all positions up to ``BLOCK_ROWS`` in one chunk (the weight's gradient is then written block by block,
    never accumulated across chunks), the classes by :func:`class_block`. ``hidden_dim`` and ``itemsize`` are
    part of the signature for backends that weigh the hidden states too.

    >>> pick_blocks(2048, 256, 32768, 4)
    (2048, 512)
    """
    rows = max(min(int(n_positions), BLOCK_ROWS), 1)
    return rows, class_block(rows, n_classes)


def linear_options(
    hidden_shape: tuple[int, ...], hidden_dtype: Any, weight_shape: tuple[int, ...], weight_dtype: Any,
    bias_shape: tuple[int, ...] | None, labels_shape: tuple[int, ...], labels_dtype: Any, *, gamma: Any,
    class_weight_shape: tuple[int, ...] | None, ignore_index: Any, label_smoothing: Any, reduction: Any,
    chunk_size: Any, where_shape: tuple[int, ...] | None = None, where_dtype: Any = "bool",
    bias_dtype: Any = None, class_weight: Any = None,
) -> LinearOptions:
    """Validates a ``linear_softmax_focal_loss`` call; returns the options with the chunk size resolved.

    ``gamma`` is a number (static; an array γ is a TypeError here). ``label_smoothing`` is a host value or
    :class:`~focal_spec.Unknown`, and so is ``class_weight`` when given (its values are checked as
    ``softmax_focal_loss``'s ``weight``: finite numbers, not booleans). ``hidden`` and ``weight`` must share one
    floating dtype; ``bias``, when given, must be floating.

    >>> o = linear_options((4, 8), "float32", (10, 8), "float32", None, (4,), "int64", gamma=2.0,
    ...                    class_weight_shape=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
    ...                    chunk_size=None)
    >>> o.num_classes, o.hidden_dim, o.chunk_size
    (10, 8, 4)
    """
    hidden_shape, weight_shape, labels_shape = tuple(hidden_shape), tuple(weight_shape), tuple(labels_shape)
    hdt, wdt = V.dtype_name(hidden_dtype), V.dtype_name(weight_dtype)
    positions = hidden_shape[:-1]
    v = weight_shape[0] if len(weight_shape) else 0
    logits_shape = positions + (v,)
    if V.dtype_kind(hdt) != "float":
        raise TypeError(V.invalid_dtype("hidden", "a floating dtype " + str(_options.FLOAT_DTYPES), hdt))
    if wdt != hdt:
        raise TypeError(V.invalid_dtype("weight", f"the hidden states' dtype, {hdt}", wdt))
    if len(hidden_shape) == 0:
        raise ValueError(V.invalid_shape("hidden", "at least one dimension (the features, D)", hidden_shape,
                                         logits_shape))
    d = hidden_shape[-1]
    if len(weight_shape) != 2 or weight_shape[1] != d:
        raise ValueError(V.invalid_shape("weight", f"(num_classes, {d}), one row of D={d} features per class",
                                         weight_shape, logits_shape))
    if bias_shape is not None:
        if bias_dtype is not None and V.dtype_kind(V.dtype_name(bias_dtype)) != "float":
            raise TypeError(V.invalid_dtype("bias", "a floating dtype", V.dtype_name(bias_dtype)))
        if tuple(bias_shape) != (v,):
            raise ValueError(V.invalid_shape("bias", f"one bias per class, shape ({v},)", tuple(bias_shape),
                                             logits_shape))
    ydt = V.dtype_name(labels_dtype)
    if V.dtype_kind(ydt) != "int":
        raise TypeError(V.invalid_dtype("labels", "integer class indices", ydt))
    if labels_shape != positions:
        raise ValueError(V.invalid_shape("labels", f"class indices of the hidden states' shape without the "
                                         f"feature axis, {positions}", labels_shape, logits_shape))
    g = check_linear_gamma(gamma)
    V.check_weight("class_weight", class_weight)
    if class_weight_shape is not None:
        V.check_class_weight("class_weight", class_weight_shape, v, logits_shape)
    if where_shape is not None:
        V.check_where_dtype(where_dtype)
        V.check_broadcast("where", where_shape, logits_shape, positions, "the hidden states' shape without the "
                          "feature axis")
    n = math.prod(positions)
    chunk = check_chunk_size(chunk_size)
    if chunk is None:
        chunk = pick_chunk_size(n, d, v, np.dtype(hdt).itemsize if hdt != "bfloat16" else 2)
    return LinearOptions(
        gamma=g, gamma_int=V.integer_gamma(g), num_classes=v, hidden_dim=d, positions=positions, n_positions=n,
        ignore_index=V.check_ignore_index(ignore_index), label_smoothing=V.check_label_smoothing(label_smoothing),
        reduction=V.check_reduction(reduction), compute_dtype=V.compute_dtype(hdt), hidden_dtype=hdt,
        chunk_size=chunk, has_bias=bias_shape is not None,
    )
