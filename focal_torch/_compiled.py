"""Fused kernels: the eager kernels of the losses, compiled by ``torch.compile`` (inductor) into one loop.

An eager kernel runs one ATen op after another, each reading and writing the whole input; compiled, the same
code runs in one or two passes (C++ with OpenMP and vector math on the CPU, Triton on a GPU). A kernel is
compiled once per static structure (which options are given, the dtypes, the reduction) with dynamic shapes,
on its first call in a process (seconds; inductor caches the result on disk for later processes), and used
for inputs of at least :data:`COMPILE_MIN` elements. Where compiling fails (no C++ compiler, an unsupported
backend), a warning is issued once and the eager kernels run from then on.
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch

COMPILE_MIN = 1 << 13
"""Inputs of at least this many elements take the compiled kernels; below it a compiled call's fixed cost
(tens of microseconds) exceeds what fusing saves."""

_ENV = "FOCAL_TORCH_COMPILE"
_enabled = os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
_failed: str | None = None
_kernels: dict[Any, Callable[..., Any]] = {}


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
    """Whether large inputs take the compiled kernels now (off after a failed compilation)."""
    return _enabled and _failed is None


def applies(x: torch.Tensor) -> bool:
    """Whether ``x`` takes a compiled kernel: enabled, large enough, on the CPU or a CUDA device (the
    backends inductor generates code for)."""
    return (_enabled and _failed is None and x.numel() >= COMPILE_MIN and x.device.type in ("cpu", "cuda"))


def run(name: str, fn: Callable[..., Any], *args: Any, **static: Any) -> Any:
    """``fn(*args, **static)`` compiled (one compiled kernel per ``name`` and ``static``, which are baked into
    it), or None where compiling or running it failed: the caller then runs its eager kernel."""
    global _failed
    key = (name, *sorted(static.items()))
    kernel = _kernels.get(key)
    if kernel is None:
        def bound(*a: Any) -> Any:
            return fn(*a, **static)
        # a code object of its own: Dynamo keeps its compiled entries (and their number's limit) per code object
        code = bound.__code__.replace(co_name=f"focal_{name}_{len(_kernels)}")
        bound = types.FunctionType(code, bound.__globals__, code.co_name, None, bound.__closure__)
        kernel = _kernels[key] = torch.compile(bound, dynamic=True, fullgraph=True)
    try:
        return kernel(*args)
    except Exception as err:  # no compiler, an inductor limitation: the eager kernels serve from now on
        _failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        warnings.warn(f"focal_torch: compiled kernels are unavailable ({_failed}); using the eager kernels "
                      f"(set {_ENV}=0 to skip the attempt)", RuntimeWarning, stacklevel=3)
        return None
