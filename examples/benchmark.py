"""Forward plus backward of a mean-reduced focal loss, timed against its peers in one process.

Each case draws one set of float32 logits (hard 0/1 float32 targets for sigmoid, integer labels for
softmax) and gives the same values to every implementation of the case:

- PyTorch: ours (``focal_torch``), ``F.binary_cross_entropy_with_logits`` / ``F.cross_entropy``, the
  torchvision sigmoid focal formula and the naive log-softmax/gather softmax formula (both written out
  here), kornia's ``binary_focal_loss_with_logits`` / ``focal_loss`` when kornia imports, and a
  ``copy_`` of the logits as the bandwidth yardstick.
- JAX: ours (``focal_jax``), ``optax.sigmoid_binary_cross_entropy`` /
  ``optax.softmax_cross_entropy_with_integer_labels`` (mean), ``optax.sigmoid_focal_loss``, the naive
  softmax formula, and a jitted copy.
- Focal family cases, in both frameworks: ours (``asymmetric_loss`` on multi-hot targets,
  ``quality_focal_loss`` on soft IoU-like targets) against the formula as timm (ASL) or mmdetection
  (QFL) writes it, written out here, and the binary cross-entropy; their targets hold in both.

Before timing, implementations with equal semantics are compared in value and gradient: ours with the
float64 reference of ``focal_spec`` (where it is affordable), ours with every focal peer, ours at γ=0 with
the framework's cross-entropy, and JAX with PyTorch. A mismatch makes the run exit with status 1.

Timing: after a warm-up, every implementation of a case and framework is timed once per round, in a
rotating order, for ``--rounds`` interleaved rounds, so that drift of a shared machine hits all of them
alike (PyTorch's rounds, then JAX's: their thread pools would compete). One timing runs enough calls to
last ``--min-timing-ms`` and is divided by their number, so small inputs are timed per call above the
timer's resolution. A ratio is the implementation's minimum over rounds divided by the minimum of its
framework's cross-entropy; medians are reported next to minima.

Bandwidth: an autograd loss reads its inputs in the forward pass, reads them again in the backward pass
and writes the gradient, so its minimal traffic is 2 x (logits + targets) + gradient bytes. That traffic
divided by the time is compared with the bandwidth of a device-to-device copy of the logits (bytes read
plus written) measured in the same rounds.

Memory: bytes autograd saves for backward (PyTorch, every packed tensor counted once per storage) and
the compiled temporaries of the jitted ``value_and_grad`` (JAX, ``temp_size_in_bytes``).

Paths: each row of ours names the code that served it: "eager" (focal_torch's ATen kernels), "jit" (JAX), or
"fallback: <warning>" where the library warned that it gave up its own path; a fallback in a timed case is
printed in capitals after the table.

First calls: a fresh Python process (empty inductor cache) times each torch loss's first call on each size (the
median over the case's size and two more new ones) against its later calls (``--no-first-call`` skips it), after
ten calls of each loss on a size of its own (a code path's first executions in a process cost more, once:
``WARM_CALLS``) and two on a neighbouring size right before. Nothing is compiled behind a call, so the first call
on a size costs no more than a few later ones.

Machine: the header and ``--json`` record the CPU model, the core and thread counts, the versions of Python,
NumPy, torch, kornia, jax and optax, and the vector ISA each framework runs (torch's ATen dispatch level;
XLA's CPU compiler targets the host's features unless ``--xla_cpu_max_isa`` caps them).

Run:
  python examples/benchmark.py                        # CPU cases and targets (a few minutes on 2 cores)
  python examples/benchmark.py --device cuda          # 2^24 and 2^28 elements on a GPU
  python examples/benchmark.py --smoke                # tiny sizes, CPU and GPU case lists: correctness only
  options: --json PATH, --markdown PATH, --rounds N, --only torch|jax, --cases ID ..., --sizes tiny, --suite cpu|gpu|all

Reference: T.-Y. Lin, P. Goyal, R. Girshick, K. He, P. Dollár, "Focal Loss for Dense Object
Detection", ICCV 2017, arXiv:1708.02002.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

GAMMA = 2.0
ALPHA = 0.25  # sigmoid cases: RetinaNet's class balance, given to every sigmoid focal implementation
SEED = 0
POSITIVE_RATE = 0.5
# Focal family cases: "asl" (asymmetric loss, Case.gamma is its γ₋) and "qfl" (quality focal loss, Case.gamma
# is its β), float32 logits as above and float32 targets of their own kind.
ASL_GAMMA_POS, ASL_CLIP = 0.0, 0.05  # the asymmetric loss's defaults (with γ₋ = 4)
ASL_EPS = 1e-8  # timm clamps probabilities at this before its logarithms
ASL_POSITIVE_RATE = 0.01  # multi-hot targets: about 1% of the (image, class) pairs are positive
QFL_POSITIVE_RATE = 0.01  # soft targets: 0, but an IoU-like score in QFL_SCORES at about 1% of the elements
QFL_SCORES = (0.1, 1.0)


class Case(NamedTuple):
    """One benchmark case: ``shape`` is the full size, ``tiny`` the size of ``--sizes tiny`` / ``--smoke``."""

    id: str
    kind: str  # "sigmoid" or "softmax" (or a focal family loss: "asl", "qfl")
    shape: tuple[int, ...]  # softmax: (N, C, ...), class dim 1 as PyTorch takes it
    tiny: tuple[int, ...]
    gamma: float = GAMMA
    suite: str = "cpu"


CASES: tuple[Case, ...] = (
    Case("sigmoid-8x4-g2", "sigmoid", (8, 4), (8, 4)),
    Case("sigmoid-256x80-g2", "sigmoid", (256, 80), (16, 8)),
    Case("sigmoid-1024x1024-g2", "sigmoid", (1024, 1024), (32, 32)),
    Case("sigmoid-8192x1024-g2", "sigmoid", (8192, 1024), (64, 64)),
    Case("softmax-8x4-g2", "softmax", (8, 4), (8, 4)),
    Case("softmax-256x10-g2", "softmax", (256, 10), (16, 10)),
    Case("softmax-8x21x128x128-g2", "softmax", (8, 21, 128, 128), (2, 5, 8, 8)),
    Case("softmax-8x21x128x128-g0.5", "softmax", (8, 21, 128, 128), (2, 5, 8, 8), gamma=0.5),
    Case("softmax-4096x1000-g2", "softmax", (4096, 1000), (16, 100)),
    Case("softmax-4096x1000-g0.5", "softmax", (4096, 1000), (16, 100), gamma=0.5),
    Case("asl-256x9605-g4", "asl", (256, 9605), (16, 96), gamma=4.0),  # Open Images' 9605 classes
    Case("qfl-8192x1024-b2", "qfl", (8192, 1024), (64, 64), gamma=2.0),  # 2^23 scores, as a RetinaNet head
    # Accelerator sizes: 2^24 and 2^28 elements.
    Case("sigmoid-16384x1024-g2", "sigmoid", (16384, 1024), (32, 64), suite="gpu"),
    Case("sigmoid-262144x1024-g2", "sigmoid", (262144, 1024), (64, 64), suite="gpu"),
    Case("softmax-16384x1024-g2", "softmax", (16384, 1024), (16, 128), suite="gpu"),
    Case("softmax-262144x1024-g2", "softmax", (262144, 1024), (32, 128), suite="gpu"),
)
CASE_BY_ID = {case.id: case for case in CASES}

# Roles: a ratio is taken against the framework's cross-entropy (CE); "best peer" is the fastest PEER.
OURS, CE, PEER, COPY = "ours", "ce", "peer", "copy"
TORCH_CE = {"sigmoid": "F.binary_cross_entropy_with_logits", "softmax": "F.cross_entropy"}
JAX_CE = {"sigmoid": "optax.sigmoid_binary_cross_entropy", "softmax": "optax.softmax_cross_entropy_with_integer_labels"}
NAIVE = "naive formula"
TORCHVISION = "torchvision formula"
KORNIA = {"sigmoid": "kornia.binary_focal_loss_with_logits", "softmax": "kornia.focal_loss"}
BEST_PEER = "fastest peer"  # a target against whichever focal peer of the case was fastest
TIMM_ASL = "timm ASL formula"
MMDET_QFL = "mmdet QFL formula"
for _kind in ("asl", "qfl"):  # the family's cross-entropy is the binary one
    TORCH_CE[_kind], JAX_CE[_kind] = TORCH_CE["sigmoid"], JAX_CE["sigmoid"]
# What "ours" is compared with the framework's cross-entropy at: the exponents that make it that.
GAMMA0_LABEL = {"sigmoid": "gamma=0, alpha=None", "softmax": "gamma=0", "asl": "gamma_pos=gamma_neg=0, clip=0",
                "qfl": "beta=0"}


class Target(NamedTuple):
    """ours / ``against`` (ratio of minimum times in ``backend``, CPU suite at full size) must be <= ``limit``
    (< ``limit`` when ``strict``)."""

    case: str
    against: str
    limit: float
    strict: bool = False
    backend: str = "torch"


SMALL = ("sigmoid-8x4-g2", "softmax-8x4-g2")  # per call: the Python layers dominate
TARGETS: tuple[Target, ...] = (
    # softmax with integer labels against F.cross_entropy
    *(Target(f"softmax-8x21x128x128-g{g}", "F.cross_entropy", 1.3) for g in ("2", "0.5")),
    *(Target(f"softmax-4096x1000-g{g}", "F.cross_entropy", 1.2) for g in ("2", "0.5")),
    # sigmoid against F.binary_cross_entropy_with_logits
    Target("sigmoid-8192x1024-g2", "F.binary_cross_entropy_with_logits", 0.8),
    Target("sigmoid-1024x1024-g2", "F.binary_cross_entropy_with_logits", 1.5),
    # small inputs against the framework's own loss
    Target("sigmoid-256x80-g2", "F.binary_cross_entropy_with_logits", 2.5),
    Target("softmax-256x10-g2", "F.cross_entropy", 2.5),
    Target("sigmoid-8x4-g2", "F.binary_cross_entropy_with_logits", 3.0),
    Target("softmax-8x4-g2", "F.cross_entropy", 3.0),
    # every torch case: no slower than the fastest focal peer formula (torchvision, naive gather, kornia)
    *(Target(case.id, BEST_PEER, 1.0) for case in CASES if case.suite == "cpu" and case.kind in ("sigmoid", "softmax")),
    # the focal family: no slower than the formula as its reference implementation writes it, in both frameworks
    *(Target(case, peer, 1.0, backend=backend) for case, peer in (("asl-256x9605-g4", TIMM_ASL),
                                                                    ("qfl-8192x1024-b2", MMDET_QFL))
      for backend in ("torch", "jax")),
    # JAX: the integer-label softmax against optax's cross-entropy
    *(Target(f"softmax-4096x1000-g{g}", JAX_CE["softmax"], 1.1, backend="jax") for g in ("2", "0.5")),
)
FIRST_CALL_LIMIT = 3.0
"""The first call of a loss on a new size (fresh process, empty inductor cache) against its later calls."""
WARM_CALLS = 10
"""Calls of each loss on a size of its own before the first-call row. A code path's first executions in a process
cost more whatever size they run on: torch's first use of each ATen operation, and CPython, which specialises a
function's bytecode only after its first 8 calls. Measured on 2 cores, the (8, 4) softmax's first call on a new
size took 3.6x its later calls after 1 warm-up call, 2.6x after 10, and 1.6-1.7x on the sizes after that (the spec's
validation of a new size, about 50 us, is in it). A kernel compiled per size would show on every case's first call
whatever the warm-up."""

# Agreement of two float32 implementations with equal semantics, or of ours with the float64 reference:
# max |a - b| / max |b|, for the value and for the gradient (the float32 rtol of the parity suite). Measured
# disagreements stay near 1e-6 up to 2^23 elements; a dropped factor, a sign or a wrong γ is far above it.
CHECK_RTOL = 1e-5
# The float64 reference runs where its cost (elements, times C for softmax) is at most this.
REFERENCE_MAX_WORK = 2**22
MAX_CALLS = 100_000


class Impl:
    """One implementation of one case: ``run()`` does one forward plus backward; ``sync()`` waits for the device."""

    def __init__(self, backend: str, name: str, role: str, run: Callable[[], Any], sync: Callable[[], None],
                 traffic_bytes: int, memory_bytes: int | None, memory_kind: str, path: str = "") -> None:
        self.backend, self.name, self.role, self.run, self.sync = backend, name, role, run, sync
        self.traffic_bytes, self.memory_bytes, self.memory_kind = traffic_bytes, memory_bytes, memory_kind
        self.path = path  # ours: which code served it ("eager", "jit", or "fallback: <warning>")
        self.calls = 1
        self.times_s: list[float] = []  # per call, one entry per round


# ------------------------------------------------------------------------------------------------
# Inputs and correctness checks
# ------------------------------------------------------------------------------------------------


def make_inputs(kind: str, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 logits and either hard 0/1 float32 targets (sigmoid) or int64 labels (softmax, class dim 1)."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(shape, dtype=np.float32)
    logits *= 2.0
    if kind == "asl":  # multi-hot
        return logits, (rng.random(shape, dtype=np.float32) < ASL_POSITIVE_RATE).astype(np.float32)
    if kind == "qfl":  # mostly 0, an IoU-like score here and there
        scores = rng.uniform(*QFL_SCORES, size=shape).astype(np.float32)
        return logits, np.where(rng.random(shape, dtype=np.float32) < QFL_POSITIVE_RATE, scores, np.float32(0.0))
    if kind == "sigmoid":
        targets = (rng.random(shape, dtype=np.float32) < POSITIVE_RATE).astype(np.float32)
    else:
        targets = rng.integers(0, shape[1], size=(shape[0],) + shape[2:], dtype=np.int64)
    return logits, targets


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|, over chunks (float32 differences of close numbers are exact enough)."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    diff, scale = 0.0, 0.0
    step = 1 << 22
    for i in range(0, max(a.size, 1), step):
        pa, pb = a[i:i + step], b[i:i + step]
        if pa.size:
            piece_diff, piece_scale = float(np.max(np.abs(pa - pb))), float(np.max(np.abs(pb)))
            if math.isnan(piece_diff) or math.isnan(piece_scale):
                return math.inf  # NaN on either side is a mismatch (Python's max would drop it)
            diff, scale = max(diff, piece_diff), max(scale, piece_scale)
    return diff / max(scale, float(np.finfo(np.float32).tiny))


def compare_all(checks: list[dict], backend: str, case: str, results: dict, roles: dict, reference: Any,
                scales: dict | None = None) -> None:
    """Records ours against the float64 reference (when affordable) and against every peer with our semantics
    (``scales``: peers whose mean differs from ours by a constant factor)."""
    ours = results["ours"]
    if reference is not None:
        compare(checks, backend, case, "ours vs float64 reference", ours, reference)
    else:
        print(f"  check {backend:9s} {case:27s} ours vs float64 reference: skipped, too large for the NumPy reference")
    for name, role in roles.items():
        if role == PEER:
            scale = (scales or {}).get(name, 1.0)
            compare(checks, backend, case, f"ours vs {name}" + (" x C" if scale != 1.0 else ""), ours, results[name],
                    scale=scale)


def compare(checks: list[dict], backend: str, case: str, name: str, got: tuple[float, np.ndarray],
            want: tuple[float, np.ndarray], scale: float = 1.0) -> None:
    """Records whether (value, gradient) ``got`` equals ``scale`` times ``want`` (a peer with another mean)."""
    want_value, want_grad = scale * float(want[0]), want[1] if scale == 1.0 else scale * np.asarray(want[1])
    value_err = rel_err(np.asarray([got[0]]), np.asarray([want_value]))
    grad_err = rel_err(got[1], want_grad)
    finite = math.isfinite(got[0]) and bool(np.all(np.isfinite(got[1])))
    passed = finite and value_err <= CHECK_RTOL and grad_err <= CHECK_RTOL
    checks.append({"backend": backend, "case": case, "check": name, "value": float(got[0]), "expected": want_value,
                   "value_rel_err": value_err, "grad_rel_err": grad_err, "rtol": CHECK_RTOL, "finite": finite,
                   "passed": passed})
    print(f"  check {backend:9s} {case:27s} {name:58s} value {value_err:8.1e}  grad {grad_err:8.1e}  "
          f"{'ok' if passed else 'MISMATCH'}", flush=True)


def reference_result(case: Case, logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray] | None:
    """float64 (value, gradient) of ours from ``focal_spec.reference``; None where it would be too slow."""
    from focal_spec import reference

    work = logits.size * (logits.shape[1] if case.kind == "softmax" else 1)
    if work > REFERENCE_MAX_WORK:
        return None
    if case.kind == "sigmoid":
        value, grad = reference.sigmoid_focal_loss(logits, targets, gamma=case.gamma, alpha=ALPHA, reduction="mean")
    elif case.kind == "asl":
        from focal_spec import variants

        value, grad = variants.asymmetric_loss(logits, targets, gamma_pos=ASL_GAMMA_POS, gamma_neg=case.gamma,
                                               clip=ASL_CLIP, reduction="mean")
    elif case.kind == "qfl":
        from focal_spec import variants

        value, grad = variants.quality_focal_loss(logits, targets, beta=case.gamma, reduction="mean")
    else:
        value, grad = reference.softmax_focal_loss(logits, targets, gamma=case.gamma, axis=1, reduction="mean")
    return float(value), grad


# ------------------------------------------------------------------------------------------------
# PyTorch
# ------------------------------------------------------------------------------------------------


def torchvision_formula(x, t, gamma: float, alpha: float | None):
    """The torchvision sigmoid focal loss, written out, mean-reduced: BCE times (1 - p_t)^γ, times α_t."""
    import torch
    import torch.nn.functional as F

    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        alpha_t = alpha * t + (1 - alpha) * (1 - t)
        loss = alpha_t * loss
    return loss.mean()


def naive_softmax_focal(x, y, gamma: float):
    """The focal loss as usually written on top of log-softmax: gather log p_y, then -(1 - p_y)^γ log p_y."""
    import torch.nn.functional as F

    lp = F.log_softmax(x, 1)
    lpy = lp.gather(1, y[:, None]).squeeze(1)
    return -((1 - lpy.exp()) ** gamma * lpy).mean()


def timm_asl_formula(x, y, gamma_pos: float, gamma_neg: float, clip: float, eps: float = ASL_EPS):
    """The asymmetric loss as timm writes it, mean-reduced: the negatives' probability 1 - σ(x) raised by the
    clip and capped at 1, both probabilities floored at eps inside the logarithms, one pow of 1 - p_t with a
    per-element exponent (γ₊ at positives, γ₋ at negatives), and the negated sum (here over the element count).

    Where σ(x) > eps the floor changes nothing and it has ours' semantics; make_inputs' logits (N(0, 2²) at
    these sizes never reach |x| = 18.4, nine standard deviations) keep it there, so the check against ours is
    held to CHECK_RTOL. What differs is float32 rounding: 1 - σ(x) formed by subtraction, about 2e-6 of the
    gradient's largest element at 2.5M elements."""
    import torch

    p = torch.sigmoid(x)
    p_neg = (1 - p + clip).clamp(max=1) if clip > 0 else 1 - p
    log_lik = y * torch.log(p.clamp(min=eps)) + (1 - y) * torch.log(p_neg.clamp(min=eps))
    p_t = p * y + p_neg * (1 - y)
    return -(log_lik * torch.pow(1 - p_t, gamma_pos * y + gamma_neg * (1 - y))).sum() / x.numel()


def mmdet_qfl_formula(x, score, beta: float):
    """The quality focal loss as mmdetection writes it, on a dense score target, mean-reduced: every element
    first as a negative, BCE with logits against 0 times σ(x)^β, then the positives (score > 0, located with
    nonzero) overwritten by BCE against their score times |score - σ(x)|^β."""
    import torch
    import torch.nn.functional as F

    s = torch.sigmoid(x)
    loss = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none") * s.pow(beta)
    pos = torch.nonzero(score > 0, as_tuple=True)
    pos_loss = (F.binary_cross_entropy_with_logits(x[pos], score[pos], reduction="none")
                * (score[pos] - s[pos]).abs().pow(beta))
    return loss.index_put(pos, pos_loss).mean()


def saved_for_backward_bytes(loss_fn: Callable[[], Any]) -> int:
    """Bytes autograd keeps for backward: every packed tensor and a gradient kept on the node, counted once per
    storage."""
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
    kept = getattr(loss.grad_fn, "kept", None)  # focal_torch keeps dℓ/dx on its node, not as a saved tensor
    if isinstance(kept, torch.Tensor):
        pack(kept)
    loss.backward()  # frees the graph
    return sum(storages.values())


def served_by(caught: list, package: str, normal: str) -> str:
    """The path that served ours: ``normal``, or "fallback: <message>" where ``package`` warned while the checks
    ran it (a loss that gave up a faster path says so with a warning)."""
    for w in caught:
        if str(w.message).startswith(package) or f"/{package}/" in str(w.filename).replace("\\", "/"):
            return f"fallback: {str(w.message).splitlines()[0]}"
    return normal


def torch_impls(case: Case, logits: np.ndarray, targets: np.ndarray, device: str, checks: list[dict],
                reference: tuple[float, np.ndarray] | None) -> tuple[list[Impl], tuple[float, np.ndarray]]:
    import torch
    import torch.nn.functional as F

    import focal_torch

    try:
        import kornia.losses as kornia_losses
    except ImportError:
        kornia_losses = None

    x = torch.from_numpy(logits).to(device).requires_grad_(True)
    t = torch.from_numpy(targets).to(device)
    g = case.gamma
    if case.kind == "sigmoid":
        losses: dict[str, tuple[str, Callable[[], Any]]] = {
            "ours": (OURS, lambda: focal_torch.sigmoid_focal_loss(x, t, gamma=g, alpha=ALPHA)),
            TORCHVISION: (PEER, lambda: torchvision_formula(x, t, g, ALPHA)),
            KORNIA["sigmoid"]: (PEER, lambda: kornia_losses.binary_focal_loss_with_logits(
                x, t, alpha=ALPHA, gamma=g, reduction="mean")),
            TORCH_CE["sigmoid"]: (CE, lambda: F.binary_cross_entropy_with_logits(x, t)),
        }
        ours_gamma0 = lambda: focal_torch.sigmoid_focal_loss(x, t, gamma=0.0, alpha=None)
        kornia_scale = 1.0
    elif case.kind == "asl":
        losses = {
            "ours": (OURS, lambda: focal_torch.asymmetric_loss(x, t, gamma_pos=ASL_GAMMA_POS, gamma_neg=g,
                                                               clip=ASL_CLIP)),
            TIMM_ASL: (PEER, lambda: timm_asl_formula(x, t, ASL_GAMMA_POS, g, ASL_CLIP)),
            TORCH_CE["asl"]: (CE, lambda: F.binary_cross_entropy_with_logits(x, t)),
        }
        ours_gamma0 = lambda: focal_torch.asymmetric_loss(x, t, gamma_pos=0.0, gamma_neg=0.0, clip=0.0)
        kornia_scale = 1.0
    elif case.kind == "qfl":
        losses = {
            "ours": (OURS, lambda: focal_torch.quality_focal_loss(x, t, beta=g)),
            MMDET_QFL: (PEER, lambda: mmdet_qfl_formula(x, t, g)),
            TORCH_CE["qfl"]: (CE, lambda: F.binary_cross_entropy_with_logits(x, t)),
        }
        ours_gamma0 = lambda: focal_torch.quality_focal_loss(x, t, beta=0.0)
        kornia_scale = 1.0
    else:
        losses = {
            "ours": (OURS, lambda: focal_torch.softmax_focal_loss(x, t, gamma=g)),
            NAIVE: (PEER, lambda: naive_softmax_focal(x, t, g)),
            KORNIA["softmax"]: (PEER, lambda: kornia_losses.focal_loss(x, t, alpha=None, gamma=g, reduction="mean")),
            TORCH_CE["softmax"]: (CE, lambda: F.cross_entropy(x, t)),
        }
        ours_gamma0 = lambda: focal_torch.softmax_focal_loss(x, t, gamma=0.0)
        kornia_scale = float(logits.shape[1])  # kornia's mean divides by C times the positions
    if kornia_losses is None:
        losses.pop(KORNIA.get(case.kind), None)

    def step(fn):
        loss = fn()
        (grad,) = torch.autograd.grad(loss, x)
        return loss, grad

    def evaluate(fn) -> tuple[float, np.ndarray]:
        loss, grad = step(fn)
        return float(loss.detach().cpu()), grad.cpu().numpy()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = {name: evaluate(fn) for name, (_, fn) in losses.items()}
    ours = results["ours"]
    ours_path = served_by(caught, "focal_torch", "eager")
    compare_all(checks, "torch", case.id, results, {name: role for name, (role, _) in losses.items()}, reference,
                {KORNIA["softmax"]: kornia_scale})
    label = GAMMA0_LABEL[case.kind]
    compare(checks, "torch", case.id, f"ours({label}) vs {TORCH_CE[case.kind]}", evaluate(ours_gamma0),
            results[TORCH_CE[case.kind]])

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    x_bytes = x.numel() * x.element_size()
    traffic = 2 * (x_bytes + t.numel() * t.element_size()) + x_bytes
    impls = [Impl("torch", name, role, run=lambda fn=fn: step(fn), sync=sync, traffic_bytes=traffic,
                  memory_bytes=saved_for_backward_bytes(fn), memory_kind="saved for backward",
                  path=ours_path if role == OURS else "")
             for name, (role, fn) in losses.items()]
    source, sink = x.detach(), torch.empty_like(x, requires_grad=False)
    impls.append(Impl("torch", "copy", COPY, run=lambda: sink.copy_(source), sync=sync, traffic_bytes=2 * x_bytes,
                      memory_bytes=None, memory_kind=""))
    return impls, ours


# ------------------------------------------------------------------------------------------------
# JAX
# ------------------------------------------------------------------------------------------------


def timm_asl_formula_jax(x, y, gamma_pos: float, gamma_neg: float, clip: float, eps: float = ASL_EPS):
    """:func:`timm_asl_formula` in jnp."""
    import jax
    import jax.numpy as jnp

    p = jax.nn.sigmoid(x)
    p_neg = jnp.minimum(1 - p + clip, 1.0) if clip > 0 else 1 - p
    log_lik = y * jnp.log(jnp.maximum(p, eps)) + (1 - y) * jnp.log(jnp.maximum(p_neg, eps))
    p_t = p * y + p_neg * (1 - y)
    return -jnp.sum(log_lik * jnp.power(1 - p_t, gamma_pos * y + gamma_neg * (1 - y))) / x.size


def mmdet_qfl_formula_jax(x, score, beta: float):
    """:func:`mmdet_qfl_formula` in jnp, where a select of the two cases replaces nonzero and index_put."""
    import jax
    import jax.numpy as jnp
    import optax

    s = jax.nn.sigmoid(x)
    neg = optax.sigmoid_binary_cross_entropy(x, jnp.zeros_like(x)) * s**beta
    pos = optax.sigmoid_binary_cross_entropy(x, score) * jnp.abs(score - s) ** beta
    return jnp.mean(jnp.where(score > 0, pos, neg))


def jax_device(device: str):
    """The JAX device for ``--device``, or None when JAX has none of that kind."""
    import jax

    platform_name = "cpu" if device == "cpu" else "gpu"
    try:
        return jax.devices(platform_name)[0]
    except RuntimeError:
        return None


def jax_impls(case: Case, logits: np.ndarray, targets: np.ndarray, device: Any, checks: list[dict],
              reference: tuple[float, np.ndarray] | None) -> tuple[list[Impl], tuple[float, np.ndarray]]:
    import jax
    import jax.numpy as jnp
    import optax

    import focal_jax

    g = case.gamma
    if case.kind == "sigmoid":
        x_host, t_host = logits, targets
        losses = {
            "ours": (OURS, lambda x, t: focal_jax.sigmoid_focal_loss(x, t, gamma=g, alpha=ALPHA)),
            "optax.sigmoid_focal_loss":
                (PEER, lambda x, t: optax.sigmoid_focal_loss(x, t, alpha=ALPHA, gamma=g).mean()),
            JAX_CE["sigmoid"]: (CE, lambda x, t: optax.sigmoid_binary_cross_entropy(x, t).mean()),
        }
        ours_gamma0 = lambda x, t: focal_jax.sigmoid_focal_loss(x, t, gamma=0.0, alpha=None)
    elif case.kind == "asl":
        x_host, t_host = logits, targets
        losses = {
            "ours": (OURS, lambda x, t: focal_jax.asymmetric_loss(x, t, gamma_pos=ASL_GAMMA_POS, gamma_neg=g,
                                                                  clip=ASL_CLIP)),
            TIMM_ASL: (PEER, lambda x, t: timm_asl_formula_jax(x, t, ASL_GAMMA_POS, g, ASL_CLIP)),
            JAX_CE["asl"]: (CE, lambda x, t: optax.sigmoid_binary_cross_entropy(x, t).mean()),
        }
        ours_gamma0 = lambda x, t: focal_jax.asymmetric_loss(x, t, gamma_pos=0.0, gamma_neg=0.0, clip=0.0)
    elif case.kind == "qfl":
        x_host, t_host = logits, targets
        losses = {
            "ours": (OURS, lambda x, t: focal_jax.quality_focal_loss(x, t, beta=g)),
            MMDET_QFL: (PEER, lambda x, t: mmdet_qfl_formula_jax(x, t, g)),
            JAX_CE["qfl"]: (CE, lambda x, t: optax.sigmoid_binary_cross_entropy(x, t).mean()),
        }
        ours_gamma0 = lambda x, t: focal_jax.quality_focal_loss(x, t, beta=0.0)
    else:
        x_host = np.ascontiguousarray(np.moveaxis(logits, 1, -1))  # channels-last, as optax
        t_host = targets.astype(np.int32)

        def naive(x, y):
            lp = jax.nn.log_softmax(x, axis=-1)
            lpy = jnp.take_along_axis(lp, y[..., None], axis=-1)[..., 0]
            return -((1 - jnp.exp(lpy)) ** g * lpy).mean()

        losses = {
            "ours": (OURS, lambda x, y: focal_jax.softmax_focal_loss(x, y, gamma=g)),
            NAIVE: (PEER, naive),
            JAX_CE["softmax"]: (CE, lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean()),
        }
        ours_gamma0 = lambda x, y: focal_jax.softmax_focal_loss(x, y, gamma=0.0)
    x, t = jax.device_put(x_host, device), jax.device_put(t_host, device)

    def compile_step(fn):
        return jax.jit(jax.value_and_grad(fn)).lower(x, t).compile()

    def evaluate(compiled) -> tuple[float, np.ndarray]:
        value, grad = compiled(x, t)
        grad = np.asarray(grad)
        if case.kind == "softmax":
            grad = np.moveaxis(grad, -1, 1)  # back to the shared (N, C, ...) layout
        return float(value), grad

    compiled = {name: compile_step(fn) for name, (_, fn) in losses.items()}
    results = {name: evaluate(c) for name, c in compiled.items()}
    ours = results["ours"]
    compare_all(checks, "jax", case.id, results, {name: role for name, (role, _) in losses.items()}, reference)
    label = GAMMA0_LABEL[case.kind]
    compare(checks, "jax", case.id, f"ours({label}) vs {JAX_CE[case.kind]}", evaluate(compile_step(ours_gamma0)),
            results[JAX_CE[case.kind]])

    traffic = 2 * (x.nbytes + t.nbytes) + x.nbytes
    impls = []
    for name, (role, _) in losses.items():
        c = compiled[name]
        memory = c.memory_analysis()
        impls.append(Impl("jax", name, role, run=lambda c=c: jax.block_until_ready(c(x, t)), sync=lambda: None,
                          traffic_bytes=traffic, memory_bytes=int(memory.temp_size_in_bytes) if memory else None,
                          memory_kind="compiled temporaries", path="jit" if role == OURS else ""))
    copy = jax.jit(jnp.copy).lower(x).compile()
    impls.append(Impl("jax", "copy", COPY, run=lambda: jax.block_until_ready(copy(x)), sync=lambda: None,
                      traffic_bytes=2 * x.nbytes, memory_bytes=None, memory_kind=""))
    return impls, ours


# ------------------------------------------------------------------------------------------------
# Timing, rows, targets, output
# ------------------------------------------------------------------------------------------------


def timed(impl: Impl, calls: int, budget_s: float = math.inf) -> float:
    """Seconds per call over ``calls`` calls; stops after a slice of calls once ``budget_s`` has passed (a busy
    machine can slow calls down by orders of magnitude after the calibration)."""
    chunk = max(1, calls // 8)
    done = 0
    impl.sync()
    start = time.perf_counter()
    while done < calls:
        for _ in range(min(chunk, calls - done)):
            impl.run()
        done += min(chunk, calls - done)
        if done < calls and time.perf_counter() - start > budget_s:
            break
    impl.sync()
    return (time.perf_counter() - start) / done


def time_rounds(impls: list[Impl], rounds: int, min_timing_s: float, warmup_s: float) -> None:
    """Warm-up and calibration, then ``rounds`` rounds that each time every implementation once.

    The first calls of a process or of a new shape can be slower by orders of magnitude (allocator,
    thread pools, dispatch caches), so each implementation first runs for ``warmup_s`` (and at least
    2 calls); its fastest warm-up call sets how many calls one timing needs to last ``min_timing_s``.
    """
    for impl in impls:
        deadline = time.perf_counter() + warmup_s
        single, calls = math.inf, 0
        while calls < 2 or (time.perf_counter() < deadline and calls < MAX_CALLS):
            single = min(single, timed(impl, 1))
            calls += 1
        impl.calls = max(1, min(MAX_CALLS, math.ceil(min_timing_s / max(single, 1e-9))))
    gc.disable()  # no collection pauses inside a timing
    try:
        for r in range(rounds):
            shift = r % len(impls)
            for impl in impls[shift:] + impls[:shift]:
                impl.times_s.append(timed(impl, impl.calls, budget_s=10 * min_timing_s))
    finally:
        gc.enable()


def case_rows(case: Case, shape: tuple[int, ...], impls: list[Impl]) -> list[dict]:
    rows = []
    for backend in dict.fromkeys(impl.backend for impl in impls):
        group = [impl for impl in impls if impl.backend == backend]
        ce = next((impl for impl in group if impl.role == CE), None)
        copy = next((impl for impl in group if impl.role == COPY), None)
        copy_gbps = copy.traffic_bytes / min(copy.times_s) / 1e9 if copy is not None else None
        peers = [impl for impl in group if impl.role == PEER]
        best_peer = min(peers, key=lambda impl: min(impl.times_s)) if peers else None
        for impl in group:
            t_min, t_median = min(impl.times_s), statistics.median(impl.times_s)
            gbps = impl.traffic_bytes / t_min / 1e9
            rows.append({
                "case": case.id, "backend": backend, "kind": case.kind, "shape": list(shape), "gamma": case.gamma,
                "impl": impl.name, "role": impl.role, "calls_per_timing": impl.calls, "rounds": len(impl.times_s),
                "min_s": t_min, "median_s": t_median, "times_s": impl.times_s,
                "vs_ce": t_min / min(ce.times_s) if ce is not None else None,
                "vs_ce_median": t_median / statistics.median(ce.times_s) if ce is not None else None,
                "vs_best_peer": t_min / min(best_peer.times_s) if best_peer is not None else None,
                "best_peer": best_peer.name if best_peer is not None else None,
                "traffic_bytes": impl.traffic_bytes, "gbps": gbps,
                "of_copy": gbps / copy_gbps if copy_gbps else None,
                "memory_bytes": impl.memory_bytes, "memory_kind": impl.memory_kind, "path": impl.path,
                "targets": [], "met": None,
            })
    return rows


def evaluate_targets(rows: list[dict], full_size_cpu: bool) -> list[dict]:
    """Every target whose case ran; ``meaningful`` is False unless the run is the CPU suite at full size."""
    out = []
    for target in TARGETS:
        in_case = {r["impl"]: r for r in rows if r["case"] == target.case and r["backend"] == target.backend}
        if "ours" not in in_case:
            continue
        name = in_case["ours"]["best_peer"] if target.against == BEST_PEER else target.against
        against = in_case.get(name) if name else None
        value = in_case["ours"]["min_s"] / against["min_s"] if against else None
        met = None if value is None else (value < target.limit if target.strict else value <= target.limit)
        shown = f"{BEST_PEER} ({name})" if target.against == BEST_PEER and name else target.against
        record = {"case": target.case, "backend": target.backend, "target": f"ours / {shown}",
                  "limit": target.limit, "comparison": "<" if target.strict else "<=", "value": value, "met": met,
                  "meaningful": full_size_cpu}
        out.append(record)
        in_case["ours"]["targets"].append(record)
    for row in rows:
        if row["targets"]:
            row["met"] = all(t["met"] for t in row["targets"] if t["met"] is not None)
    return out


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:8.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:8.2f} ms"
    return f"{seconds:8.3f} s "


def fmt_ratio(value: float | None) -> str:
    return f"{value:6.2f}x" if value is not None else "      -"


def fmt_memory(row: dict) -> str:
    return f"{row['memory_bytes'] / 2**20:10.2f}" if row["memory_bytes"] is not None else "         -"


def print_table(rows: list[dict]) -> None:
    header = (f"{'case':27s} {'backend':7s} {'impl':48s} {'calls':>6s} {'min':>11s} {'median':>11s} "
              f"{'vs CE':>7s} {'(median)':>8s} {'GB/s':>7s} {'of copy':>7s} {'mem MiB':>10s}")
    print(header)
    print("-" * len(header))
    previous = None
    for r in rows:
        if previous is not None and (r["case"], r["backend"]) != previous:
            print()
        previous = (r["case"], r["backend"])
        of_copy = f"{100 * r['of_copy']:6.0f}%" if r["of_copy"] is not None and r["role"] != COPY else "      -"
        print(f"{r['case']:27s} {r['backend']:7s} {r['impl']:48s} {r['calls_per_timing']:6d} {fmt_time(r['min_s'])} "
              f"{fmt_time(r['median_s'])} {fmt_ratio(r['vs_ce'])} {fmt_ratio(r['vs_ce_median']):>8s} "
              f"{r['gbps']:7.2f} {of_copy} {fmt_memory(r)}")
    print("min/median: per call, over the interleaved rounds; vs CE: min / min of the framework's cross-entropy "
          "(median / median in brackets); GB/s: minimal traffic 2 x (logits + targets) + gradient bytes / min time "
          "(copy: read + written); of copy: that over the copy's GB/s; mem: bytes saved for backward (torch) or "
          "compiled temporaries (jax)")


def print_case_summary(rows: list[dict]) -> None:
    for r in rows:
        if r["role"] != OURS:
            continue
        peer = (f"vs best peer ({r['best_peer']}) {fmt_ratio(r['vs_best_peer']).strip()}"
                if r["best_peer"] else "no peer")
        of_copy = f"{100 * r['of_copy']:.0f}% of copy bandwidth" if r["of_copy"] is not None else ""
        print(f"  {r['case']:27s} {r['backend']:5s} ours {fmt_time(r['min_s']).strip():>10s}: "
              f"vs CE {fmt_ratio(r['vs_ce']).strip():>6s}, {peer}; {of_copy}; path {r['path']}")


def markdown_table(rows: list[dict]) -> str:
    """One line per case and framework: ours, the cross-entropy, the fastest peer, bandwidth and targets."""
    lines = ["| case | framework | path | ours | cross-entropy | ours / CE | fastest peer | ours / peer "
             "| of copy BW | target |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        if r["role"] != OURS:
            continue
        group = {x["role"]: x for x in rows if x["case"] == r["case"] and x["backend"] == r["backend"]}
        ce = group.get(CE)
        targets = "; ".join(f"{t['target'].split(' / ')[1]} {t['comparison']} {t['limit']:g}x: "
                            f"{'MET' if t['met'] else 'NOT MET'}" for t in r["targets"] if t["met"] is not None)
        of_copy = f"{100 * r['of_copy']:.0f}%" if r["of_copy"] is not None else "-"
        lines.append(
            f"| {r['case']} | {r['backend']} | {r['path']} | {fmt_time(r['min_s']).strip()} | "
            f"{fmt_time(ce['min_s']).strip() if ce else '-'} | {fmt_ratio(r['vs_ce']).strip()} | "
            f"{r['best_peer'] or '-'} | {fmt_ratio(r['vs_best_peer']).strip()} | {of_copy} | {targets or '-'} |")
    return "\n".join(lines) + "\n"


def environment(device: str, backends: tuple[str, ...], argv: list[str]) -> dict:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "examples/benchmark.py", *argv]),
        "python": platform.python_version(), "platform": platform.platform(), "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(), "numpy": np.__version__, "device": device, "source": source_version(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpus_available"] = len(os.sched_getaffinity(0))
    if "torch" in backends:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    torch_cpu_isa=torch.backends.cpu.get_cpu_capability())
        if device == "cuda":
            info["gpu"] = torch.cuda.get_device_name()
        try:
            import kornia
        except ImportError:
            info["kornia"] = None
        else:
            info["kornia"] = kornia.__version__
    if "jax" in backends:
        import jax
        import optax

        info.update(jax=jax.__version__, optax=optax.__version__, jax_backend=jax.default_backend(),
                    xla_cpu_isa=xla_cpu_isa())
    return info


def source_version() -> str:
    """The commit of the measured code, with "+modified" when the library differs from it; "unknown" outside git."""
    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "focal_spec", "focal_torch", "focal_jax"],
                               cwd=root, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("" if clean else "+modified")


def cpu_flags() -> set[str]:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def xla_cpu_isa() -> str:
    """What XLA's CPU compiler vectorises for: the host's own features (XLA:CPU targets the machine it runs on),
    unless ``--xla_cpu_max_isa`` in XLA_FLAGS caps them."""
    cap = next((f.split("=", 1)[1] for f in os.environ.get("XLA_FLAGS", "").split()
                if f.startswith("--xla_cpu_max_isa=")), None)
    flags = cpu_flags()
    host = next((name for flag, name in (("avx512f", "AVX512"), ("avx2", "AVX2"), ("avx", "AVX"),
                                         ("sse4_2", "SSE4.2"), ("asimd", "NEON")) if flag in flags),
                platform.machine())
    return host if cap is None else f"{host}, capped at {cap}"


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch_losses(case: Case, x: Any, t: Any) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(ours, the framework's cross-entropy) of a sigmoid or softmax case, as the timed rows call them."""
    import torch.nn.functional as F

    import focal_torch

    if case.kind == "sigmoid":
        return (lambda: focal_torch.sigmoid_focal_loss(x, t, gamma=case.gamma, alpha=ALPHA),
                lambda: F.binary_cross_entropy_with_logits(x, t))
    return lambda: focal_torch.softmax_focal_loss(x, t, gamma=case.gamma), lambda: F.cross_entropy(x, t)


def _torch_inputs(case: Case, shape: tuple[int, ...], seed: int) -> tuple[Callable[[], Any], Any]:
    """(ours on fresh inputs of ``shape``, the logits it differentiates)."""
    import torch

    logits, targets = make_inputs(case.kind, shape, seed)
    x = torch.from_numpy(logits).requires_grad_(True)
    return _torch_losses(case, x, torch.from_numpy(targets))[0], x


def _first_call_s(fn: Callable[[], Any], x: Any) -> float:
    """Seconds of one forward + backward of ``fn`` with respect to ``x``."""
    import torch

    start = time.perf_counter()
    torch.autograd.grad(fn(), x)
    return time.perf_counter() - start


def first_call_child(cases: list[Case], sizes: str, seed: int) -> list[dict]:
    """In a fresh process: for each case, ours runs twice on a neighbouring size (one more row: its code and data
    back in the caches after the previous case's work, the allocator's memory for that size paged in), the
    framework's cross-entropy runs twice on the case's inputs (so that the allocator and the thread pool have seen
    the size), then ours' first call (forward + backward) on the case's size and on two more new sizes (two and
    three more rows) is timed, and their median is set against the minimum of the next calls on the case's size.
    Before the cases, each loss runs ``WARM_CALLS`` times on a size of its own (2, 3): the first executions
    of a code path in a process cost more, once, whatever size they run on. What is left is what a new size costs:
    a kernel compiled per size or per key would show there."""
    import torch

    import focal_torch

    warm_x = torch.zeros(2, 3, requires_grad=True)
    for _ in range(WARM_CALLS):
        torch.autograd.grad(focal_torch.sigmoid_focal_loss(warm_x, torch.zeros(2, 3), gamma=GAMMA, alpha=ALPHA),
                            warm_x)
        torch.autograd.grad(focal_torch.softmax_focal_loss(warm_x, torch.zeros(2, dtype=torch.int64), gamma=GAMMA),
                            warm_x)
    out = []
    for index, case in enumerate(cases):
        shape = case.tiny if sizes == "tiny" else case.shape
        logits, targets = make_inputs(case.kind, shape, seed + index)
        x = torch.from_numpy(logits).requires_grad_(True)
        t = torch.from_numpy(targets)
        ours, ce = _torch_losses(case, x, t)

        def step(fn: Callable[[], Any], x: Any = x) -> None:
            torch.autograd.grad(fn(), x)

        near, near_x = _torch_inputs(case, (shape[0] + 1, *shape[1:]), seed + index)
        for _ in range(2):  # twice: the first large allocations of a process also fault their pages in
            step(near, near_x)
        for _ in range(2):
            step(ce)

        # the case's size and two more new ones: the median, so that one stall of a shared machine is not taken
        # for a property of the loss (a cost paid per size would be in all three)
        firsts = [_first_call_s(ours, x)] + [_first_call_s(*_torch_inputs(case, (shape[0] + extra, *shape[1:]),
                                                                          seed + index)) for extra in (2, 3)]
        first = statistics.median(firsts)
        later = math.inf
        for _ in range(10 if logits.size > 1 << 20 else 50):
            start = time.perf_counter()
            step(ours)
            later = min(later, time.perf_counter() - start)
        out.append({"case": case.id, "first_s": first, "first_calls_s": firsts, "later_s": later,
                    "ratio": first / later, "limit": FIRST_CALL_LIMIT, "met": first / later <= FIRST_CALL_LIMIT})
    return out


def first_calls(cases: list[Case], sizes: str, seed: int) -> list[dict]:
    """:func:`first_call_child` in a new Python process with an empty inductor cache (nothing is compiled behind
    a call: this row shows it)."""
    import tempfile

    ids = [c.id for c in cases]
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        done = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--first-call-child",
                               "--sizes", sizes, "--seed", str(seed), "--cases", *ids],
                              capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the first-call process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", "--quick", dest="smoke", action="store_true",
                        help="tiny sizes of the CPU and GPU case lists, 3 rounds: a correctness check, "
                             "not a timing gate")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the inputs live and the losses run (default cpu)")
    parser.add_argument("--suite", choices=("cpu", "gpu", "all"), default=None,
                        help="case list (default: cpu on --device cpu, gpu on --device cuda, all with --smoke)")
    parser.add_argument("--sizes", choices=("full", "tiny"), default=None,
                        help="full sizes or tiny ones (default full, tiny with --smoke)")
    parser.add_argument("--cases", nargs="+", choices=tuple(CASE_BY_ID), default=None, metavar="CASE",
                        help=f"run only these cases: {', '.join(CASE_BY_ID)}")
    parser.add_argument("--only", choices=("torch", "jax"), default=None, help="run one framework only")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15, smoke 3)")
    parser.add_argument("--min-timing-ms", type=float, default=None,
                        help="calls per timing are chosen so one timing lasts this long (default 10, smoke 1)")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the random inputs (default %(default)s)")
    parser.add_argument("--json", "--out", dest="json", type=pathlib.Path, default=None,
                        help="write every row, check and target as JSON to this path")
    parser.add_argument("--no-first-call", dest="first_call", action="store_false",
                        help="skip the first-call row (a fresh process timing each torch loss's first call)")
    parser.add_argument("--first-call-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--markdown", type=pathlib.Path, default=None,
                        help="write a Markdown table (one line per case and framework) to this path")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1. Received: {args.rounds}")
    if args.min_timing_ms is not None and args.min_timing_ms <= 0:
        parser.error(f"--min-timing-ms must be > 0. Received: {args.min_timing_ms}")
    if args.device == "cuda" and args.only != "jax":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda needs a GPU that PyTorch can see (torch.cuda.is_available() is False)")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark; returns (and with ``--json`` writes) the rows, checks and targets."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    suite = args.suite or ("all" if args.smoke else ("gpu" if args.device == "cuda" else "cpu"))
    sizes = args.sizes or ("tiny" if args.smoke else "full")
    rounds = args.rounds or (3 if args.smoke else 15)
    min_timing_s = 1e-3 * (args.min_timing_ms or (1.0 if args.smoke else 10.0))
    warmup_s = 0.02 if args.smoke else 0.3
    cases = ([CASE_BY_ID[c] for c in args.cases] if args.cases
             else [c for c in CASES if suite == "all" or c.suite == suite])
    backends = ("torch", "jax") if args.only is None else (args.only,)
    if args.first_call_child:
        print(json.dumps(first_call_child(cases, sizes, args.seed)))
        return {"passed": True}
    if args.device == "cuda":  # JAX would otherwise take most of the GPU's memory before PyTorch runs
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env = environment(args.device, backends, argv)
    jax_dev = jax_device(args.device) if "jax" in backends else None
    if backends == ("jax",) and jax_dev is None:
        raise SystemExit(f"--only jax --device {args.device}: JAX has no {args.device} device, nothing to run")

    print("focal loss benchmark: forward + backward of a mean-reduced loss, float32, "
          f"gamma per case, alpha={ALPHA} (sigmoid)")
    print(f"  date     {env['date']}")
    print(f"  machine  {env.get('cpus_available', env['cpu_count'])} CPU cores available ({env['cpu_count']} online), "
          f"{env['cpu_model']}; {env['platform']}" + (f"; GPU {env['gpu']}" if "gpu" in env else ""))
    versions = ", ".join(f"{k} {env[k]}" for k in ("python", "numpy", "torch", "kornia", "jax", "optax") if k in env)
    print(f"  versions {versions}" + (f"; torch threads {env['torch_threads']}" if "torch" in env else ""))
    isa = [f"{k} {env[v]}" for k, v in (("torch (ATen)", "torch_cpu_isa"), ("XLA", "xla_cpu_isa")) if v in env]
    if isa:
        print(f"  vector ISA used: {', '.join(isa)}")
    print(f"  command  {env['command']}   (source {env['source']})")
    print(f"  device {args.device}, suite {suite}, sizes {sizes}, {rounds} interleaved rounds, each timing >= "
          f"{1e3 * min_timing_s:g} ms of calls" + ("; --smoke: correctness run, timings are not a gate" if args.smoke
                                                   else ""), flush=True)
    if "jax" in backends and jax_dev is None:
        print(f"  jax: no {args.device} device, JAX columns skipped")

    rows: list[dict] = []
    checks: list[dict] = []
    wall = time.perf_counter()
    for index, case in enumerate(cases):
        shape = case.tiny if sizes == "tiny" else case.shape
        started = time.perf_counter()
        logits, targets = make_inputs(case.kind, shape, args.seed + index)
        reference = reference_result(case, logits, targets)
        impls: list[Impl] = []
        ours: dict[str, tuple[float, np.ndarray]] = {}
        if "torch" in backends:
            torch_built, ours["torch"] = torch_impls(case, logits, targets, args.device, checks, reference)
            impls += torch_built
        if "jax" in backends and jax_dev is not None:
            jax_built, ours["jax"] = jax_impls(case, logits, targets, jax_dev, checks, reference)
            impls += jax_built
        if len(ours) == 2:
            compare(checks, "jax/torch", case.id, "ours: JAX vs PyTorch", ours["jax"], ours["torch"])
        del logits, targets, reference, ours
        for backend in backends:  # one framework at a time: their thread pools would compete
            group = [impl for impl in impls if impl.backend == backend]
            if group:
                time_rounds(group, rounds, min_timing_s, warmup_s)
        new_rows = case_rows(case, shape, impls)
        rows += new_rows
        del impls
        print(f"[{case.id} {'x'.join(map(str, shape))}] {time.perf_counter() - started:.1f}s", flush=True)
        print_case_summary(new_rows)

    targets = evaluate_targets(rows, full_size_cpu=(sizes == "full" and args.device == "cpu"))
    first = [c for c in cases if c.kind in ("sigmoid", "softmax")]
    if args.first_call and "torch" in backends and args.device == "cpu" and first:
        print("first calls (a fresh process, an empty inductor cache; each loss's first call on a new size, the median "
              "over the case's size and two more, against its later calls):", flush=True)
        for f in first_calls(first, sizes, args.seed):
            print(f"  {'MET' if f['met'] else 'NOT MET':8s} {f['case']:27s} torch first call {fmt_time(f['first_s'])}"
                  f", later {fmt_time(f['later_s'])}: {f['ratio']:.2f}x <= {f['limit']:g}x", flush=True)
            targets.append({"case": f["case"], "backend": "torch", "target": "first call / later calls",
                            "limit": f["limit"], "comparison": "<=", "value": f["ratio"], "met": f["met"],
                            "meaningful": sizes == "full", "first_s": f["first_s"], "later_s": f["later_s"]})
    failed = [c for c in checks if not c["passed"]]
    print()
    print_table(rows)
    print()
    print("cases, ours: min time vs the framework's cross-entropy, vs the fastest focal peer, bandwidth vs copy")
    print_case_summary(rows)
    for r in rows:
        if r["path"].startswith("fallback"):
            print(f"!!! FALLBACK in a timed case: {r['case']} {r['backend']} ours ran as {r['path']}")
    print()
    if targets:
        meaningful = targets[0]["meaningful"]
        print("targets (ratio of minimum times)" +
              ("" if meaningful else ": reported only, these sizes or this device are not the targets' own") + ":")
        for t in targets:
            status = "n/a" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
            value = f"{t['value']:.3f}x" if t["value"] is not None else "-"
            print(f"  {status:8s} {t['case']:27s} {t['backend']:5s} {t['target']:42s} {value:>8s} {t['comparison']} "
                  f"{t['limit']:g}x")
        met = sum(bool(t["met"]) for t in targets)
        print(f"{met}/{len(targets)} targets met")
    print(f"{len(checks) - len(failed)}/{len(checks)} correctness checks passed; "
          f"total {time.perf_counter() - wall:.0f}s", flush=True)
    for check in failed:
        print(f"MISMATCH {check['backend']} {check['case']}: {check['check']}: value rel err "
              f"{check['value_rel_err']:.2e}, grad rel err {check['grad_rel_err']:.2e} (rtol {check['rtol']:g}, "
              f"finite={check['finite']})")

    result = {"environment": env, "smoke": args.smoke, "device": args.device, "suite": suite, "sizes": sizes,
              "rounds": rounds, "min_timing_s": min_timing_s, "alpha": ALPHA, "seed": args.seed, "rows": rows,
              "checks": checks, "targets": targets, "passed": not failed}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_table(rows))
        print(f"wrote {args.markdown}")
    return result


def cli(argv: list[str] | None = None) -> int:
    """Exit status: 0 when every correctness check passed, 1 otherwise (timings never fail a run)."""
    return 0 if main(argv)["passed"] else 1


if __name__ == "__main__":
    sys.exit(cli())
