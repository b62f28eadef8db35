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

Run:
  python examples/benchmark_linear.py [--quick] [--json PATH] [--rounds N] [--only jax|torch]
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


def _close(a: Any, e: Any, what: str, rtol: float = 2e-4) -> str | None:
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    err = float(np.max(np.abs(a - e))) if a.size else 0.0
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    return None if err <= rtol * scale + 1e-30 else f"{what}: max |error| {err:.3g} > {rtol:g} x {scale:.3g}"


# ----------------------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------------------


def jax_rows(n: int, d: int, v: int, rounds: int) -> tuple[list[dict], list[str]]:
    import jax
    import jax.numpy as jnp
    import optax

    import focal_jax

    h_np, w_np, y_np = inputs(n, d, v)
    h, w, y = jnp.asarray(h_np), jnp.asarray(w_np), jnp.asarray(y_np)
    counted = y != -100
    fns = {
        "fused": lambda h, w: focal_jax.linear_softmax_focal_loss(h, w, y, gamma=GAMMA),
        "unfused": lambda h, w: focal_jax.softmax_focal_loss(h @ w.T, y, gamma=GAMMA),
        "framework CE": lambda h, w: jnp.sum(jnp.where(counted, optax.softmax_cross_entropy_with_integer_labels(
            h @ w.T, jnp.maximum(y, 0)), 0.0)) / jnp.sum(counted),
    }
    compiled, memory = {}, {}
    for name, f in fns.items():
        c = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(h, w).compile()
        compiled[name] = c
        memory[name] = int(c.memory_analysis().temp_size_in_bytes)
    (va, ga), (ve, ge) = compiled["fused"](h, w), compiled["unfused"](h, w)
    errors = [e for e in (_close(va, ve, "jax value"), _close(ga[0], ge[0], "jax d hidden"),
                          _close(ga[1], ge[1], "jax d weight")) if e]
    times = dict.fromkeys(fns, float("inf"))
    for r in range(rounds):
        names = list(fns)
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            jax.block_until_ready(compiled[name](h, w))
            times[name] = min(times[name], time.perf_counter() - t)
    return [dict(framework="jax", impl=k, n=n, d=d, v=v, seconds=times[k], memory_bytes=memory[k],
                 memory_kind="compiled temp bytes") for k in fns], errors


# ----------------------------------------------------------------------------------------
# PyTorch
# ----------------------------------------------------------------------------------------

TORCH_STEP = r'''
import sys, numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
import focal_torch
impl, n, d, v = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, sys.argv[6])
from benchmark_linear import inputs, GAMMA
torch.set_num_threads(max(torch.get_num_threads(), 1))
h_np, w_np, y_np = inputs(n, d, v)
h = torch.from_numpy(h_np).requires_grad_(); w = torch.from_numpy(w_np).requires_grad_()
y = torch.from_numpy(y_np)
def step():
    if impl == "fused":
        loss = focal_torch.linear_softmax_focal_loss(h, w, y, gamma=GAMMA)
    elif impl == "unfused":
        loss = focal_torch.softmax_focal_loss(h @ w.T, y, gamma=GAMMA)
    else:
        loss = F.cross_entropy(h @ w.T, y)
    loss.backward()
import gc


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


def torch_rows(n: int, d: int, v: int, rounds: int) -> tuple[list[dict], list[str]]:
    import torch
    import torch.nn.functional as F

    import focal_torch

    h_np, w_np, y_np = inputs(n, d, v)
    y = torch.from_numpy(y_np)
    has_fused = hasattr(focal_torch, "linear_softmax_focal_loss")
    fns = {
        "unfused": lambda h, w: focal_torch.softmax_focal_loss(h @ w.T, y, gamma=GAMMA),
        "framework CE": lambda h, w: F.cross_entropy(h @ w.T, y),
    }
    if has_fused:
        fns = {"fused": lambda h, w: focal_torch.linear_softmax_focal_loss(h, w, y, gamma=GAMMA), **fns}

    def run(f):
        h = torch.from_numpy(h_np).requires_grad_()
        w = torch.from_numpy(w_np).requires_grad_()
        loss = f(h, w)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    errors = []
    if has_fused:
        (va, ha, wa), (ve, he, we) = run(fns["fused"]), run(fns["unfused"])
        errors = [e for e in (_close(va, ve, "torch value"), _close(ha, he, "torch d hidden"),
                              _close(wa, we, "torch d weight")) if e]
    times = dict.fromkeys(fns, float("inf"))
    for r in range(rounds):
        names = list(fns)
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            run(fns[name])
            times[name] = min(times[name], time.perf_counter() - t)
    rows = []
    for name in fns:
        proc = subprocess.run([sys.executable, "-c", TORCH_STEP, str(ROOT), name, str(n), str(d), str(v),
                               str(pathlib.Path(__file__).resolve().parent)], capture_output=True, text=True,
                              timeout=600, env=dict(os.environ))
        mem = int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else -1
        rows.append(dict(framework="torch", impl=name, n=n, d=d, v=v, seconds=times[name], memory_bytes=mem,
                         memory_kind="peak RSS over the RSS before the step, less the returned gradients"))
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
        logits = 4 * n * v
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
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    """Every row (framework, impl, n, d, v, seconds, memory_bytes) of the run. Raises SystemExit(1) when the
    fused loss does not match the unfused one."""
    cases = QUICK_CASES if args.quick else CASES
    rounds = args.rounds or (2 if args.quick else 5)
    rows: list[dict] = []
    errors: list[str] = []
    for n, d, v in cases:
        for fw, fn in (("jax", jax_rows), ("torch", torch_rows)):
            if args.only in (None, fw):
                r, e = fn(n, d, v, rounds)
                rows += r
                errors += [f"({n}, {d}, {v}) {x}" for x in e]
    if errors:
        print("\n".join(["MISMATCH " + e for e in errors]), file=sys.stderr)
        raise SystemExit(1)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rows = run(args)
    print(f"{'framework':9} {'(N, D, V)':>20} {'impl':>13} {'ms':>9} {'MiB':>9}")
    for r in rows:
        print(f"{r['framework']:9} {str((r['n'], r['d'], r['v'])):>20} {r['impl']:>13} {1e3 * r['seconds']:9.1f} "
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
