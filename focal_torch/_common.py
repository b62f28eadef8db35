"""Private helpers shared by the torch losses: dtypes, autocast, chunking and option plumbing."""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch

import focal_spec

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2

SOFTPLUS_THRESHOLD = 40.0
"""``F.softplus`` returns x itself above this. 40 (not torch's default 20) keeps float64 exact:
exp(-40) is below half an ulp of 40, while exp(-20) is not."""

CHUNK = 1 << 16
"""Elements per piece and per intra-op thread in the eager elementwise kernels. Large inputs are
processed piece by piece, so that the temporaries stay in cache and are recycled by the allocator
instead of being faulted in afresh. (Measured on 2 CPU cores: smaller pieces pay per-op overhead,
larger ones miss the cache.)"""

SOFTMAX_CHUNK = 1 << 20
"""Elements per piece in the softmax kernels, whose per-position statistics favour larger pieces."""

MAX_PIECES = 16
"""At most this many pieces: every op of every piece is one parallel region, and on a busy machine
each region can stall, so very large inputs get larger pieces rather than more of them."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return getattr(torch, focal_spec.compute_dtype(focal_spec.dtype_name(dtype)))


_compute_dtype_cached = functools.cache(_compute_dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype is computed in float32 (focal_spec.compute_dtype). Cached in eager
    calls; traced directly under Dynamo, which warns about a cache wrapper it has to skip."""
    return _compute_dtype(dtype) if is_compiling() else _compute_dtype_cached(dtype)


def is_compiling() -> bool:
    return torch.compiler.is_compiling()


def is_transformed(t: torch.Tensor) -> bool:
    """Whether ``t`` is wrapped by a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``...), whose
    values cannot drive Python control flow."""
    if is_compiling():  # Dynamo cannot trace the check, and sees unwrapped tensors
        return False
    # torch.func.debug_unwrap (public since torch 2.7) returns a plain tensor itself, and a wrapped one's
    # inner tensor: only the identity is used, never the result
    return isinstance(t, torch.Tensor) and _debug_unwrap(t, recurse=False) is not t


_debug_unwrap = torch.func.debug_unwrap


ACCELERATOR_PATHS = False
"""When True, CPU tensors take the code paths of accelerator tensors (whole-tensor kernels, no value reads,
no ``.item()``): the tests set it to exercise on the CPU what a GPU runs."""


def is_host(t: torch.Tensor) -> bool:
    """Whether ``t`` takes the CPU code paths (chunked kernels, free value reads): a CPU tensor, unless
    :data:`ACCELERATOR_PATHS` is set."""
    return t.is_cpu and not ACCELERATOR_PATHS


def has_tangent(t: Any) -> bool:
    """Whether ``t`` carries a forward-mode tangent (``torch.autograd.forward_ad``)."""
    if is_compiling() or not isinstance(t, torch.Tensor):
        return False
    return torch.autograd.forward_ad.unpack_dual(t).tangent is not None


def any_tangent(*ts: Any) -> bool:
    """Whether any of ``ts`` carries a forward-mode tangent (:func:`has_tangent`)."""
    return any(has_tangent(t) for t in ts)


def is_differentiated(t: Any) -> bool:
    """Whether a gradient or tangent may flow through ``t``: it requires grad, is wrapped by a ``torch.func``
    transform, or is a forward-mode dual tensor. Such an option stays a tensor input of the loss."""
    return isinstance(t, torch.Tensor) and (t.requires_grad or is_transformed(t) or has_tangent(t))


def plain_eager(*ts: torch.Tensor) -> bool:
    """Whether a call on the tensors ``ts`` runs eagerly on plain tensors: outside ``torch.compile``, none of
    them wrapped by a ``torch.func`` transform (:func:`is_transformed`) or carrying a forward-mode tangent
    (:func:`has_tangent`). A transform that wraps none of a call's tensors leaves it plain, but its
    ``autograd.Function`` kernels still refuse to run there: :func:`functions_refused` tells that case apart
    after the refusal."""
    if torch.compiler.is_compiling():
        return False
    for t in ts:
        if _debug_unwrap(t, recurse=False) is not t or (
                t.is_floating_point() and torch.autograd.forward_ad.unpack_dual(t).tangent is not None):
            return False  # (an integer tensor carries no tangent)
    return True


def any_transformed(*ts: Any) -> bool:
    """Whether any of ``ts`` is wrapped by a ``torch.func`` transform (:func:`is_transformed`)."""
    return any(is_transformed(t) for t in ts)


class _OldStyleProbe(torch.autograd.Function):
    """An identity with ``forward(ctx, ...)`` and no ``setup_context``: torch refuses to run such a Function
    while a ``torch.func`` transform is active (documented in "Extending torch.func with autograd.Function")."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return g


_PROBE = torch.zeros(())


def functions_refused() -> bool:
    """Whether an ``autograd.Function`` in the ``forward(ctx, ...)`` style, as the eager kernels are, cannot run
    now: a ``torch.func`` transform is active. The kernels' callers ask after a ``RuntimeError``, to tell a
    transform that wrapped none of the call's tensors (the smooth formula then serves) from a real error
    (raised again). Public behaviour only; it costs a Function call, so it is for that error path."""
    try:
        _OldStyleProbe.apply(_PROBE)
    except RuntimeError:
        return True
    return False


def can_read_values(t: torch.Tensor) -> bool:
    """Whether eager code may look at ``t``'s values without a device sync or a graph break: a plain CPU
    tensor outside ``torch.compile``, not wrapped by a ``torch.func`` transform."""
    return not is_compiling() and is_host(t) and not is_transformed(t)


def can_check_values(t: torch.Tensor) -> bool:
    """Whether an eager data check (out-of-range labels or targets) may run on ``t``: outside
    ``torch.compile``, ``t`` not wrapped by a ``torch.func`` transform and not on the meta device. On an
    accelerator it costs one host sync; on a wrapped tensor or under compile the check is skipped and the
    element's loss is NaN."""
    return not is_compiling() and t.device.type != "meta" and not is_transformed(t)


def spec_value(value: Any) -> Any:
    """What :mod:`focal_spec`'s checks see of an option: host values as they are; a tensor whose values
    can be read for free (:func:`can_read_values`) as NumPy data; any other tensor (an accelerator's, a
    fake one under ``torch.compile``, a ``torch.func``-wrapped one) as ``focal_spec.Unknown(shape, dtype)``,
    checked by shape and dtype only. Under ``torch.compile`` a Python number is ``Unknown(())`` too: with
    ``dynamic=True`` it is symbolic (so that a changing value does not recompile), and reading it
    (``math.isfinite``, ``float``) would specialise on it or break the graph."""
    if isinstance(value, torch.Tensor):
        if can_read_values(value):
            try:
                v = value.detach()
                return (v if v.dtype in (torch.float32, torch.float64) or not v.is_floating_point()
                        else v.float()).numpy()
            except RuntimeError:  # a torch.func grad transform wraps even a plain tensor's detach(): unread
                pass
        return focal_spec.Unknown(tuple(value.shape), focal_spec.dtype_name(value.dtype))
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        return focal_spec.Unknown(())
    if is_compiling() and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return focal_spec.Unknown(())
    return value


def spec_gamma(gamma: Any) -> Any:
    """:func:`spec_value` of ``gamma``. Under ``torch.compile`` a Python number is still checked, with
    comparisons (graph guards, not specialisations): a negative or infinite γ raises there too."""
    if is_compiling() and type(gamma) in (int, float) and not (gamma >= 0 and gamma != math.inf):
        # the value itself is symbolic: it cannot be formatted into the message while tracing
        raise ValueError(focal_spec.invalid_value("gamma", focal_spec.GAMMA_EXPECTED, "a negative or infinite number"))
    return spec_value(gamma)


def distinct(args: tuple) -> tuple:
    """``args`` with each tensor that repeats an earlier one (the same tensor passed as two options) replaced by
    a view of it: Dynamo refuses an ``autograd.Function`` given one tensor twice."""
    out: list = []
    for a in args:
        if isinstance(a, torch.Tensor) and any(a is b for b in out):
            a = a.view_as(a)
        out.append(a)
    return tuple(out)


def spec_unit(arg: str, value: Any) -> Any:
    """:func:`spec_value` of an option in [0, 1] (``alpha``, ``label_smoothing``). Under ``torch.compile`` a Python
    number is still range-checked, with comparisons (graph guards, not specialisations)."""
    if is_compiling() and type(value) in (int, float) and not 0.0 <= value <= 1.0:
        # the value itself may be symbolic: it cannot be formatted into the message while tracing
        raise ValueError(focal_spec.invalid_value(arg, "a number in [0, 1]", "a number outside [0, 1]"))
    return spec_value(value)


def hold_logits(ctx: Any, x: torch.Tensor) -> None:
    """Keeps a weak reference to the logits on ``ctx``: a kernel that saves dℓ/dx in their place needs them only
    for a double backward (:func:`held_logits`)."""
    ctx.x_ref, ctx.x_version = weakref.ref(x), x._version


def held_logits(ctx: Any, loss: str) -> torch.Tensor:
    """The logits kept by :func:`hold_logits`, for a double backward: RuntimeError if they are gone or were
    modified in place since."""
    x = ctx.x_ref()
    if x is None or x._version != ctx.x_version:
        raise RuntimeError(f"{loss}: a double backward needs the logits it was called with, alive and unmodified; "
                           "keep a reference to them (or use torch.func transforms)")
    return x


def keep(ctx: Any, grad: torch.Tensor) -> None:
    """Keeps dℓ/dx, computed with the loss, on ``ctx`` for the backward (an attribute, not a saved tensor, so
    that :func:`hand_over` can give it away)."""
    ctx.kept = grad


def hand_over(ctx: Any, kept: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a backward returns ``kept`` (dℓ/dx of the reduced loss, computed with it; :func:`keep`) itself
    as the gradient instead of ``kept * grad_out``: the cotangent is exactly 1 (``loss.backward()``) and read for
    free (host), and ``kept`` is in the input's dtype. ``ctx`` then lets go of it, so that the caller owns the
    tensor: a later backward through the same graph (``retain_graph=True``) finds no kept gradient and
    recomputes it from the logits (held by a weak reference, :func:`held_logits`)."""
    if (kept.dtype == dtype and grad_out.numel() == 1 and is_host(grad_out) and ctx.kept is kept
            and grad_out.item() == 1.0):
        ctx.kept = None
        return True
    return False


def check_device(arg: str, value: Any, device: torch.device) -> None:
    """A tensor option must live on the logits' device; a CPU tensor may accompany accelerator logits (it
    is moved, as a Python number would be). Anything involving the meta device must match exactly."""
    if not isinstance(value, torch.Tensor) or value.device == device:
        return
    if value.device.type == "cpu" and device.type != "meta":
        return
    raise ValueError(focal_spec.invalid_device(arg, device, value.device))


def checked_target(input: Any, target: Any, **options: Any) -> Any:
    """The prologue of every loss: ``input`` must be a tensor, ``target`` becomes one on its device, and
    ``target`` and each tensor option must live on ``input``'s device (:func:`check_device`)."""
    check_tensor("input", input)
    dev = input.device
    if not isinstance(target, torch.Tensor):
        target = torch.as_tensor(target, device=dev)
    check_device("target", target, dev)
    for arg, value in options.items():
        check_device(arg, value, dev)
    return target


def check_tensor(arg: str, value: Any) -> None:
    """Logits must be a tensor (as for ``F.cross_entropy``); NumPy arrays and lists are rejected with the
    spec's message rather than an AttributeError deep inside."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(focal_spec.invalid_type(arg, "a torch.Tensor", value))


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla")


_NULL = contextlib.nullcontext()


def no_autocast(device: torch.device, known_off: bool = False) -> contextlib.AbstractContextManager[Any]:
    """Autocast off: every op of a loss runs in the compute dtype chosen here, not in a lower one.
    ``known_off``: the caller has checked that autocast is disabled (nothing to do)."""
    if known_off:
        return _NULL
    if device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def as_tensor(value: Any, *, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor | None:
    """``None`` stays ``None``; tensors, NumPy arrays, sequences and numbers become a tensor on ``device``."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.as_tensor(value, dtype=dtype, device=device)


_NO_MIN_MAX = tuple(getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name))


def min_max_ready(t: torch.Tensor) -> torch.Tensor:
    """``t``, widened to int64 where torch has no min/max reduction for its dtype (the wide unsigned ones)."""
    return t.long() if t.dtype in _NO_MIN_MAX else t


def shape_of(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):  # first: Dynamo before torch 2.5 cannot trace hasattr on a tensor
        return tuple(value.shape)
    if hasattr(value, "shape"):
        return tuple(value.shape)
    return tuple(torch.as_tensor(value).shape)


def scalar_or_tensor(value: torch.Tensor | float) -> torch.Tensor | float:
    """A 0-d coefficient as a Python float when that costs no device sync (CPU, eager), else a tensor."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and can_read_values(value) and not has_tangent(value):
        return float(value)
    return value


# ----------------------------------------------------------------------------------------
# Chunking (eager only).
# ----------------------------------------------------------------------------------------


def _flattenable(x: torch.Tensor, operands: Sequence[torch.Tensor | None]) -> bool:
    if not x.is_contiguous():
        return False
    for op in operands:
        if op is None or op.numel() == 1:
            continue
        if tuple(op.shape) != tuple(x.shape) or not op.is_contiguous():
            return False
    return True


Region = tuple[str, slice] | None


def chunked(x: torch.Tensor, *operands: torch.Tensor | None,
            chunk: int | None = None) -> Iterator[tuple[Region, tuple[torch.Tensor | None, ...]]]:
    """Yields ``(region, (x_piece, *operand_pieces))``; see :func:`piece_of` for the region.

    Everything is flattened when it can be; otherwise the pieces are rows of dim 0. Operands
    broadcast against ``x``: one with x's full extent along the split dim is sliced with it, any
    other (a per-class vector, a scalar) is passed whole. Small inputs, and tensors on an
    accelerator (where one kernel launch per op is what counts), come in one piece.
    """
    chunk = CHUNK * max(1, torch.get_num_threads()) if chunk is None else chunk
    n = x.numel()
    chunk = max(chunk, -(-n // MAX_PIECES))
    if x.dim() == 0 or n <= chunk or not is_host(x):  # accelerators: whole-tensor kernels
        yield None, (x, *operands)
        return
    if _flattenable(x, operands):
        xs = x.reshape(-1)
        ops = [None if op is None else op.reshape(-1) for op in operands]
        for i in range(0, n, chunk):
            sl = slice(i, min(i + chunk, n))
            yield ("flat", sl), (xs[sl], *[op if op is None or op.numel() == 1 else op[sl] for op in ops])
        return
    rows = x.shape[0]
    step = max(1, chunk // max(1, n // rows))
    for i in range(0, rows, step):
        sl = slice(i, min(i + step, rows))
        pieces = []
        for op in operands:
            if op is not None and op.dim() == x.dim() and op.shape[0] == rows:
                op = op[sl]
            pieces.append(op)
        yield ("rows", sl), (x[sl], *pieces)


def piece_of(out: torch.Tensor, region: Region) -> torch.Tensor:
    """The view of a contiguous ``out`` (x's shape) that a region from :func:`chunked` covers."""
    if region is None:
        return out
    kind, sl = region
    return out.view(-1)[sl] if kind == "flat" else out[sl]


def log1p_neg_(m: torch.Tensor, u: torch.Tensor | None = None, t: torch.Tensor | None = None) -> torch.Tensor:
    """log1p(-m) for 0 <= m <= 1/2 (``m`` = min(σ(x), σ(-x)): -log(1 + e^-|x|)), written into ``m``.

    On the CPU, where ATen's ``log1p`` is a scalar loop several times slower than the vectorised ``log``, as
    log(u) - t / u with u = 1 - m rounded and t = (u - 1) + m, the rounding error of u, exact (u - 1 is exact for
    u in [1/2, 1], and so is the error of a rounded sum): accurate to a few ulp, and -m where u rounds to 1.
    ``u`` and ``t`` are optional buffers of ``m``'s shape (overwritten)."""
    if not is_host(m):
        return m.neg_().log1p_()
    u = torch.neg(m) if u is None else torch.neg(m, out=u)
    u.add_(1.0)
    t = torch.sub(u, 1.0) if t is None else torch.sub(u, 1.0, out=t)
    t.add_(m)
    return torch.log(u, out=m).addcdiv_(t, u, value=-1.0)


def ipow(q: torch.Tensor, n: int, *, inplace: bool) -> torch.Tensor:
    """q**n for a small whole n >= 1 by repeated multiplication (no pow, exp or log)."""
    if n == 1:
        return q
    if inplace and n & (n - 1) == 0:  # a power of two: square in place
        while n > 1:
            q = q.mul_(q)
            n //= 2
        return q
    r = q * q
    for _ in range(n - 2):
        r = r.mul_(q) if inplace else r * q
    return r


# ----------------------------------------------------------------------------------------
# Exact masking by bits. Zeroing with torch.where is the NaN-safe way, but on the CPU its
# boolean kernels are several times slower than arithmetic. Clearing the bits of a float
# (x & 0 is +0.0, x & ~0 is x) is exact for NaN and inf too, and runs at the speed of a mul.
# ----------------------------------------------------------------------------------------

_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


def keep_bits(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """All ones where ``mask`` is True, zeros elsewhere, as the integer type of ``dtype``'s width."""
    return mask.to(_INT_OF[dtype]).neg_()


def zero_unless(v: torch.Tensor, mask: torch.Tensor, bits: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.where(mask, v, 0)`` (NaN-safe), by bits in eager mode and with ``where`` when compiling."""
    if is_compiling():
        return torch.where(mask, v, 0.0)
    if bits is None:
        bits = keep_bits(mask, v.dtype)
    return torch.bitwise_and(v.view(_INT_OF[v.dtype]), bits).view(v.dtype)


def zero_unless_(v: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """In-place :func:`zero_unless` with precomputed bits (eager only)."""
    v.view(_INT_OF[v.dtype]).bitwise_and_(bits)
    return v
