"""The fused linear + softmax focal loss against the unfused losses, forward plus backward, in both frameworks.

Cases (N, D, V) = (2048, 256, 32768) and (512, 256, 131072), float32, γ = 2, integer labels with 5 % of them
``ignore_index``, mean reduction, gradients with respect to the hidden states and the weight. Rows per case
and framework:

- ``fused``: ``linear_softmax_focal_loss(hidden, weight, labels)``;
- ``unfused``: ``softmax_focal_loss(hidden @ weight.T, labels)`` (the logits materialised);
- ``framework CE``: optax's ``softmax_cross_entropy_with_integer_labels`` (JAX) or ``F.cross_entropy``
  (PyTorch) on the materialised logits.

Before timing, the fused loss's value and gradients are compared with the unfused loss's (exit status 1 on a
mismatch). Time: the minimum over ``--rounds`` interleaved rounds of one jitted (JAX) or eager (PyTorch)
forward + backward. Memory: JAX, the compiled temporaries of the jitted ``value_and_grad``
(``memory_analysis().temp_size_in_bytes``: what the step allocates beyond its inputs and outputs); PyTorch, the
peak resident set of a fresh process running one step (after a warm-up step, with the gradients set to None),
over its resident set before the step, less the bytes of the gradients the step returns.

Targets: the fused loss's memory at most 1/8 of the unfused logits' bytes, its time at most 1.15× the unfused
``softmax_focal_loss`` and at most 1.3× the framework's cross-entropy. Each is printed MET or MISSED.

Peers at γ = 0 (PyTorch, rows next to ``fused γ=0``, ours at γ = 0): Apple's Cut Cross-Entropy
(``cut_cross_entropy.linear_cross_entropy``) when it imports, with its ``cce`` kernels on a GPU and its
``torch_compile`` implementation on the CPU (which materialises the logits inside ``torch.compile``), and
Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` on a GPU when it imports. Neither is a dependency.

``--device cuda`` runs the case (8192, 4096, 128256) in bfloat16 on the GPU (memory: the peak of the device's
allocator over what it held before the step, less the returned gradients; JAX on its GPU device, temporaries as
above). ``--dtype bfloat16`` runs the CPU cases (or, with ``--quick``, small ones) in bfloat16.

Run:
  python examples/benchmark_linear.py [--quick] [--json PATH] [--rounds N] [--only jax|torch]
  python examples/benchmark_linear.py --device cuda                 # on a GPU
  python examples/benchmark_linear.py --quick --dtype bfloat16      # the half-precision path, small, on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import numpy as np

CASES = [(2048, 256, 32768), (512, 256, 131072)]
QUICK_CASES = [(256, 32, 4096), (64, 32, 16384)]
CUDA_CASES = [(8192, 4096, 128256)]  # a Llama-3-sized head
CUDA_QUICK_CASES = [(512, 128, 16384)]
ITEMSIZE_OF = {"bfloat16": "float16"}  # NumPy has no bfloat16: a dtype of the same size
GAMMA = 2.0
IGNORED = 0.05
MEMORY_TARGET = 1 / 8
TIME_TARGET_UNFUSED = 1.15
TIME_TARGET_CE = 1.3
ROOT = pathlib.Path(__file__).resolve().parents[1]


def inputs(n: int, d: int, v: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, d), dtype=np.float32)
    w = rng.standard_normal((v, d), dtype=np.float32)
    w *= np.float32(1 / np.sqrt(d))  # in place: no float64 copy to raise the peak before the step
    y = rng.integers(0, v, size=n)
    y[rng.random(n) < IGNORED] = -100
    return h, w, y


RTOL = {"float32": 2e-4, "bfloat16": 3e-2, "float16": 5e-3}
"""Fused against unfused, max |error| / max |value|: float32 as the parity suite's bound for these sums; half
precision with one rounding of the logits' gradient to the inputs' dtype beyond it (see the precision contract)."""


def _close(a: Any, e: Any, what: str, rtol: float = 2e-4) -> str | None:
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    err = float(np.max(np.abs(a - e))) if a.size else 0.0
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    return None if err <= rtol * scale + 1e-30 else f"{what}: max |error| {err:.3g} > {rtol:g} x {scale:.3g}"


# ----------------------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------------------


def jax_rows(n: int, d: int, v: int, rounds: int, device: str = "cpu",
             dtype: str = "float32") -> tuple[list[dict], list[str]]:
    """The JAX rows of one case and the mismatches found."""
    import jax
    import jax.numpy as jnp
    import optax

    import focal_jax

    dev = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    h_np, w_np, y_np = inputs(n, d, v)
    h, w, y = (jax.device_put(jnp.asarray(a), dev) for a in (h_np, w_np, y_np))
    h, w = h.astype(dtype), w.astype(dtype)
    counted = y != -100
    fns = {
        "fused": lambda h, w: focal_jax.linear_softmax_focal_loss(h, w, y, gamma=GAMMA),
        "unfused": lambda h, w: focal_jax.softmax_focal_loss(h @ w.T, y, gamma=GAMMA),
        "framework CE": lambda h, w: jnp.sum(jnp.where(counted, optax.softmax_cross_entropy_with_integer_labels(
            (h @ w.T).astype(jnp.float32), jnp.maximum(y, 0)), 0.0)) / jnp.sum(counted),
    }
    compiled, memory = {}, {}
    for name, f in fns.items():
        c = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(h, w).compile()
        compiled[name] = c
        memory[name] = int(c.memory_analysis().temp_size_in_bytes)
    (va, ga), (ve, ge) = compiled["fused"](h, w), compiled["unfused"](h, w)
    f32 = [np.asarray(jnp.asarray(t, jnp.float32)) for t in (va, ga[0], ga[1], ve, ge[0], ge[1])]
    errors = [e for e in (_close(f32[0], f32[3], "jax value", RTOL[dtype]),
                          _close(f32[1], f32[4], "jax d hidden", RTOL[dtype]),
                          _close(f32[2], f32[5], "jax d weight", RTOL[dtype])) if e]
    times = dict.fromkeys(fns, float("inf"))
    for r in range(rounds):
        names = list(fns)
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            jax.block_until_ready(compiled[name](h, w))
            times[name] = min(times[name], time.perf_counter() - t)
    return [dict(framework="jax", impl=k, n=n, d=d, v=v, dtype=dtype, device=device, seconds=times[k],
                 memory_bytes=memory[k], memory_kind="compiled temp bytes") for k in fns], errors


# ----------------------------------------------------------------------------------------
# PyTorch
# ----------------------------------------------------------------------------------------

def torch_losses(y: Any, device: str) -> dict[str, Any]:
    """name -> loss(h, w) of the PyTorch rows: ours fused and unfused, the framework's cross-entropy, ours at γ = 0
    and the γ = 0 peers that import (their rows are left out otherwise)."""
    import torch.nn.functional as F

    import focal_torch

    fns = {
        "fused": lambda h, w: focal_torch.linear_softmax_focal_loss(h, w, y, gamma=GAMMA),
        "unfused": lambda h, w: focal_torch.softmax_focal_loss(h @ w.T, y, gamma=GAMMA),
        "framework CE": lambda h, w: F.cross_entropy((h @ w.T).float(), y),
        "fused γ=0": lambda h, w: focal_torch.linear_softmax_focal_loss(h, w, y, gamma=0.0),
    }
    try:
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if device == "cuda" else "torch_compile"
        fns[f"CCE {impl} γ=0"] = lambda h, w: linear_cross_entropy(h, w, y, ignore_index=-100, impl=impl)
    except ImportError:
        pass
    if device == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
            fns["Liger γ=0"] = lambda h, w: liger(w, h, y)
        except ImportError:
            pass
    return fns


TORCH_STEP = r'''
import gc, sys, torch
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[6])
from benchmark_linear import inputs, torch_losses
impl, n, d, v, dtype = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[7]
h_np, w_np, y_np = inputs(n, d, v)
h = torch.from_numpy(h_np).to(getattr(torch, dtype)).requires_grad_()
w = torch.from_numpy(w_np).to(getattr(torch, dtype)).requires_grad_()
del h_np, w_np
loss_fn = torch_losses(torch.from_numpy(y_np), "cpu")[impl]


def step():
    loss_fn(h, w).backward()


def status(key):  # kB, from /proc/self/status
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


step()  # warm-up: thread pools and the allocator's first growth are not the loss's
h.grad = w.grad = None  # the measured step returns fresh gradients: counted, then subtracted below
gc.collect()
with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the resident set now
    f.write("5")
before = status("VmRSS:")
step()
grads = sum(t.grad.numel() * t.grad.element_size() for t in (h, w))
print((status("VmHWM:") - before) * 1024 - grads)
'''


def _cpu_memory(name: str, n: int, d: int, v: int, dtype: str) -> int:
    """Bytes one step of ``name`` holds beyond its inputs and returned gradients, in a fresh process (-1 if it
    failed)."""
    proc = subprocess.run([sys.executable, "-c", TORCH_STEP, str(ROOT), name, str(n), str(d), str(v),
                           str(pathlib.Path(__file__).resolve().parent), dtype], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))
    return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else -1


def torch_rows(n: int, d: int, v: int, rounds: int, device: str = "cpu", dtype: str = "float32",
               memory: bool = True) -> tuple[list[dict], list[str]]:
    """The PyTorch rows of one case and the mismatches found (``memory=False``: no memory measured, -1)."""
    import torch

    h_np, w_np, y_np = inputs(n, d, v)
    y = torch.from_numpy(y_np).to(device)
    tdtype = getattr(torch, dtype)
    h0 = torch.from_numpy(h_np).to(device=device, dtype=tdtype)
    w0 = torch.from_numpy(w_np).to(device=device, dtype=tdtype)
    del h_np, w_np
    fns = torch_losses(y, device)
    cuda = device == "cuda"

    def run(f, memory: bool = False):
        h, w = h0.detach().requires_grad_(), w0.detach().requires_grad_()
        if memory:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        loss = f(h, w)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        if memory:
            grads = sum(t.grad.numel() * t.grad.element_size() for t in (h, w))
            return torch.cuda.max_memory_allocated() - before - grads
        return loss.detach().float(), h.grad.float(), w.grad.float()

    for f in fns.values():  # the warm-up (a compiled peer compiles here)
        run(f)
    errors = []
    # one pair's results at a time: at the GPU size each float32 ∂weight takes 2 GiB
    for ours, other in [("fused", "unfused")] + [("fused γ=0", k) for k in fns if k.startswith(("CCE", "Liger"))]:
        a, b = ([t.cpu() for t in run(fns[name])] for name in (ours, other))
        errors += [e for e in (_close(a[i], b[i], f"torch {what} {other}", RTOL[dtype])
                               for i, what in enumerate(("value", "d hidden", "d weight"))) if e]
        del a, b
    times = dict.fromkeys(fns, float("inf"))
    for r in range(rounds):
        names = list(fns)
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            run(fns[name])
            times[name] = min(times[name], time.perf_counter() - t)
    rows = []
    for name in fns:
        mem = -1 if not memory else run(fns[name], memory=True) if cuda else _cpu_memory(name, n, d, v, dtype)
        rows.append(dict(framework="torch", impl=name, n=n, d=d, v=v, dtype=dtype, device=device,
                         seconds=times[name], memory_bytes=mem,
                         memory_kind=("peak of the device's allocator over the step's start" if cuda else
                                      "peak RSS over the RSS before the step") + ", less the returned gradients"))
    return rows, errors


# ----------------------------------------------------------------------------------------
# Targets and the command line.
# ----------------------------------------------------------------------------------------


def targets(rows: list[dict]) -> list[dict]:
    """One line per (case, framework, target), with the measured ratio and MET or MISSED."""
    out = []
    keys = sorted({(r["framework"], r["n"], r["d"], r["v"]) for r in rows})
    for fw, n, d, v in keys:
        by = {r["impl"]: r for r in rows if (r["framework"], r["n"], r["d"], r["v"]) == (fw, n, d, v)}
        if "fused" not in by:
            continue
        f = by["fused"]
        logits = np.dtype(ITEMSIZE_OF.get(f.get("dtype", "float32"), "float32")).itemsize * n * v
        checks = [("memory <= 1/8 of the logits' bytes", f["memory_bytes"] / logits, MEMORY_TARGET),
                  ("time <= 1.15x unfused softmax_focal_loss", f["seconds"] / by["unfused"]["seconds"],
                   TIME_TARGET_UNFUSED),
                  ("time <= 1.3x framework CE", f["seconds"] / by["framework CE"]["seconds"], TIME_TARGET_CE)]
        for what, ratio, limit in checks:
            out.append(dict(framework=fw, n=n, d=d, v=v, target=what, ratio=ratio, limit=limit,
                            status="MET" if 0 <= ratio <= limit else "MISSED"))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 rounds: a check that it runs")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5, quick 2)")
    parser.add_argument("--only", choices=("jax", "torch"), default=None, help="one framework only")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write rows and targets as JSON")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: the CPU cases; cuda: (8192, 4096, 128256) in bfloat16 on the GPU")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="the hidden states' and the weight's dtype (default float32 on cpu, bfloat16 on cuda)")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.device == "cuda" and args.only != "jax":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
    return args


def run(args: argparse.Namespace) -> list[dict]:
    """Every row (framework, impl, n, d, v, seconds, memory_bytes) of the run. Raises SystemExit(1) when the
    fused loss does not match the unfused one."""
    if args.device == "cuda":
        cases = CUDA_QUICK_CASES if args.quick else CUDA_CASES
    else:
        cases = QUICK_CASES if args.quick else CASES
    rounds = args.rounds or (2 if args.quick else 5)
    rows: list[dict] = []
    errors: list[str] = []
    for n, d, v in cases:
        for fw, fn in (("jax", jax_rows), ("torch", torch_rows)):
            if args.only in (None, fw):
                r, e = fn(n, d, v, rounds, args.device, args.dtype)
                rows += r
                errors += [f"({n}, {d}, {v}) {x}" for x in e]
    if errors:
        print("\n".join(["MISMATCH " + e for e in errors]), file=sys.stderr)
        raise SystemExit(1)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rows = run(args)
    print(f"device {args.device}, dtype {args.dtype}")
    print(f"{'framework':9} {'(N, D, V)':>20} {'impl':>24} {'ms':>9} {'MiB':>9}")
    for r in rows:
        print(f"{r['framework']:9} {str((r['n'], r['d'], r['v'])):>20} {r['impl']:>24} {1e3 * r['seconds']:9.1f} "
              f"{r['memory_bytes'] / 2**20:9.1f}")
    tg = targets(rows)
    for t in tg:
        print(f"{t['status']:6} {t['framework']:5} {str((t['n'], t['d'], t['v'])):>20} {t['target']}: "
              f"{t['ratio']:.3f} (limit {t['limit']:.3f})")
    result = dict(rows=rows, targets=tg)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
