"""Segment a rare small-object class with a tiny conv net: cross-entropy against focal loss, in PyTorch.

Written the way users of the original ``SegmentationFocalLoss`` write a training script: the net
outputs (B, C, H, W) logits, the teacher is one-hot (B, C, H, W), and the criterion is
``focal_torch.SegmentationFocalLoss(gamma=2, weights=[...])``. The images are generated on the fly,
so nothing is downloaded: 32x32 noisy backgrounds, large faint blobs (class 1, about a quarter of
the pixels), and a few small bright squares (class 2, about 2% of the pixels). The same net, from the
same initial weights and with the same batches, is trained once with ``nn.CrossEntropyLoss`` and once
with the focal loss; both get the same class weights, so the loss is the only difference. The script
prints per-class IoU on held-out images for both and saves a PNG grid of input, ground truth and the
two predictions.

Run:  python examples/torch_segmentation.py            (about a minute on 2 CPU cores)
      python examples/torch_segmentation.py --quick    (a few steps, for CI)
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import time

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import focal_torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "figures" / "torch_segmentation.png"
CLASSES = ("background", "blob", "small object")
WEIGHTS = [1.0, 2.0, 4.0]  # per class, rarer classes weigh more; used by both losses
COLORS = ListedColormap(["#202020", "#4c9be8", "#f5a623"])


def make_images(n: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy grayscale images (n, 1, size, size) and their class maps (n, size, size), int64."""
    images = np.zeros((n, 1, size, size), np.float32)
    labels = np.zeros((n, size, size), np.int64)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        for _ in range(rng.integers(1, 3)):  # one or two large, faint ellipses
            cy, cx = rng.uniform(4, size - 4, 2)
            ry, rx = rng.uniform(4, 9, 2)
            labels[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
        for _ in range(rng.integers(1, 4)):  # one to three small, bright squares, anywhere
            side = rng.integers(2, 4)
            y0, x0 = rng.integers(0, size - side, 2)
            labels[i, y0:y0 + side, x0:x0 + side] = 2
    images[:, 0] = np.choose(labels, [0.0, 0.6, 1.2]) + rng.normal(0.0, 0.45, labels.shape)
    return torch.from_numpy(images), torch.from_numpy(labels)


class TinySegNet(nn.Module):
    """Four convolutions; dilations give a 15-pixel receptive field with 16 channels throughout."""

    def __init__(self, n_classes: int, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=4, dilation=4), nn.ReLU(),
            nn.Conv2d(width, n_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def train(net: nn.Module, loss_name: str, criterion: nn.Module, images, labels, *, steps: int, batch_size: int,
          lr: float, seed: int) -> list[float]:
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)  # the same batches for both losses
    losses = []
    net.train()
    for _ in tqdm(range(steps), desc=loss_name, unit="step"):
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        x, y = images[idx], labels[idx]
        pred = net(x)  # (B, C, H, W) logits
        if loss_name == "focal":
            teacher = F.one_hot(y, len(CLASSES)).permute(0, 3, 1, 2).float()  # one-hot (B, C, H, W)
            loss = criterion(pred, teacher)
        else:
            loss = criterion(pred, y)  # nn.CrossEntropyLoss takes class indices (B, H, W)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def predict(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    net.eval()
    return net(images).argmax(1)  # argmax of the logits: the same class for softmax and per-class sigmoid


def iou_per_class(pred: torch.Tensor, labels: torch.Tensor, n_classes: int) -> list[float]:
    ious = []
    for c in range(n_classes):
        inter = ((pred == c) & (labels == c)).sum().item()
        union = ((pred == c) | (labels == c)).sum().item()
        ious.append(inter / union if union else float("nan"))
    return ious


def plot(out: pathlib.Path, images, labels, preds: dict, ious: dict, title: str, rows: int = 4) -> None:
    columns = ["input", "ground truth"] + [f"{name} (small-object IoU {ious[name][2]:.2f})" for name in preds]
    fig, axes = plt.subplots(rows, len(columns), figsize=(3 * len(columns), 3 * rows), squeeze=False)
    for r in range(rows):
        panels = [images[r, 0].numpy(), labels[r].numpy()] + [p[r].numpy() for p in preds.values()]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            if c == 0:
                ax.imshow(panel, cmap="gray")
            else:
                ax.imshow(panel, cmap=COLORS, vmin=0, vmax=len(CLASSES) - 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS(i)) for i in range(len(CLASSES))]
    fig.legend(handles, CLASSES, loc="lower center", ncol=len(CLASSES))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, for CI")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="PNG path (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default 1500, quick 5)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--gamma", type=float, default=2.0)
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (5 if args.quick else 1500)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train_images, train_labels = make_images(64 if args.quick else 1024, 32, rng)
    test_images, test_labels = make_images(32 if args.quick else 256, 32, rng)
    share = torch.bincount(train_labels.flatten(), minlength=len(CLASSES)).double() / train_labels.numel()
    print("training pixels per class: " + ", ".join(f"{n} {100 * s:.1f}%" for n, s in zip(CLASSES, share, strict=True)))
    print(f"class weights {WEIGHTS} for both losses; focal gamma={args.gamma:g}")

    criteria = {
        "cross-entropy": nn.CrossEntropyLoss(weight=torch.tensor(WEIGHTS)),
        "focal": focal_torch.SegmentationFocalLoss(gamma=args.gamma, weights=WEIGHTS),
    }
    initial = TinySegNet(len(CLASSES))  # both nets start from these weights
    preds, ious, curves = {}, {}, {}
    start = time.perf_counter()
    for name, criterion in criteria.items():
        net = copy.deepcopy(initial)
        curves[name] = train(net, name, criterion, train_images, train_labels, steps=steps,
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        preds[name] = predict(net, test_images)
        ious[name] = iou_per_class(preds[name], test_labels, len(CLASSES))
    elapsed = time.perf_counter() - start

    print(f"held-out IoU ({len(test_images)} images):")
    print(f"  {'':>13}  " + "  ".join(f"{c:>12}" for c in CLASSES) + "          mean")
    for name, values in ious.items():
        print(f"  {name:>13}  " + "  ".join(f"{v:12.3f}" for v in values) + f"  {np.nanmean(values):12.3f}")
    print(f"trained 2 x {steps} steps in {elapsed:.1f} s")
    plot(args.out, test_images, test_labels, preds, ious,
         f"held-out images, {steps} steps, seed {args.seed}, weights {WEIGHTS}")
    print(f"wrote {args.out}")
    return {
        "iou": {name.replace("-", "_"): dict(zip(CLASSES, values, strict=True)) for name, values in ious.items()},
        "final_loss": {name.replace("-", "_"): curve[-1] for name, curve in curves.items()},
        "out": str(args.out),
    }


if __name__ == "__main__":
    main()
