"""Focal loss at vocabulary scale: a small model trained end to end with the fused and the unfused loss.

Synthetic long-tailed data: class y ~ Zipf(1.1) over V classes, features x = μ_y + noise in R^F. The model is
hidden = tanh(x A) (D features) and logits = hidden W.T + b, trained with Adam on the softmax focal loss (γ = 2)
in JAX and in PyTorch, once with ``linear_softmax_focal_loss`` (the logits never held) and once with
``softmax_focal_loss`` on materialised logits, from the same initial parameters and batches. The loss curves
coincide step by step.

Then the memory of one training step's loss (forward + backward wrt hidden and weight) against V, fused and
unfused: JAX, the compiled temporaries of the jitted step (``memory_analysis``, nothing is run); PyTorch, the
peak resident set of a fresh process running one step, over its resident set before the step. V goes from 4k
to the largest V whose unfused step fits the budget (24 GiB, a 2-core machine's RAM; ``--quick``: small).

Writes ``vocabulary_scale.png`` and ``vocabulary_scale.md`` to ``--out`` (default ``examples/figures``).

Run:
  python examples/vocabulary_scale.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
GAMMA = 2.0
BUDGET = 24 * 2**30


def data(v: int, n: int, f: int, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``steps`` batches of (n, f) features and their Zipf labels, and the class means."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(v, f)).astype(np.float32)
    ranks = np.arange(1, v + 1, dtype=np.float64)
    p = ranks**-1.1
    y = rng.choice(v, size=(steps, n), p=p / p.sum())
    x = (mu[y] + 0.5 * rng.normal(size=(steps, n, f))).astype(np.float32)
    return x, y.astype(np.int32), mu


def init(v: int, f: int, d: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return dict(a=(rng.normal(size=(f, d)) / np.sqrt(f)).astype(np.float32),
                w=(rng.normal(size=(v, d)) / np.sqrt(d)).astype(np.float32), b=np.zeros(v, np.float32))


def train_jax(x: np.ndarray, y: np.ndarray, params: dict, fused: bool, lr: float) -> list[float]:
    import jax
    import jax.numpy as jnp
    import optax

    import focal_jax

    def loss_fn(p, xb, yb):
        hidden = jnp.tanh(xb @ p["a"])
        if fused:
            return focal_jax.linear_softmax_focal_loss(hidden, p["w"], yb, bias=p["b"], gamma=GAMMA)
        return focal_jax.softmax_focal_loss(hidden @ p["w"].T + p["b"], yb, gamma=GAMMA)

    opt = optax.adam(lr)
    p = jax.tree.map(jnp.asarray, params)
    state = opt.init(p)

    @jax.jit
    def step(p, state, xb, yb):
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), state, loss

    losses = []
    for xb, yb in zip(x, y, strict=True):
        p, state, loss = step(p, state, xb, yb)
        losses.append(float(loss))
    return losses


def train_torch(x: np.ndarray, y: np.ndarray, params: dict, fused: bool, lr: float) -> list[float] | None:
    import torch

    import focal_torch

    if fused and not hasattr(focal_torch, "linear_softmax_focal_loss"):
        return None
    p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.Adam(p.values(), lr=lr)
    losses = []
    for xb, yb in zip(x, y, strict=True):
        hidden = torch.tanh(torch.from_numpy(xb) @ p["a"])
        target = torch.from_numpy(yb).long()
        if fused:
            loss = focal_torch.linear_softmax_focal_loss(hidden, p["w"], target, bias=p["b"], gamma=GAMMA)
        else:
            loss = focal_torch.softmax_focal_loss(hidden @ p["w"].T + p["b"], target, gamma=GAMMA)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def jax_memory(n: int, d: int, v: int, fused: bool) -> int:
    """Compiled temporaries of value_and_grad wrt (hidden, weight) of the loss: lowered and compiled only."""
    import jax
    import jax.numpy as jnp

    import focal_jax

    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((v, d), jnp.float32)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)

    def f(h, w, y):
        if fused:
            return focal_jax.linear_softmax_focal_loss(h, w, y, gamma=GAMMA)
        return focal_jax.softmax_focal_loss(h @ w.T, y, gamma=GAMMA)

    c = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(h, w, y).compile()
    return int(c.memory_analysis().temp_size_in_bytes)


TORCH_STEP = r'''
import sys, torch
sys.path.insert(0, sys.argv[1])
import focal_torch
n, d, v, fused = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
g = torch.Generator().manual_seed(0)
h = torch.randn(n, d, generator=g).requires_grad_(); w = (torch.randn(v, d, generator=g) / d**0.5).requires_grad_()
y = torch.randint(0, v, (n,), generator=g)
def step():
    if fused:
        loss = focal_torch.linear_softmax_focal_loss(h, w, y, gamma=2.0)
    else:
        loss = focal_torch.softmax_focal_loss(h @ w.T, y, gamma=2.0)
    loss.backward()
import gc


def status(key):  # kB, from /proc/self/status
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


step()  # warm-up: thread pools and the allocator's first growth are not the loss's
gc.collect()
with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the resident set now
    f.write("5")
before = status("VmRSS:")
step()
print((status("VmHWM:") - before) * 1024)
'''


def torch_memory(n: int, d: int, v: int, fused: bool) -> int | None:
    """Peak resident-set growth of one step in a fresh process (None when the fused loss is not there)."""
    import focal_torch

    if fused and not hasattr(focal_torch, "linear_softmax_focal_loss"):
        return None
    proc = subprocess.run([sys.executable, "-c", TORCH_STEP, str(ROOT), str(n), str(d), str(v), "1" if fused else "0"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None


def plot(out: pathlib.Path, curves: dict, mem: list[dict], title: str) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"jax fused": ("C0", "-"), "jax unfused": ("C1", "--"), "torch fused": ("C2", "-"),
              "torch unfused": ("C3", "--")}
    for name, losses in curves.items():
        if losses is not None:
            c, ls = styles[name]
            ax1.plot(np.arange(1, len(losses) + 1), losses, color=c, linestyle=ls, label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("focal loss (γ = 2)")
    ax1.set_title(title)
    ax1.legend()
    for fw, marker in (("jax", "o"), ("torch", "s")):
        for fused, ls in ((True, "-"), (False, "--")):
            pts = [(m["v"], m[f"{fw}_{'fused' if fused else 'unfused'}"]) for m in mem]
            pts = [(v, b) for v, b in pts if b is not None and b > 0]
            if pts:
                vs, bs = zip(*pts, strict=True)
                ax2.plot(vs, np.array(bs) / 2**20, marker=marker, linestyle=ls,
                         label=f"{fw} {'fused' if fused else 'unfused'}")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("classes V")
    ax2.set_ylabel("peak extra memory of one step (MiB)")
    ax2.set_title("memory against V")
    ax2.legend()
    fig.tight_layout()
    path = out / "vocabulary_scale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a few seconds")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "figures")
    args = parser.parse_args(argv)
    if args.quick:
        v, n, f, d, steps = 1024, 32, 8, 16, 4
        mem_n, mem_d, mem_vs, torch_vs = 256, 64, [4096, 16384], []
    else:
        v, n, f, d, steps = 32768, 256, 32, 64, 40
        mem_n, mem_d = 8192, 512
        mem_vs = [2**k for k in range(12, 20)]
        torch_vs = [4096, 16384, 32768]
    args.out.mkdir(parents=True, exist_ok=True)
    x, y, _ = data(v, n, f, steps)
    params = init(v, f, d)
    lr = 1e-2
    curves = {"jax fused": train_jax(x, y, params, True, lr), "jax unfused": train_jax(x, y, params, False, lr),
              "torch fused": train_torch(x, y, params, True, lr), "torch unfused": train_torch(x, y, params, False, lr)}
    gaps = {}
    for fw in ("jax", "torch"):
        a, b = curves[f"{fw} fused"], curves[f"{fw} unfused"]
        if a is not None and b is not None:
            gaps[fw] = float(np.max(np.abs(np.array(a) - np.array(b)) / np.abs(np.array(b))))
    mem = []
    for mv in mem_vs:
        unfused = jax_memory(mem_n, mem_d, mv, False)
        if unfused > BUDGET:
            break
        row = dict(v=mv, jax_fused=jax_memory(mem_n, mem_d, mv, True), jax_unfused=unfused,
                   torch_fused=None, torch_unfused=None)
        if mv in torch_vs:
            row["torch_fused"] = torch_memory(mem_n, mem_d, mv, True)
            row["torch_unfused"] = torch_memory(mem_n, mem_d, mv, False)
        mem.append(row)
    title = f"V = {v}, Zipf(1.1) labels, batch {n}"
    png = plot(args.out, curves, mem, title)

    def mib(b):
        return "" if b is None else f"{b / 2**20:.1f}"

    lines = [f"Loss curves: {steps} Adam steps, V = {v}; largest relative gap fused vs unfused: "
             + ", ".join(f"{k} {g:.1e}" for k, g in gaps.items()), "",
             f"Peak extra memory of one loss step, N = {mem_n}, D = {mem_d}, float32 (MiB):", "",
             "| V | logits | JAX fused | JAX unfused | torch fused | torch unfused |", "|---|---|---|---|---|---|"]
    for m in mem:
        lines.append(f"| {m['v']} | {mib(4 * mem_n * m['v'])} | {mib(m['jax_fused'])} | {mib(m['jax_unfused'])} | "
                     f"{mib(m['torch_fused'])} | {mib(m['torch_unfused'])} |")
    table = "\n".join(lines) + "\n"
    (args.out / "vocabulary_scale.md").write_text(table)
    print(table)
    return dict(curves=curves, gaps=gaps, memory=mem, png=png)


if __name__ == "__main__":
    main()
