"""Figure 1 of Lin et al. 2017, drawn by both backends: focal loss against p_t for several gamma.

For a target of 1, p_t = p = σ(x), so the logits x = log(p / (1 - p)) trace the loss as a function
of p_t. Both ``focal_jax.sigmoid_focal_loss`` and ``focal_torch.sigmoid_focal_loss`` are evaluated
with ``reduction="none"`` on the same float32 logits; the JAX values are drawn as lines, the PyTorch
values as markers on the same axes. The script prints the largest absolute difference between the
two backends, and each backend's largest difference from the float64 NumPy reference in
``focal_spec``. No training: it runs in a few seconds.

Run:  python examples/focal_curve.py

Reference: T.-Y. Lin, P. Goyal, R. Girshick, K. He, P. Dollár, "Focal Loss for Dense Object
Detection", ICCV 2017, arXiv:1708.02002, Figure 1.
"""

from __future__ import annotations

import argparse
import pathlib

import jax.numpy as jnp
import matplotlib
import numpy as np
import torch

import focal_jax
import focal_spec
import focal_torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "figures" / "focal_curve.png"
GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer points (the full run is already fast)")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="PNG path (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="unused: the curve is deterministic")
    parser.add_argument("--points", type=int, default=None, help="points on the p_t axis (default 999, quick 99)")
    args = parser.parse_args(argv)
    n = args.points if args.points is not None else (99 if args.quick else 999)

    p_t = np.linspace(0.0, 1.0, n + 2)[1:-1]  # open interval: the logit of 0 or 1 is infinite
    logits = np.log(p_t / (1.0 - p_t)).astype(np.float32)
    targets = np.ones_like(logits)

    curves, max_diff, ref_diff = {}, 0.0, {"jax": 0.0, "torch": 0.0}
    for gamma in GAMMAS:
        jax_loss = np.asarray(focal_jax.sigmoid_focal_loss(
            jnp.asarray(logits), jnp.asarray(targets), gamma=gamma, reduction="none"))
        torch_loss = focal_torch.sigmoid_focal_loss(
            torch.from_numpy(logits), torch.from_numpy(targets), gamma=gamma, reduction="none").numpy()
        reference, _ = focal_spec.reference.sigmoid_focal_loss(logits, targets, gamma=gamma, reduction="none")
        curves[gamma] = (jax_loss, torch_loss)
        diff = float(np.max(np.abs(jax_loss.astype(np.float64) - torch_loss.astype(np.float64))))
        max_diff = max(max_diff, diff)
        ref_diff["jax"] = max(ref_diff["jax"], float(np.max(np.abs(jax_loss - reference))))
        ref_diff["torch"] = max(ref_diff["torch"], float(np.max(np.abs(torch_loss - reference))))
        print(f"gamma={gamma:<4g} loss at p_t=0.5: {jax_loss[n // 2]:.6f} (jax) {torch_loss[n // 2]:.6f} (torch); "
              f"max |jax - torch| = {diff:.3g}")
    print(f"largest |jax - torch| over {len(GAMMAS)} gammas x {n} points (float32): {max_diff:.3g}")
    print(f"largest difference from the float64 reference: jax {ref_diff['jax']:.3g}, torch {ref_diff['torch']:.3g}")

    fig, ax = plt.subplots(figsize=(7, 5))
    every = max(1, n // 25)
    for gamma, color in zip(GAMMAS, ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:cyan"), strict=True):
        jax_loss, torch_loss = curves[gamma]
        ax.plot(p_t, jax_loss, color=color, linewidth=2, label=f"γ = {gamma:g}")
        ax.plot(p_t[::every], torch_loss[::every], linestyle="none", marker="o", markersize=5,
                markerfacecolor="none", markeredgecolor="black", markeredgewidth=0.8)
    ax.plot([], [], linestyle="none", marker="o", markerfacecolor="none", markeredgecolor="black",
            label="PyTorch (markers)")
    ax.annotate("", xy=(1.0, 1.0), xytext=(0.6, 1.0), arrowprops={"arrowstyle": "<->", "color": "gray"})
    ax.text(0.8, 1.1, "well-classified\nexamples", ha="center", va="bottom", color="gray")
    ax.set(xlim=(0, 1), ylim=(0, 5), xlabel="probability of ground truth class ($p_t$)", ylabel="loss",
           title=f"focal loss, JAX (lines) and PyTorch (markers); max |diff| = {max_diff:.1e}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f"wrote {args.out}")
    return {"max_abs_diff": max_diff, "max_abs_diff_from_reference": ref_diff, "out": str(args.out)}


if __name__ == "__main__":
    main()
