"""The focal family against p_t, drawn by both backends: asymmetric, quality focal and varifocal losses at
their default settings, the focal loss's own variants (Poly-1 with ε₁ = 1, the reduced focal loss with a
threshold of 0.5, FLSD-53's scheduled γ), with the focal loss (γ = 2) and the cross-entropy for comparison.

Each variant treats positives and negatives differently, so the figure has one panel for a positive
(t = 1, p_t = σ(x)) and one for a negative (t = 0, p_t = 1 - σ(x)). Every loss is evaluated by
``focal_jax`` (lines) and ``focal_torch`` (markers) with ``reduction="none"`` on the same float32
logits. The script prints the largest difference between the two backends, and each backend's largest
difference from the float64 references of ``focal_spec``. No training: it runs in a few seconds.

What the panels show:

- ASL (γ₊ = 0, γ₋ = 4, m = 0.05): the cross-entropy on positives; on negatives, p_m^4 (-log(1 - p_m))
  with p_m = max(σ(x) - m, 0), exactly 0 for easy negatives (p_t >= 0.95).
- QFL (β = 2): with hard targets, the focal loss with γ = 2 on both sides.
- VFL (α = 0.75, γ = 2): the cross-entropy weighted by q = 1 on positives; 0.75 σ(x)^2 times the
  cross-entropy on negatives.
- Poly-1 (ε₁ = 1, γ = 2): the focal loss plus (1 - p_t)^3, which lifts the loss of hard examples.
- Reduced focal loss (threshold 0.5, γ = 2): the cross-entropy below p_t = 0.5, ((1 - p_t)/0.5)^2 times it
  above (continuous at the threshold).
- FLSD-53: γ = 5 below p_t = 0.2 and 3 above (a step in the curve at p_t = 0.2).

Run:  python examples/family_curve.py

References: Ridnik et al. 2021 (arXiv:2009.14119), Li et al. 2020 (arXiv:2006.04388), Zhang et al. 2021
(arXiv:2008.13367), Lin et al. 2017 (arXiv:1708.02002), Leng et al. 2022 (arXiv:2204.12511), Sergievskiy and
Ponamarev 2019 (arXiv:1903.01347), Mukhoti et al. 2020 (arXiv:2002.09437).
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
from focal_jax import _family as jax_family
from focal_torch import _family as torch_family

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "figures" / "family_curve.png"

# name: (label, JAX function, torch function, float64 reference, keyword arguments), defaults unless stated
CURVES = {
    "cross_entropy": ("cross-entropy", focal_jax.sigmoid_focal_loss, focal_torch.sigmoid_focal_loss,
                      focal_spec.reference.sigmoid_focal_loss, {"gamma": 0.0}),
    "focal": ("focal loss, γ = 2", focal_jax.sigmoid_focal_loss, focal_torch.sigmoid_focal_loss,
              focal_spec.reference.sigmoid_focal_loss, {"gamma": 2.0}),
    "asymmetric": ("ASL (γ₊=0, γ₋=4, m=0.05)", jax_family.asymmetric_loss, torch_family.asymmetric_loss,
                   focal_spec.variants.asymmetric_loss, {}),
    "quality_focal": ("QFL (β=2)", jax_family.quality_focal_loss, torch_family.quality_focal_loss,
                      focal_spec.variants.quality_focal_loss, {}),
    "varifocal": ("VFL (α=0.75, γ=2)", jax_family.varifocal_loss, torch_family.varifocal_loss,
                  focal_spec.variants.varifocal_loss, {}),
    "poly1": ("Poly-1 (ε₁=1, γ=2)", focal_jax.sigmoid_focal_loss, focal_torch.sigmoid_focal_loss,
              focal_spec.reference.sigmoid_focal_loss, {"gamma": 2.0, "poly1": 1.0}),
    "reduced": ("reduced FL (th=0.5, γ=2)", focal_jax.sigmoid_focal_loss, focal_torch.sigmoid_focal_loss,
                focal_spec.reference.sigmoid_focal_loss, {"gamma": 2.0, "reduced_threshold": 0.5}),
    "flsd53": ("FLSD-53 (γ=5 below p_t=0.2, else 3)", focal_jax.sigmoid_focal_loss, focal_torch.sigmoid_focal_loss,
               focal_spec.reference.sigmoid_focal_loss, {"gamma": focal_spec.FLSD_53}),
}
# line styles that stay visible where curves coincide (on positives ASL = VFL = CE and QFL = FL)
STYLE = {"cross_entropy": ("tab:gray", "-", 4.0), "focal": ("tab:blue", "-", 4.0), "asymmetric": ("tab:red", "--", 2.0),
         "quality_focal": ("tab:green", ":", 2.5), "varifocal": ("tab:purple", "-.", 1.5),
         "poly1": ("tab:orange", "-", 1.5), "reduced": ("tab:brown", "--", 1.5), "flsd53": ("tab:olive", "-", 1.5)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer points (the full run is already fast)")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="PNG path (default: %(default)s)")
    parser.add_argument("--points", type=int, default=None, help="points on the p_t axis (default 999, quick 99)")
    args = parser.parse_args(argv)
    n = args.points if args.points is not None else (99 if args.quick else 999)

    # midpoints of n equal cells: the open interval (the logit of 0 or 1 is infinite), and off FLSD-53's step
    # at p_t = 0.2, where float32 rounding of the logit decides the side
    p_t = (np.arange(n) + 0.5) / n
    logit = np.log(p_t / (1.0 - p_t))
    sides = {"positive": (logit.astype(np.float32), np.ones(n, np.float32)),
             "negative": ((-logit).astype(np.float32), np.zeros(n, np.float32))}

    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    max_diff, ref_diff = 0.0, {"jax": 0.0, "torch": 0.0}
    for name, (_, jax_fn, torch_fn, reference, kwargs) in CURVES.items():
        curves[name] = {}
        for side, (x, t) in sides.items():
            jax_loss = np.asarray(jax_fn(jnp.asarray(x), jnp.asarray(t), reduction="none", **kwargs))
            torch_loss = torch_fn(torch.from_numpy(x), torch.from_numpy(t), reduction="none", **kwargs).numpy()
            expected, _ = reference(x, t, reduction="none", **kwargs)
            curves[name][side] = (jax_loss, torch_loss)
            max_diff = max(max_diff, float(np.max(np.abs(jax_loss.astype(np.float64) - torch_loss))))
            ref_diff["jax"] = max(ref_diff["jax"], float(np.max(np.abs(jax_loss - expected))))
            ref_diff["torch"] = max(ref_diff["torch"], float(np.max(np.abs(torch_loss - expected))))
        pos, neg = curves[name]["positive"][0], curves[name]["negative"][0]
        print(f"{name:<14} at p_t = 0.5: positive {pos[n // 2]:.6f}, negative {neg[n // 2]:.6f}")
    print(f"largest |jax - torch| over {len(CURVES)} losses x 2 sides x {n} points (float32): {max_diff:.3g}")
    print(f"largest difference from the float64 reference: jax {ref_diff['jax']:.3g}, torch {ref_diff['torch']:.3g}")

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    every = max(1, n // 25)
    for ax, side in zip(axes, sides, strict=True):
        for name, (label, *_rest) in CURVES.items():
            color, line, width = STYLE[name]
            jax_loss, torch_loss = curves[name][side]
            ax.plot(p_t, jax_loss, color=color, linestyle=line, linewidth=width, label=label,
                    alpha=0.6 if width > 3 else 1.0)
            ax.plot(p_t[::every], torch_loss[::every], linestyle="none", marker="o", markersize=4,
                    markerfacecolor="none", markeredgecolor=color, markeredgewidth=0.8)
        ax.plot([], [], linestyle="none", marker="o", markerfacecolor="none", markeredgecolor="black",
                label="PyTorch (markers)")
        target = "t = 1, p_t = σ(x): ASL = VFL = CE, QFL = FL" if side == "positive" else "t = 0, p_t = 1 - σ(x)"
        ax.set(xlim=(0, 1), ylim=(0, 5), xlabel="probability of the ground truth ($p_t$)",
               title=f"{side} ({target})")
        ax.legend(loc="upper right")
    axes[0].set_ylabel("loss")
    fig.suptitle(f"the focal family, JAX (lines) and PyTorch (markers); max |diff| = {max_diff:.1e}")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f"wrote {args.out}")
    return {"curves": curves, "max_abs_diff": max_diff, "max_abs_diff_from_reference": ref_diff, "out": str(args.out)}


if __name__ == "__main__":
    main()
