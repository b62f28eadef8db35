"""Forward plus backward of a mean-reduced focal loss, timed against its peers in one process.

Every case draws one set of float32 logits (hard 0/1 targets for sigmoid, integer labels for
softmax) and feeds the same values to each implementation: ours, the peers' focal losses and the
framework's own cross-entropy. Before timing, the script checks that implementations with equal
semantics agree in value and gradient (ours with γ=0 against the cross-entropy, ours against the
peer focal losses with the same γ and α, JAX against PyTorch). Each implementation is warmed up,
then the implementations of a case run in turn, repeat after repeat, and the median is kept.

Memory is counted deterministically: for JAX the compiled temporaries of the jitted
``value_and_grad`` (``memory_analysis().temp_size_in_bytes``), for PyTorch the bytes that autograd
keeps for backward (every tensor packed through ``torch.autograd.graph.saved_tensors_hooks``,
counted once per storage).

The final section checks the performance targets of the project (ratios within one run). With
``--quick`` the sizes are tiny: the run is a correctness smoke test, and the targets are printed
but are not a timing gate.

Run:  python examples/benchmark.py [--quick] [--json results.json] [--repeats N] [--only jax|torch]

Reference: T.-Y. Lin, P. Goyal, R. Girshick, K. He, P. Dollár, "Focal Loss for Dense Object
Detection", ICCV 2017, arXiv:1708.02002.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

GAMMA = 2.0
ALPHA = 0.25
SEED = 0
POSITIVE_RATE = 0.5

# Case id -> (kind, full-size logits shape, quick logits shape). Softmax shapes are channels-first,
# (N, C, ...), as PyTorch takes them; the JAX side gets the same values with the class axis last.
CASES: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {
    "sigmoid-2^20": ("sigmoid", (1024, 1024), (64, 64)),
    "sigmoid-2^23": ("sigmoid", (8192, 1024), (128, 128)),
    "softmax-segmentation": ("softmax", (8, 21, 128, 128), (2, 5, 16, 16)),
    "softmax-1000-classes": ("softmax", (4096, 1000), (64, 100)),
}

# Implementation names per backend and kind. The role says which column a ratio is taken against.
CE, PEER, OURS, OTHER = "ce", "peer", "ours", "other"
IMPLS: dict[tuple[str, str], dict[str, str]] = {
    ("jax", "sigmoid"): {
        "ours": OURS,
        "optax.sigmoid_focal_loss": PEER,
        "optax.sigmoid_binary_cross_entropy": CE,
    },
    ("jax", "softmax"): {
        "ours": OURS,
        "optax.softmax_cross_entropy_with_integer_labels": CE,
    },
    ("torch", "sigmoid"): {
        "ours": OURS,
        "torchvision formula": PEER,
        "kornia.binary_focal_loss_with_logits": OTHER,
        "F.binary_cross_entropy_with_logits": CE,
    },
    ("torch", "softmax"): {
        "ours": OURS,
        "kornia.focal_loss": PEER,
        "F.cross_entropy": CE,
    },
}

# Agreement of implementations with equal semantics: max |a - b| / max |b|, for the value and the gradient.
CHECK_RTOL = 1e-4

# Targets: (backend, kind, what, comparison impl role, limit). "time" is a ratio of medians, "memory"
# compares bytes (JAX temporaries against the cross-entropy's; torch sigmoid against 2 input-sized arrays).
TARGETS = (
    ("jax", "sigmoid", "time", CE, 1.3),
    ("jax", "sigmoid", "time", PEER, 0.4),
    ("jax", "sigmoid", "memory", CE, 1.0),
    ("torch", "sigmoid", "time", CE, 2.0),
    ("torch", "sigmoid", "time", PEER, 0.35),
    ("torch", "sigmoid", "memory", "2 inputs", 2.0),
    ("jax", "softmax", "time", CE, 1.25),
    ("jax", "softmax", "memory", CE, 1.0),
    ("torch", "softmax", "time", CE, 1.25),
    ("torch", "softmax", "memory", CE, 1.0),
)


class CheckFailed(AssertionError):
    """Two implementations that should agree do not: their timings would compare different things."""


class Impl:
    """One implementation of one case, ready to run: ``run()`` does forward plus backward and waits."""

    def __init__(self, backend: str, case: str, name: str, role: str, run: Callable[[], Any],
                 memory_bytes: int, memory_kind: str) -> None:
        self.backend, self.case, self.name, self.role, self.run = backend, case, name, role, run
        self.memory_bytes, self.memory_kind = memory_bytes, memory_kind
        self.times_ms: list[float] = []


def make_inputs(kind: str, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 logits and either hard 0/1 float32 targets (sigmoid) or int64 labels (softmax, class dim 1)."""
    rng = np.random.default_rng(seed)
    logits = (2.0 * rng.standard_normal(shape)).astype(np.float32)
    if kind == "sigmoid":
        targets = (rng.random(shape) < POSITIVE_RATE).astype(np.float32)
    else:
        targets = rng.integers(0, shape[1], size=(shape[0],) + shape[2:], dtype=np.int64)
    return logits, targets


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.shape != b64.shape:
        raise CheckFailed(f"shapes differ: {a64.shape} vs {b64.shape}")
    scale = max(float(np.max(np.abs(b64))), np.finfo(np.float32).tiny)
    return float(np.max(np.abs(a64 - b64))) / scale


def record_check(checks: list[dict], backend: str, case: str, name: str,
                 ours: tuple[Any, np.ndarray], ref: tuple[Any, np.ndarray], scale: float = 1.0) -> None:
    """Compares (value, gradient) pairs; ``scale`` multiplies the reference (a peer with another normalization)."""
    value_err = rel_err(np.asarray(float(ours[0])), np.asarray(scale * float(ref[0])))
    grad_err = rel_err(ours[1], scale * np.asarray(ref[1], np.float64))
    finite = math.isfinite(float(ours[0])) and bool(np.all(np.isfinite(ours[1])))
    passed = finite and value_err <= CHECK_RTOL and grad_err <= CHECK_RTOL
    checks.append({"backend": backend, "case": case, "check": name, "value": float(ours[0]),
                   "reference": scale * float(ref[0]), "value_rel_err": value_err,
                   "grad_rel_err": grad_err, "rtol": CHECK_RTOL, "passed": passed})
    status = "ok" if passed else "FAILED"
    print(f"  check {backend:5s} {case:22s} {name:66s} value {value_err:.1e} grad {grad_err:.1e}  {status}",
          flush=True)
    if not passed:
        raise CheckFailed(f"{backend} {case}: {name}: value rel err {value_err:.2e}, grad rel err {grad_err:.2e} "
                          f"(rtol {CHECK_RTOL:g}, finite={finite})")


# ------------------------------------------------------------------------------------------------
# JAX
# ------------------------------------------------------------------------------------------------


def jax_case(case: str, kind: str, logits: np.ndarray, targets: np.ndarray,
             checks: list[dict]) -> tuple[list[Impl], dict[str, tuple[float, np.ndarray]]]:
    import jax
    import jax.numpy as jnp
    import optax

    import focal_jax

    if kind == "sigmoid":
        x, t = jnp.asarray(logits), jnp.asarray(targets)
        losses = {
            "ours": lambda x, t: focal_jax.sigmoid_focal_loss(x, t, gamma=GAMMA, alpha=ALPHA),
            "optax.sigmoid_focal_loss": lambda x, t: optax.sigmoid_focal_loss(x, t, alpha=ALPHA, gamma=GAMMA).mean(),
            "optax.sigmoid_binary_cross_entropy": lambda x, t: optax.sigmoid_binary_cross_entropy(x, t).mean(),
        }
        ours_gamma0 = lambda x, t: focal_jax.sigmoid_focal_loss(x, t, gamma=0.0, alpha=None)
    else:
        x = jnp.asarray(np.ascontiguousarray(np.moveaxis(logits, 1, -1)))  # channels-last
        t = jnp.asarray(targets.astype(np.int32))
        losses = {
            "ours": lambda x, y: focal_jax.softmax_focal_loss(x, y, gamma=GAMMA),
            "optax.softmax_cross_entropy_with_integer_labels":
                lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean(),
        }
        ours_gamma0 = lambda x, y: focal_jax.softmax_focal_loss(x, y, gamma=0.0)

    def compile_vg(fn):
        return jax.jit(jax.value_and_grad(fn)).lower(x, t).compile()

    def evaluate(compiled) -> tuple[float, np.ndarray]:
        value, grad = compiled(x, t)
        grad = np.asarray(grad)
        if kind == "softmax":
            grad = np.moveaxis(grad, -1, 1)  # back to the shared (N, C, ...) layout
        return float(value), grad

    compiled = {name: compile_vg(fn) for name, fn in losses.items()}
    results = {name: evaluate(c) for name, c in compiled.items()}

    # Correctness of what is timed.
    roles = IMPLS[("jax", kind)]
    ce_name = next(n for n, r in roles.items() if r == CE)
    record_check(checks, "jax", case, f"ours(gamma=0{', alpha=None' if kind == 'sigmoid' else ''}) vs {ce_name}",
                 evaluate(compile_vg(ours_gamma0)), results[ce_name])
    if kind == "sigmoid":
        record_check(checks, "jax", case, "ours vs optax.sigmoid_focal_loss", results["ours"],
                     results["optax.sigmoid_focal_loss"])

    impls = []
    for name, c in compiled.items():
        memory = c.memory_analysis()
        temp = int(memory.temp_size_in_bytes) if memory is not None else -1
        impls.append(Impl("jax", case, name, roles[name],
                          run=lambda c=c: jax.block_until_ready(c(x, t)),
                          memory_bytes=temp, memory_kind="temp_size_in_bytes"))
    return impls, {"ours": results["ours"]}


# ------------------------------------------------------------------------------------------------
# PyTorch
# ------------------------------------------------------------------------------------------------


def torchvision_style_focal(input, target, gamma: float = GAMMA, alpha: float = ALPHA):
    """The torchvision-style sigmoid focal loss, mean-reduced; ``torchvision.ops`` is used when importable."""
    try:
        from torchvision.ops import sigmoid_focal_loss
    except ImportError:
        pass
    else:
        return sigmoid_focal_loss(input, target, alpha=alpha, gamma=gamma, reduction="mean")
    import torch
    import torch.nn.functional as F

    prob = torch.sigmoid(input)
    bce = F.binary_cross_entropy_with_logits(input, target, reduction="none")
    prob_true = target * prob + (1 - target) * (1 - prob)
    out = bce * (1 - prob_true) ** gamma
    out = (alpha * target + (1 - alpha) * (1 - target)) * out
    return out.mean()


def saved_for_backward_bytes(loss_fn: Callable[[], Any]) -> int:
    """Bytes autograd keeps for backward: every packed tensor, counted once per storage."""
    import torch

    storages: dict[int, int] = {}

    def pack(tensor):
        try:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):  # no plain storage (e.g. a tensor subclass)
            storages[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    loss.backward()  # frees the graph
    return sum(storages.values())


def torch_case(case: str, kind: str, logits: np.ndarray, targets: np.ndarray,
               checks: list[dict]) -> tuple[list[Impl], dict[str, tuple[float, np.ndarray]]]:
    import torch
    import torch.nn.functional as F

    import focal_torch

    try:
        import kornia.losses
    except ImportError:
        kornia = None

    x = torch.from_numpy(logits).requires_grad_(True)
    t = torch.from_numpy(targets)
    roles = dict(IMPLS[("torch", kind)])
    if kind == "sigmoid":
        losses = {
            "ours": lambda: focal_torch.sigmoid_focal_loss(x, t, gamma=GAMMA, alpha=ALPHA),
            "torchvision formula": lambda: torchvision_style_focal(x, t),
            "kornia.binary_focal_loss_with_logits":
                lambda: kornia.losses.binary_focal_loss_with_logits(x, t, alpha=ALPHA, gamma=GAMMA, reduction="mean"),
            "F.binary_cross_entropy_with_logits": lambda: F.binary_cross_entropy_with_logits(x, t),
        }
        ours_gamma0 = lambda: focal_torch.sigmoid_focal_loss(x, t, gamma=0.0, alpha=None)
        kornia_name = "kornia.binary_focal_loss_with_logits"
        kornia_scale = 1.0
    else:
        losses = {
            "ours": lambda: focal_torch.softmax_focal_loss(x, t, gamma=GAMMA),
            "kornia.focal_loss": lambda: kornia.losses.focal_loss(x, t, alpha=None, gamma=GAMMA, reduction="mean"),
            "F.cross_entropy": lambda: F.cross_entropy(x, t),
        }
        ours_gamma0 = lambda: focal_torch.softmax_focal_loss(x, t, gamma=0.0)
        kornia_name = "kornia.focal_loss"
        kornia_scale = float(logits.shape[1])  # kornia's mean divides by C times the positions
    if kornia is None:
        losses.pop(kornia_name)
        roles.pop(kornia_name)

    def step(fn):
        loss = fn()
        (grad,) = torch.autograd.grad(loss, x)
        return loss, grad

    def evaluate(fn) -> tuple[float, np.ndarray]:
        loss, grad = step(fn)
        return float(loss.detach()), grad.numpy()

    results = {name: evaluate(fn) for name, fn in losses.items()}
    ce_name = next(n for n, r in roles.items() if r == CE)
    record_check(checks, "torch", case, f"ours(gamma=0{', alpha=None' if kind == 'sigmoid' else ''}) vs {ce_name}",
                 evaluate(ours_gamma0), results[ce_name])
    if kind == "sigmoid":
        record_check(checks, "torch", case, "ours vs torchvision formula", results["ours"],
                     results["torchvision formula"])
    if kornia_name in results:
        label = f"ours vs {kornia_name}" + (" x C" if kornia_scale != 1.0 else "")
        record_check(checks, "torch", case, label, results["ours"], results[kornia_name], scale=kornia_scale)

    impls = [Impl("torch", case, name, roles[name], run=lambda fn=fn: step(fn),
                  memory_bytes=saved_for_backward_bytes(fn), memory_kind="saved_for_backward_bytes")
             for name, fn in losses.items()]
    return impls, {"ours": results["ours"]}


# ------------------------------------------------------------------------------------------------
# Timing, table, targets
# ------------------------------------------------------------------------------------------------


def time_case(impls: list[Impl], repeats: int, warmup: int) -> None:
    """Warm-up, then the implementations in turn, repeat after repeat (drift hits all of them alike)."""
    for impl in impls:
        for _ in range(warmup):
            impl.run()
    for _ in range(repeats):
        for impl in impls:
            start = time.perf_counter()
            impl.run()
            impl.times_ms.append(1e3 * (time.perf_counter() - start))


def summarize(impls: list[Impl], shape: tuple[int, ...], kind: str) -> list[dict]:
    by_role = {impl.role: impl for impl in impls}
    ce, peer = by_role.get(CE), by_role.get(PEER)
    rows = []
    for impl in impls:
        median = statistics.median(impl.times_ms)
        rows.append({
            "backend": impl.backend, "case": impl.case, "kind": kind, "shape": list(shape), "impl": impl.name,
            "role": impl.role, "median_ms": median, "times_ms": impl.times_ms,
            "ratio_ce": median / statistics.median(ce.times_ms) if ce else None,
            "ratio_peer": median / statistics.median(peer.times_ms) if peer else None,
            "memory_kind": impl.memory_kind, "memory_bytes": impl.memory_bytes,
            "memory_ratio_ce": impl.memory_bytes / ce.memory_bytes if ce and ce.memory_bytes > 0 else None,
            "input_bytes": int(np.prod(shape)) * 4,
        })
    return rows


def check_targets(rows: list[dict], gate: bool) -> list[dict]:
    out = []
    for backend, kind, what, against, limit in TARGETS:
        for case in dict.fromkeys(r["case"] for r in rows if r["backend"] == backend and r["kind"] == kind):
            in_case = {r["role"]: r for r in rows if r["backend"] == backend and r["case"] == case}
            ours = in_case.get(OURS)
            if what == "memory" and against == "2 inputs":
                value = ours["memory_bytes"] / ours["input_bytes"]
                label = "saved for backward / input bytes"
            elif against not in in_case:
                continue
            elif what == "time":
                value = ours["median_ms"] / in_case[against]["median_ms"]
                label = f"time / {in_case[against]['impl']}"
            else:
                value = ours["memory_bytes"] / in_case[against]["memory_bytes"]
                label = f"memory / {in_case[against]['impl']}"
            out.append({"backend": backend, "case": case, "target": label, "value": value, "limit": limit,
                        "passed": value <= limit, "timing_gate": gate})
    return out


def format_bytes(n: int) -> str:
    return f"{n / 2**20:9.2f} MiB" if n >= 0 else "      n/a"


def ratio(value: float | None) -> str:
    return f"{value:6.2f}x" if value is not None else "      -"


def print_table(rows: list[dict]) -> None:
    header = (f"{'backend':7s} {'case':22s} {'shape':18s} {'impl':48s} {'median ms':>10s} {'vs CE':>7s} "
              f"{'vs peer':>7s} {'memory':>13s} {'mem vs CE':>9s}")
    print(header)
    print("-" * len(header))
    previous = None
    for r in rows:
        if previous is not None and (r["backend"], r["case"]) != previous:
            print()
        previous = (r["backend"], r["case"])
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['backend']:7s} {r['case']:22s} {shape:18s} {r['impl']:48s} {r['median_ms']:10.2f} "
              f"{ratio(r['ratio_ce'])} {ratio(r['ratio_peer'])} {format_bytes(r['memory_bytes'])} "
              f"{ratio(r['memory_ratio_ce']):>9s}")
    print("memory: JAX = compiled temporaries of jit(value_and_grad); torch = bytes saved for backward. "
          "peer: optax.sigmoid_focal_loss / torchvision formula / kornia.focal_loss")


def environment(only: str | None) -> dict:
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "numpy": np.__version__}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_available"] = len(os.sched_getaffinity(0))
    if only in (None, "jax"):
        import jax
        import optax

        info.update(jax=jax.__version__, optax=optax.__version__, jax_device=str(jax.devices()[0]))
    if only in (None, "torch"):
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        try:
            import kornia
        except ImportError:
            info["kornia"] = None
        else:
            info["kornia"] = kornia.__version__
        try:
            import torchvision
        except ImportError:
            info["torchvision"] = None
        else:
            info["torchvision"] = torchvision.__version__
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and 2 repeats: a correctness smoke test, not a timing gate")
    parser.add_argument("--json", "--out", dest="json", type=pathlib.Path, default=None,
                        help="write the results as JSON to this path")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per implementation "
                        "(default 15, quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 2, quick 1)")
    parser.add_argument("--only", choices=("jax", "torch"), default=None, help="run one backend only")
    parser.add_argument("--cases", nargs="+", choices=tuple(CASES), default=tuple(CASES), metavar="CASE",
                        help=f"cases to run (default all: {', '.join(CASES)})")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the random inputs (default %(default)s)")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if repeats < 1 or warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    backends = ("jax", "torch") if args.only is None else (args.only,)

    env = environment(args.only)
    print("focal loss benchmark: forward + backward of a mean-reduced loss, float32"
          + (" (--quick: tiny sizes, not a timing gate)" if args.quick else ""))
    print("  " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"  repeats={repeats} (median), warmup={warmup}, gamma={GAMMA}, alpha={ALPHA} (sigmoid), seed={args.seed}",
          flush=True)

    rows: list[dict] = []
    checks: list[dict] = []
    wall = time.perf_counter()
    for index, case in enumerate(args.cases):
        kind, full_shape, quick_shape = CASES[case]
        shape = quick_shape if args.quick else full_shape
        logits, targets = make_inputs(kind, shape, args.seed + index)
        ours_results = {}
        for backend in backends:
            started = time.perf_counter()
            build = jax_case if backend == "jax" else torch_case
            impls, ours_results[backend] = build(case, kind, logits, targets, checks)
            time_case(impls, repeats, warmup)
            case_rows = summarize(impls, shape, kind)
            rows.extend(case_rows)
            medians = ", ".join(f"{r['impl']} {r['median_ms']:.2f}" for r in case_rows)
            print(f"[{backend} {case} {'x'.join(map(str, shape))}] {time.perf_counter() - started:.1f}s: "
                  f"median ms: {medians}", flush=True)
        if len(ours_results) == 2:
            record_check(checks, "jax/torch", case, "ours: JAX vs PyTorch", ours_results["jax"]["ours"],
                         ours_results["torch"]["ours"])

    targets = check_targets(rows, gate=not args.quick)
    print()
    print_table(rows)
    print()
    print("targets" + (" (--quick: not a timing gate, reported only)" if args.quick else "") + ":")
    for target in targets:
        status = "PASS" if target["passed"] else "FAIL"
        print(f"  {status} {target['backend']:5s} {target['case']:22s} {target['target']:58s} "
              f"{target['value']:7.3f} <= {target['limit']:g}")
    failed = sum(not t["passed"] for t in targets)
    print(f"{len(targets) - failed}/{len(targets)} targets met; {len(checks)} correctness checks passed; "
          f"total {time.perf_counter() - wall:.0f}s", flush=True)

    result = {"environment": env, "quick": args.quick, "repeats": repeats, "warmup": warmup, "gamma": GAMMA,
              "alpha": ALPHA, "seed": args.seed, "rows": rows, "checks": checks, "targets": targets}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
