"""A RetinaNet-style dense classifier in Flax NNX: the focal-loss ablation of Lin et al. 2017, in miniature.

Procedural scenes (no download): 96x96 grayscale images with zero to two small filled shapes of
three classes (square, disc, cross) among look-alike clutter (hollow frames and rings, line
segments, noise). A small conv backbone (four 3x3 convolutions with GroupNorm and ReLU) reaches a
stride-4 feature map; every position carries 9 anchors (3 scales x 3 aspect ratios), and a 3x3
classification conv gives one sigmoid logit per anchor and class. Anchors are labelled as in the
paper: positive (the object's class) when their IoU with an object is at least 0.5, background when
their largest IoU is below 0.4, ignored in between (``where=`` keeps them out of the loss and of the
normalizer). About one anchor in a thousand is positive; the script measures and prints the ratio.

Every run trains the same network with the same optimizer for the same number of steps, starting
from the paper's prior initialisation of the classification bias (pi = 0.01). The loss is
``focal_jax.sigmoid_focal_loss(..., reduction="sum") / focal_jax.positive_normalizer(...)``: the
sum over anchors divided by the number of positive anchors. As in the paper's Table 1a/1b, the
runs are alpha-balanced cross-entropy (gamma = 0) for alpha in {0.25, 0.5, 0.75}, and focal loss for
gamma in {0.5, 1, 2, 5} with the paper's alpha for each (0.5, 0.25, 0.25, 0.25). Runs with the same
seed share their initial weights and their batches. The metric is anchor-level average precision on
held-out scenes: for each class, the anchors that are not ignored are ranked by that class's score
(positives: anchors labelled with that class); the table gives the mean over the three classes,
mean ± std over seeds.

The second figure is the paper's Figure 4: the trained gamma = 2 model's logits (first seed) on held-out
scenes, scored with the focal loss at gamma in {0, 0.5, 1, 2} (no alpha), and the cumulative share of
the loss against the fraction of samples, sorted by loss, separately for positive and negative
samples. A sample is one binary prediction: the true class's output of a positive anchor, or any
class output of a background anchor.

Run:  python examples/dense_detection.py            (2-3 minutes on 2 CPU cores)
      python examples/dense_detection.py --quick    (a few steps, one seed, two runs; for CI)

Reference: T.-Y. Lin, P. Goyal, R. Girshick, K. He, P. Dollár, "Focal Loss for Dense Object
Detection", ICCV 2017, arXiv:1708.02002, Table 1a/1b and Figure 4.
"""

from __future__ import annotations

import argparse
import functools
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import focal_jax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "figures"
CLASSES = ("square", "disc", "cross")
BACKGROUND = -1  # anchor label: max IoU < NEGATIVE_IOU
IGNORE = -2  # anchor label: NEGATIVE_IOU <= max IoU < POSITIVE_IOU
POSITIVE_IOU = 0.5
NEGATIVE_IOU = 0.4
PRIOR = 0.01  # the paper's pi: every anchor starts with a foreground probability of about 0.01

IMAGE_SIZE = 96
STRIDE = 4
ANCHOR_SIZES = tuple(7.0 * 2.0 ** (k / 3) for k in range(3))  # 7, 8.8, 11.1 px: 3 scales per octave
ANCHOR_RATIOS = (0.5, 1.0, 2.0)  # height / width
OBJECT_SIDE = (6.0, 11.0)  # object bounding-box side, px
MAX_OBJECTS = 2

# (name, gamma, alpha). The paper's Table 1a picks alpha for CE from a grid; Table 1b pairs each gamma with an alpha.
FULL_CONFIGS = (
    ("CE", 0.0, 0.25), ("CE", 0.0, 0.5), ("CE", 0.0, 0.75),
    ("FL", 0.5, 0.5), ("FL", 1.0, 0.25), ("FL", 2.0, 0.25), ("FL", 5.0, 0.25),
)
QUICK_CONFIGS = (("CE", 0.0, 0.75), ("FL", 2.0, 0.25))
FIGURE4_GAMMAS = (0.0, 0.5, 1.0, 2.0)


# ----------------------------------------------------------------------------------------
# Anchors and labels (NumPy).
# ----------------------------------------------------------------------------------------


def anchor_boxes(grid: int, stride: float, sizes=ANCHOR_SIZES, ratios=ANCHOR_RATIOS) -> np.ndarray:
    """All anchors as (grid * grid * A, 4) boxes (x0, y0, x1, y1), ordered by row, column, then anchor.

    The anchor at feature position (row, col) is centred on ((col + 0.5) * stride, (row + 0.5) * stride);
    anchor ``k = i * len(ratios) + j`` has area ``sizes[i] ** 2`` and height / width ``ratios[j]``. The
    order matches the detector's output, whose (H, W, A * K) map is reshaped to (H * W * A, K).
    """
    centres = (np.arange(grid) + 0.5) * stride
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    wh = np.array([(s / math.sqrt(r), s * math.sqrt(r)) for s in sizes for r in ratios])  # (A, 2): width, height
    boxes = np.stack([cx[..., None] - wh[:, 0] / 2, cy[..., None] - wh[:, 1] / 2,
                      cx[..., None] + wh[:, 0] / 2, cy[..., None] + wh[:, 1] / 2], axis=-1)
    return boxes.reshape(-1, 4)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box in ``a`` (n, 4) with every box in ``b`` (m, 4): (n, m)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0.0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def label_anchors(anchors: np.ndarray, boxes: np.ndarray, classes: np.ndarray, *,
                  positive_iou: float = POSITIVE_IOU, negative_iou: float = NEGATIVE_IOU) -> np.ndarray:
    """One label per anchor: the class of the best-overlapping object when its IoU >= ``positive_iou``,
    ``BACKGROUND`` when the largest IoU < ``negative_iou``, ``IGNORE`` in between. Returns int8 (n_anchors,)."""
    labels = np.full(len(anchors), BACKGROUND, np.int8)
    if len(boxes) == 0:
        return labels
    iou = box_iou(anchors, boxes)
    best = iou.argmax(axis=1)
    best_iou = iou[np.arange(len(anchors)), best]
    labels[best_iou >= negative_iou] = IGNORE
    positive = best_iou >= positive_iou
    labels[positive] = np.asarray(classes)[best[positive]]
    return labels


# ----------------------------------------------------------------------------------------
# Scenes (NumPy).
# ----------------------------------------------------------------------------------------


def _shape_mask(kind: str, cx: float, cy: float, side: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Pixels (centres at integer + 0.5) covered by a shape whose bounding box is ``side`` wide around (cx, cy)."""
    dx, dy, half = np.abs(xx - cx), np.abs(yy - cy), side / 2
    if kind == "square":
        return (dx <= half) & (dy <= half)
    if kind == "disc":
        return dx ** 2 + dy ** 2 <= half ** 2
    if kind == "cross":
        arm = side / 6
        return ((dx <= half) & (dy <= arm)) | ((dy <= half) & (dx <= arm))
    if kind == "frame":  # a hollow square: clutter that looks like a square from afar
        return (dx <= half) & (dy <= half) & ((dx > half - 1.5) | (dy > half - 1.5))
    if kind == "ring":  # a hollow disc
        r2 = dx ** 2 + dy ** 2
        return (r2 <= half ** 2) & (r2 > (half - 1.5) ** 2)
    raise ValueError(f"unknown shape {kind!r}")


def render_scene(rng: np.random.Generator, size: int = IMAGE_SIZE, max_objects: int = MAX_OBJECTS):
    """One scene: image (size, size) float32, object boxes (n, 4) and classes (n,) int, n in 0..max_objects."""
    yy, xx = np.mgrid[:size, :size] + 0.5
    image = 0.15 * rng.standard_normal((size, size))
    image += rng.uniform(-0.2, 0.2) * (xx / size - 0.5) + rng.uniform(-0.2, 0.2) * (yy / size - 0.5)
    for _ in range(rng.integers(2, 5)):  # line segments
        x0, y0 = rng.uniform(0, size, 2)
        angle, length = rng.uniform(0, np.pi), rng.uniform(8, 30)
        t = np.linspace(0.0, 1.0, 60)
        px = np.clip((x0 + t * length * np.cos(angle)).astype(int), 0, size - 1)
        py = np.clip((y0 + t * length * np.sin(angle)).astype(int), 0, size - 1)
        image[py, px] += rng.uniform(0.3, 0.8)
    n_objects = int(rng.integers(0, max_objects + 1))
    kinds = [CLASSES[c] for c in rng.integers(0, len(CLASSES), n_objects)]
    kinds += ["frame" if rng.random() < 0.5 else "ring" for _ in range(rng.integers(1, 4))]
    placed: list[np.ndarray] = []
    boxes, classes = [], []
    for kind in kinds:
        for _ in range(50):  # rejection sampling: shapes do not touch
            side = rng.uniform(*OBJECT_SIDE)
            cx, cy = rng.uniform(side / 2 + 1, size - side / 2 - 1, 2)
            box = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
            grown = box + np.array([-2, -2, 2, 2])
            if all(box_iou(grown, p)[0, 0] == 0 for p in placed):
                break
        else:
            continue
        placed.append(box)
        image[_shape_mask(kind, cx, cy, side, xx, yy)] += rng.uniform(0.5, 1.0)
        if kind in CLASSES:
            boxes.append(box)
            classes.append(CLASSES.index(kind))
    return image.astype(np.float32), np.array(boxes).reshape(-1, 4), np.array(classes, int)


def make_scenes(n: int, rng: np.random.Generator, anchors: np.ndarray, size: int = IMAGE_SIZE):
    """``n`` scenes: images (n, size, size, 1) float32 and anchor labels (n, n_anchors) int8."""
    images = np.empty((n, size, size, 1), np.float32)
    labels = np.empty((n, len(anchors)), np.int8)
    for i in range(n):
        image, boxes, classes = render_scene(rng, size)
        images[i, ..., 0] = image
        labels[i] = label_anchors(anchors, boxes, classes)
    return images, labels


# ----------------------------------------------------------------------------------------
# Model, loss and training (JAX).
# ----------------------------------------------------------------------------------------


class Detector(nnx.Module):
    """Four 3x3 convolutions (GroupNorm, ReLU) to a stride-4 map, then a 3x3 classification conv:
    (B, H, W, 1) images -> (B, H/4 * W/4 * A, K) logits. ``width`` must be a multiple of 8."""

    def __init__(self, n_anchors: int, n_classes: int, width: int, *, rngs: nnx.Rngs):
        self.n_classes = n_classes
        self.conv1 = nnx.Conv(1, width // 2, (3, 3), strides=(2, 2), rngs=rngs)
        self.conv2 = nnx.Conv(width // 2, width, (3, 3), strides=(2, 2), rngs=rngs)
        self.conv3 = nnx.Conv(width, width, (3, 3), rngs=rngs)
        self.conv4 = nnx.Conv(width, width, (3, 3), kernel_dilation=(2, 2), rngs=rngs)
        self.norms = nnx.List([nnx.GroupNorm(c, num_groups=4, rngs=rngs) for c in (width // 2, width, width, width)])
        # The paper's initialisation of the final classification layer: small weights, and a bias that
        # makes every output start at the prior probability PRIOR, so that the many background anchors
        # do not swamp the loss in the first steps.
        self.classify = nnx.Conv(width, n_anchors * n_classes, (3, 3), rngs=rngs,
                                 kernel_init=nnx.initializers.normal(0.01),
                                 bias_init=nnx.initializers.constant(-math.log((1 - PRIOR) / PRIOR)))

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv, norm in zip((self.conv1, self.conv2, self.conv3, self.conv4), self.norms, strict=True):
            x = nnx.relu(norm(conv(x)))
        logits = self.classify(x)
        return logits.reshape(logits.shape[0], -1, self.n_classes)


def detection_loss(logits: jax.Array, labels: jax.Array, *, gamma: float, alpha: float | None) -> jax.Array:
    """Focal loss summed over all anchors that are not ignored, divided by the number of positive anchors.

    ``logits`` (B, N, K); ``labels`` (B, N) int: a class index, ``BACKGROUND`` or ``IGNORE``. Background
    and ignored anchors have all-zero one-hot targets; ``where`` drops the ignored ones from both the sum
    and the count of positives.
    """
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    counted = (labels != IGNORE)[..., None]
    total = focal_jax.sigmoid_focal_loss(logits, targets, gamma=gamma, alpha=alpha, where=counted, reduction="sum")
    return total / focal_jax.positive_normalizer(targets, where=counted)


def make_train_step(configs):
    """One jitted Adam step for every configuration: ``config`` (a traced int) selects the loss with
    ``lax.switch``, so the step compiles once and is reused for every run, whatever its gamma and alpha."""
    losses = [functools.partial(detection_loss, gamma=gamma, alpha=alpha) for _, gamma, alpha in configs]

    @nnx.jit
    def train_step(model: Detector, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array,
                   batch: jax.Array, config: jax.Array) -> jax.Array:
        x, y = images[batch], labels[batch].astype(jnp.int32)

        def loss_of(model: Detector) -> jax.Array:
            return jax.lax.switch(config, losses, model(x), y)

        loss, grads = nnx.value_and_grad(loss_of)(model)
        optimizer.update(model, grads)
        return loss

    return train_step


@nnx.jit
def predict(model: Detector, images: jax.Array) -> jax.Array:
    return model(images)


def predict_logits(model: Detector, images: jax.Array, chunk: int = 64) -> np.ndarray:
    """Logits (n, N, K) as float32 NumPy, in chunks of scenes."""
    return np.concatenate([np.asarray(predict(model, images[i:i + chunk])) for i in range(0, len(images), chunk)])


# ----------------------------------------------------------------------------------------
# Metrics and figures (NumPy).
# ----------------------------------------------------------------------------------------


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the precision-recall step curve, ties grouped (as scikit-learn's
    ``average_precision_score``): sum over thresholds of (R_n - R_{n-1}) P_n. NaN without positives."""
    scores = np.asarray(scores, np.float64).ravel()
    positive = np.asarray(positive, bool).ravel()
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(positive)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall_step = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(recall_step * precision))


def anchor_ap(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class AP (K,) over the anchors that are not ignored: the positives of class k are the anchors
    labelled k, everything else (background and other classes) is a negative for k."""
    counted = labels != IGNORE
    return np.array([average_precision(logits[..., k][counted], labels[counted] == k)
                     for k in range(logits.shape[-1])])


def loss_cdf(losses: np.ndarray, points: int = 1001) -> tuple[np.ndarray, np.ndarray]:
    """The paper's Figure 4 curve: losses sorted ascending, normalised to sum to one, cumulated; returned
    at ``points`` evenly spaced fractions of the samples (x in [0, 1], y from 0 to 1)."""
    losses = np.sort(np.asarray(losses, np.float64).ravel())
    cumulative = np.r_[0.0, np.cumsum(losses)] / losses.sum()
    x = np.linspace(0.0, 1.0, points)
    return x, np.interp(x * len(losses), np.arange(len(losses) + 1), cumulative)


def figure4_samples(logits: np.ndarray, labels: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Focal loss (no alpha) of each binary prediction: (positive samples, negative samples)."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    loss = np.asarray(focal_jax.sigmoid_focal_loss(jnp.asarray(logits), targets, gamma=gamma, reduction="none"))
    positive = loss[labels >= 0, labels[labels >= 0]]
    negative = loss[labels == BACKGROUND].ravel()
    return positive, negative


def config_name(kind: str, gamma: float, alpha: float) -> str:
    return f"{kind} γ={gamma:g} α={alpha:g}"


def plot_ap(out: pathlib.Path, configs, aps: np.ndarray, title: str) -> None:
    """Horizontal bars: mean anchor mAP per configuration, with the std over seeds as error bars."""
    means, stds = aps.mean(axis=1), aps.std(axis=1)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(configs) + 2.2))
    colors = ["tab:gray" if kind == "CE" else "tab:red" for kind, _, _ in configs]
    y = np.arange(len(configs))[::-1]
    ax.barh(y, means, xerr=stds, color=colors, capsize=4)
    for yi, m, s in zip(y, means, stds, strict=True):
        ax.text(m + s + 0.005, yi, f"{m:.3f} ± {s:.3f}", va="center", fontsize=9)
    ax.set_yticks(y, [config_name(*c) for c in configs])
    ax.set(xlabel=f"held-out anchor-level mAP (mean ± std over {aps.shape[1]} seed(s))",
           xlim=(0.0, min(1.0, float((means + stds).max()) + 0.15)), title=title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_figure4(out: pathlib.Path, curves: dict, counts: tuple[int, int], title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, which, n in zip(axes, ("positive", "negative"), counts, strict=True):
        for gamma, color in zip(FIGURE4_GAMMAS, ("tab:blue", "tab:green", "tab:orange", "tab:red"), strict=True):
            x, y = curves[which][gamma]
            ax.plot(x, y, color=color, label=f"γ = {gamma:g}")
        ax.set(xlabel=f"fraction of {which} samples", ylabel="cumulative normalized loss", xlim=(0, 1), ylim=(0, 1),
               title=f"{which} samples ({n:,})")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# The experiment.
# ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, one seed, two runs, for CI")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                        help="folder for the two PNGs, dense_detection_*.png (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; it picks the weights and the batches")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 300, quick 15)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate, constant")
    parser.add_argument("--width", type=int, default=24, help="channels of the backbone")
    parser.add_argument("--train-scenes", type=int, default=None, help="training scenes (default 2000, quick 64)")
    parser.add_argument("--test-scenes", type=int, default=None, help="held-out scenes (default 200, quick 32)")
    args = parser.parse_args(argv)
    if args.width < 8 or args.width % 8:
        parser.error(f"--width must be a positive multiple of 8 (GroupNorm with 4 groups), got {args.width}")
    steps = args.steps if args.steps is not None else (15 if args.quick else 300)
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    n_train = args.train_scenes if args.train_scenes is not None else (64 if args.quick else 2000)
    n_test = args.test_scenes if args.test_scenes is not None else (32 if args.quick else 200)
    configs = QUICK_CONFIGS if args.quick else FULL_CONFIGS
    seeds = list(range(args.seed, args.seed + n_seeds))
    start = time.perf_counter()

    grid = IMAGE_SIZE // STRIDE
    anchors = anchor_boxes(grid, STRIDE)
    n_anchor_shapes = len(ANCHOR_SIZES) * len(ANCHOR_RATIOS)
    # The scenes depend on --seed only; the held-out scenes come from their own stream.
    train_images, train_labels = make_scenes(n_train, np.random.default_rng([args.seed, 0]), anchors)
    test_images, test_labels = make_scenes(n_test, np.random.default_rng([args.seed, 1]), anchors)
    n_pos, n_ign = int((train_labels >= 0).sum()), int((train_labels == IGNORE).sum())
    ratio = train_labels.size / max(n_pos, 1)
    print(f"{n_train} training scenes {IMAGE_SIZE}x{IMAGE_SIZE}, {grid}x{grid} positions x {n_anchor_shapes} anchors "
          f"= {len(anchors)} anchors per scene; {n_test} held-out scenes")
    print(f"anchor labels (training scenes): positive:anchor = 1:{ratio:.0f} ({n_pos} of {train_labels.size}), "
          f"ignored {100 * n_ign / train_labels.size:.2f}%, background the rest")

    train_step = make_train_step(configs)
    tx = optax.adam(args.lr)  # one object for every run: the optimizer is part of the jitted step's cache key
    images_dev, labels_dev = jnp.asarray(train_images), jnp.asarray(train_labels)
    test_dev = jnp.asarray(test_images)
    aps = np.zeros((len(configs), n_seeds, len(CLASSES)))
    final_loss = np.zeros((len(configs), n_seeds))
    figure4_logits = None
    print(f"{len(configs)} losses x {n_seeds} seed(s), each {steps} Adam steps (lr {args.lr:g}) of {args.batch_size} "
          f"scenes, prior pi = {PRIOR}")
    bar = tqdm(total=len(configs) * n_seeds * steps, unit="step", leave=False)
    for si, seed in enumerate(seeds):
        batches = np.random.default_rng(seed).integers(0, n_train, (steps, args.batch_size))
        for ci, (kind, gamma, alpha) in enumerate(configs):
            bar.set_description(f"seed {seed} {config_name(kind, gamma, alpha)}")
            model = Detector(n_anchor_shapes, len(CLASSES), args.width, rngs=nnx.Rngs(seed))
            optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
            losses = []
            for batch in batches:
                losses.append(train_step(model, optimizer, images_dev, labels_dev, jnp.asarray(batch),
                                         jnp.asarray(ci, jnp.int32)))
                bar.update()
            final_loss[ci, si] = float(np.mean(jax.device_get(losses[-max(1, steps // 10):])))
            logits = predict_logits(model, test_dev)
            aps[ci, si] = anchor_ap(logits, test_labels)
            if si == 0 and gamma == 2.0:
                figure4_logits = logits
    bar.close()
    elapsed = time.perf_counter() - start

    mean_ap = aps.mean(axis=2)  # (configs, seeds): mAP over the classes
    ce = [i for i, c in enumerate(configs) if c[0] == "CE"]
    best_ce = max(ce, key=lambda i: mean_ap[i].mean())
    best = int(np.argmax(mean_ap.mean(axis=1)))
    print(f"\nheld-out anchor-level AP ({n_test} scenes, ignored anchors excluded; mAP = mean of the per-class APs), "
          f"mean ± std over {n_seeds} seed(s):\n")
    print("| loss | γ | α | mAP | " + " | ".join(f"AP {c}" for c in CLASSES) + " |")
    print("|---|---|---|---|" + "---|" * len(CLASSES))
    for i, (kind, gamma, alpha) in enumerate(configs):
        mark = " (best CE)" if i == best_ce else ""
        mark += " (best)" if i == best else ""
        per_class = " | ".join(f"{aps[i, :, k].mean():.3f} ± {aps[i, :, k].std():.3f}" for k in range(len(CLASSES)))
        print(f"| {kind}{mark} | {gamma:g} | {alpha:g} | {mean_ap[i].mean():.3f} ± {mean_ap[i].std():.3f} "
              f"| {per_class} |")
    fl = [i for i, c in enumerate(configs) if c[0] == "FL"]
    fl2 = next((i for i in fl if configs[i][1] == 2.0), None)
    if fl2 is not None:
        gap = mean_ap[fl2] - mean_ap[best_ce]  # paired: same seeds, same initial weights, same batches
        print(f"\n{config_name(*configs[fl2])} minus the best CE (α={configs[best_ce][2]:g}), paired by seed: "
              f"{gap.mean():+.3f} ± {gap.std():.3f} mAP ({int((gap > 0).sum())} of {n_seeds} seed(s) better)")
    print(f"trained {len(configs) * n_seeds} models x {steps} steps in {elapsed:.1f} s (incl. data and compile)")

    args.out.mkdir(parents=True, exist_ok=True)
    ap_png = args.out / "dense_detection_ap.png"
    cdf_png = args.out / "dense_detection_loss_cdf.png"
    plot_ap(ap_png, configs, mean_ap,
            f"{IMAGE_SIZE}x{IMAGE_SIZE} scenes, 1 positive per {ratio:.0f} anchors, {steps} steps x "
            f"{args.batch_size} scenes")
    curves = {"positive": {}, "negative": {}}
    shares = {}
    for gamma in FIGURE4_GAMMAS:
        positive, negative = figure4_samples(figure4_logits, test_labels, gamma)
        curves["positive"][gamma], curves["negative"][gamma] = loss_cdf(positive), loss_cdf(negative)
        top = np.sort(negative)[::-1][:max(1, len(negative) // 100)]
        shares[gamma] = float(top.sum() / negative.sum())
    plot_figure4(cdf_png, curves, (len(positive), len(negative)),
                 f"cumulative loss of the γ=2 model (seed {args.seed}, {steps} steps) scored at several γ")
    print("share of the negatives' loss carried by the hardest 1% of negatives: "
          + ", ".join(f"γ={g:g}: {s:.3f}" for g, s in shares.items()))
    print(f"wrote {ap_png}\nwrote {cdf_png}")
    return {"positive_ratio": 1.0 / ratio, "configs": configs, "ap": aps, "mean_ap": mean_ap,
            "final_loss": final_loss, "negative_share_top1": shares, "out": [str(ap_png), str(cdf_png)]}


if __name__ == "__main__":
    main()
