"""Fused kernels: the eager kernels of the losses, compiled by inductor into one loop.

An eager kernel runs one ATen op after another, each reading and writing the whole input (and, on a small input,
each paying a few microseconds of dispatch); compiled, the same code runs in one or two passes (C++ with OpenMP
and vector math on the CPU, Triton on a GPU) behind one call.

How a kernel is made. The kernel's Python code is traced to an ATen graph with symbolic sizes
(``make_fx(tracing_mode="symbolic")``; equal sizes share a symbol, so that inductor sees equal loop ranges), and
the graph, made functional and decomposed, is compiled by inductor's inner compiler (``compile_fx_inner``). Its
generated function is called directly, without ``torch.compile``'s per-call machinery (guards and wrappers cost
30-50 µs a call; this call about 3 µs at (8, 4)). What a kernel is specialised
on is its key, checked at every call in place of guards: the kernel's name and options; the thread count
(baked into the OpenMP code; 1 below :data:`PARALLEL_MIN` elements); each argument's dtype,
device, number of dims and layout (contiguous, or channels_last for 4-d); which of all their sizes are equal and
which are 1; and the values of the non-tensor arguments (numbers such as ``alpha`` are constants of the kernel;
what changes from call to call, such as the mean's scale or a fractional γ, is passed as a tensor). A new batch
size with the same pattern needs no new kernel. The traced code never branches on a size (where the eager code
chooses between two equal formulas by size, the trace takes one): a trace that assumed anything of the sizes but
the equality of two of them is refused.

When a kernel is made. An input of at least :data:`COMPILE_MIN` elements compiles its kernel on its first call;
a smaller one after :data:`WARM_CALLS` calls of the same key (a training loop's loss is called thousands of
times with one key; a script that calls it a few times never waits for a compiler). Compiling takes seconds, once
per key and process (inductor caches the generated code on disk for later processes). Other layouts, empty
inputs and inputs of 2^31 elements or more run the eager kernels. Where compiling fails (no C++ compiler, an
unsupported backend), a warning is issued once and the eager kernels run from then on.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

COMPILE_MIN = 1 << 13
"""Inputs of at least this many elements compile their kernel on the first call."""

WARM_CALLS = 100
"""Smaller inputs compile their kernel on this call of the same key (the eager kernels serve the calls before)."""

PARALLEL_MIN = 1 << 15
"""Kernels for inputs of at least this many elements run on torch's intra-op threads (OpenMP); smaller ones get a
single-threaded kernel of their own (waking the threads costs more than it saves there)."""

MAX_KERNELS = 256
"""At most this many kernels per process; further keys run the eager kernels."""

_ENV = "FOCAL_TORCH_COMPILE"
_enabled = os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
_failed: str | None = None
_kernels: dict[Any, tuple[Callable[..., Any], bool]] = {}
_seen: dict[Any, tuple[Callable[..., Any], bool, tuple[int, ...], frozenset[int]]] = {}
_calls: dict[Any, int] = {}
_INT32_MAX = (1 << 31) - 1


def set_compiled_kernels(enabled: bool) -> bool:
    """Turns the compiled kernels on or off for this process (on by default; the environment variable
    ``FOCAL_TORCH_COMPILE=0`` turns them off from the start) and returns the previous setting. Off, every input
    runs the eager kernels: the same formulas, one op at a time."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"set_compiled_kernels: enabled must be a bool, got {type(enabled).__name__}")
    previous, _enabled = _enabled, enabled
    return previous


def compiled_kernels_enabled() -> bool:
    """Whether inputs take the compiled kernels now (off after a failed compilation)."""
    return _enabled and _failed is None


def applies(x: torch.Tensor) -> bool:
    """Whether ``x`` may take a compiled kernel: enabled, on the CPU or a CUDA device (the backends inductor
    generates code for). :func:`run` decides the rest (the layout, and when the kernel is compiled)."""
    return _enabled and _failed is None and x.device.type in ("cpu", "cuda")


def _layout(t: torch.Tensor) -> str | None:
    if t.is_contiguous():
        return "c"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "cl"
    return None


def _signature(a: Any) -> Any:
    """What a kernel is specialised on, of one argument (None: no kernel takes it)."""
    if isinstance(a, torch.Tensor):
        layout = _layout(a)
        if layout is None or a.numel() == 0 or a.numel() > _INT32_MAX:
            return None
        return a.dtype, a.device, a.dim(), layout
    return type(a), a


def _size_pattern(args: tuple) -> tuple[int, ...]:
    """Which sizes of the tensor arguments are equal, and which are 1: each size as the index of its value's first
    appearance, 1 as -1. The trace gives equal sizes one symbol (and specialises 1), so the kernel serves exactly
    the calls with this pattern."""
    seen: dict[int, int] = {}
    return tuple(-1 if s == 1 else seen.setdefault(s, len(seen))
                 for a in args if isinstance(a, torch.Tensor) for s in a.shape)


def _compile(fn: Callable[..., Any], args: tuple, static: dict, threads: int) -> tuple[Callable[..., Any], bool]:
    """``fn(*args, **static)`` traced with symbolic sizes and compiled: (a callable of the list of ``args``'
    tensors (0-d ones passed with shape (1,)), the other arguments baked in, returning a list of outputs; whether
    ``fn`` returns one output rather than a tuple)."""
    from torch._guards import TracingContext, tracing
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental import _config as fx_config
    from torch.fx.experimental.proxy_tensor import make_fx

    slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    scalars = {i for i in slots if args[i].dim() == 0}
    consts = [None if i in slots else a for i, a in enumerate(args)]
    single = []

    def kernel(*tensors: torch.Tensor) -> tuple:
        full = list(consts)
        for i, t in zip(slots, tensors, strict=True):
            full[i] = t.reshape(()) if i in scalars else t
        out = fn(*full, **static)
        single.append(not isinstance(out, tuple))
        return (out,) if single[-1] else out

    # A 0-d tensor would be read as a Python number by the tracer (a value the kernel would then depend on). The
    # graph is made functional and decomposed here, as inductor's own front end would, so that inductor's inner
    # compiler takes it and its generated function is called without the front end's per-call wrappers.
    examples = [args[i].detach().reshape(1) if i in scalars else args[i].detach() for i in slots]
    with torch.no_grad(), fx_config.patch(use_duck_shape=True):  # equal sizes, one symbol: see _size_pattern
        graph = make_fx(torch.func.functionalize(kernel, remove="mutations_and_views"),
                        decomposition_table=select_decomp_table(), tracing_mode="symbolic")(*examples)
    fakes = [n.meta["val"] for n in graph.graph.nodes if n.op == "placeholder"]
    _check_assumptions(fakes)
    # The thread count is baked into the C++ (OpenMP) code; naming it in the config puts it into inductor's cache
    # key, so that a kernel compiled in a process with fewer threads is not loaded from disk by one with more.
    # The inputs' sizes and strides are those of the kernel's key (checked by ``run``): no assertions per call.
    options = {"cpp.threads": threads, "size_asserts": False}
    with inductor_config.patch(options), tracing(TracingContext(fakes[0].fake_mode)):
        compiled = compile_fx_inner(graph, fakes)
    return compiled.current_callable, single[0]


def _check_assumptions(fakes: list) -> None:
    """A kernel is called without guards: tracing may have assumed no more than that two sizes are equal (an
    elementwise op between them, which every valid call satisfies). A branch on a size would bake that branch's
    condition into the kernel: refused (the eager kernels then run)."""
    mode = next((t.fake_mode for t in fakes if hasattr(t, "fake_mode")), None)
    env = None if mode is None else mode.shape_env
    for guard in [] if env is None else env.guards:
        if not _holds(guard.expr):
            raise RuntimeError(f"the traced kernel assumes {guard.expr} of the sizes")


def _holds(expr: Any) -> bool:
    """Whether a guard holds for every call with the kernel's key: an equality of two sizes (which the size pattern
    or the op's own shape check ensures), or an or/and of such terms."""
    kind = type(expr).__name__
    if kind == "Equality":
        return all(a.is_Symbol for a in expr.args)
    if kind == "Or":
        return any(_holds(a) for a in expr.args)
    if kind == "And":
        return all(_holds(a) for a in expr.args)
    return False


_scalars: dict[tuple[float, torch.device], torch.Tensor] = {}


def scalar(value: float, device: torch.device) -> torch.Tensor:
    """``value`` as a 0-d float64 tensor on ``device`` (a kernel argument, so that a new value, such as the mean's
    1/n for a new batch size, needs no new kernel), made once per value and device (the kernels only read it)."""
    key = (value, device)
    t = _scalars.get(key)
    if t is None:
        if len(_scalars) >= 1024:
            _scalars.clear()
        t = _scalars[key] = torch.full((), value, dtype=torch.float64, device=device)
    return t


def run(name: str, fn: Callable[..., Any], *args: Any, **static: Any) -> Any:
    """``fn(*args, **static)`` by a compiled kernel, or None where no kernel serves this call (yet): the caller
    then runs its eager kernel. ``args[0]`` is the input whose size decides when the kernel is compiled and whether
    it runs on several threads. Calls whose exact shapes, strides, dtypes and values were seen before find their
    kernel in one lookup; others derive the kernel's key (:func:`_signature`, :func:`_size_pattern`)."""
    global _failed
    threads = torch.get_num_threads() if args[0].numel() >= PARALLEL_MIN else 1
    exact = (name, *static.items(), threads, *[(a.shape, a.stride(), a.dtype, a.device) if type(a) is torch.Tensor
                                               else (type(a), a) for a in args])
    try:
        hit = _seen.get(exact)
        if hit is None:
            sig = tuple(_signature(a) for a in args)
            if None in sig:  # a layout, size or emptiness no kernel takes
                return None
            key = (name, tuple(sorted(static.items())), sig, _size_pattern(args), threads)
            kernel = _kernels.get(key)
            if kernel is None:
                calls = _calls.get(key, 0) + 1
                if args[0].numel() < COMPILE_MIN and calls < WARM_CALLS or len(_kernels) >= MAX_KERNELS:
                    if len(_calls) >= 4096:
                        _calls.clear()
                    _calls[key] = calls
                    return None
                _calls.pop(key, None)
                kernel = _kernels[key] = _compile(fn, args, static, threads)
            slots = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
            hit = *kernel, slots, frozenset(i for i in slots if args[i].dim() == 0)
            if len(_seen) >= 4096:
                _seen.clear()
            _seen[exact] = hit
        kernel, single, slots, scalars = hit
        out = kernel([args[i].reshape(1) if i in scalars else args[i] for i in slots])
        return out[0] if single else tuple(out)
    except Exception as err:  # no compiler, an inductor limitation: the eager kernels serve from now on
        _failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        warnings.warn(f"focal_torch: compiled kernels are unavailable ({_failed}); using the eager kernels "
                      f"(set {_ENV}=0 to skip the attempt)", RuntimeWarning, stacklevel=3)
        return None
