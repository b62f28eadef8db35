"""Train a Flax NNX classifier on a heavily imbalanced task, with cross-entropy and with focal loss.

The data is scikit-learn's bundled digits set (no download). One digit is the positive class;
positives are subsampled to about 2% of the examples, then the examples are split into a training
and a held-out set, stratified on the label. The same MLP, from the same initial weights and with
the same batches, is trained twice for the same number of steps: once with plain binary
cross-entropy (``optax.sigmoid_binary_cross_entropy``) and once with
``focal_jax.sigmoid_focal_loss`` (gamma=2, alpha=None by default). The script prints average
precision and minority-class recall (threshold 0.5) on the held-out set, and saves the
precision-recall curves and the training-loss curves as one PNG.

Run:  python examples/flax_train.py            (about a minute on 2 CPU cores)
      python examples/flax_train.py --quick    (a few steps, for CI)
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.metrics import average_precision_score, precision_recall_curve, recall_score
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import focal_jax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "figures" / "flax_train.png"


class MLP(nnx.Module):
    """64 pixels -> two hidden ReLU layers -> one logit."""

    def __init__(self, din: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden1 = nnx.Linear(din, hidden, rngs=rngs)
        self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.hidden1(x))
        x = nnx.relu(self.hidden2(x))
        return self.out(x)[..., 0]


def make_data(digit: int, positive_fraction: float, test_size: float, seed: int):
    """Digits as 64 features in [0, 1]; label 1 for ``digit``, positives subsampled to ``positive_fraction``."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = (y == digit).astype(np.float32)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n_pos = max(2, round(positive_fraction * len(neg) / (1.0 - positive_fraction)))
    keep = np.concatenate([neg, rng.choice(pos, size=n_pos, replace=False)])
    return train_test_split(x[keep], y[keep], test_size=test_size, stratify=y[keep], random_state=seed)


def bce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


def make_focal_loss(gamma: float, alpha: float | None):
    def focal_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
        return focal_jax.sigmoid_focal_loss(logits, labels, gamma=gamma, alpha=alpha)

    return focal_loss


@nnx.jit(static_argnames="loss_fn")
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array, loss_fn) -> jax.Array:
    """One Adam step on ``loss_fn(model(x), y)``; returns the loss before the step."""

    def loss_of(model: MLP) -> jax.Array:
        return loss_fn(model(x), y)

    loss, grads = nnx.value_and_grad(loss_of)(model)
    optimizer.update(model, grads)
    return loss


def train(loss_fn, x_train, y_train, *, steps: int, batch_size: int, lr: float, hidden: int, seed: int, desc: str):
    """Trains a fresh MLP with ``loss_fn``; the initial weights and the batch order depend only on ``seed``."""
    model = MLP(x_train.shape[1], hidden, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in tqdm(range(steps), desc=desc, unit="step", leave=False):
        idx = rng.choice(len(x_train), size=batch_size, replace=False)
        losses.append(train_step(model, optimizer, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]), loss_fn))
    return model, np.asarray(jax.device_get(losses))


def evaluate(model: MLP, x, y) -> tuple[dict[str, float], np.ndarray]:
    scores = np.asarray(jax.nn.sigmoid(model(jnp.asarray(x))))
    metrics = {
        "average_precision": float(average_precision_score(y, scores)),
        "recall": float(recall_score(y, scores >= 0.5, zero_division=0.0)),
    }
    return metrics, scores


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot(out: pathlib.Path, y_test, scores: dict, losses: dict, metrics: dict, title: str) -> None:
    fig, (ax_pr, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, color in zip(scores, ("tab:blue", "tab:red"), strict=True):
        precision, recall, _ = precision_recall_curve(y_test, scores[name])
        m = metrics[name]
        ax_pr.step(recall, precision, where="post", color=color,
                   label=f"{name}: AP={m['average_precision']:.3f}, recall@0.5={m['recall']:.3f}")
        curve = losses[name]
        window = max(1, len(curve) // 50)
        ax_loss.plot(np.arange(window, len(curve) + 1), smooth(curve, window), color=color, label=name)
    ax_pr.axhline(float(np.mean(y_test)), color="gray", linestyle=":", label="chance (positive rate)")
    ax_pr.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.05), title="held-out precision-recall")
    ax_pr.legend(loc="lower left", fontsize=8)
    ax_loss.set(xlabel="step", ylabel="training loss (moving average)", yscale="log",
                title="training loss (each on its own scale)")
    ax_loss.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps and one seed, for CI")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="PNG path (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; it picks the data split, weights and batches")
    parser.add_argument("--repeats", type=int, default=None,
                        help="seeds seed, seed+1, ... to average over (default 10, quick 1); the PNG shows the first")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default 1500, quick 20)")
    parser.add_argument("--digit", type=int, default=8, help="the positive class")
    parser.add_argument("--positive-fraction", type=float, default=0.02)
    parser.add_argument("--gamma", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=None, help="focal alpha (default: None, no alpha weighting)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (20 if args.quick else 1500)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 10)

    # Created once, so that the jitted train step compiles once per loss, not once per seed.
    loss_fns = {"cross-entropy": bce_loss, "focal": make_focal_loss(args.gamma, args.alpha)}
    print(f"focal loss: gamma={args.gamma:g}, alpha={args.alpha}; {steps} steps of batch {args.batch_size}, "
          f"Adam lr={args.lr:g}, seeds {args.seed}..{args.seed + repeats - 1}")
    per_seed = {name: [] for name in loss_fns}
    shown = {"scores": {}, "losses": {}, "metrics": {}}
    start = time.perf_counter()
    for seed in range(args.seed, args.seed + repeats):
        x_train, x_test, y_train, y_test = make_data(args.digit, args.positive_fraction, 0.4, seed)
        print(f"seed {seed}: digit {args.digit} vs rest, train {len(y_train)} ({int(y_train.sum())} positive), "
              f"held-out {len(y_test)} ({int(y_test.sum())} positive)")
        for name, loss_fn in loss_fns.items():
            model, loss_curve = train(loss_fn, x_train, y_train, steps=steps, batch_size=args.batch_size, lr=args.lr,
                                      hidden=64, seed=seed, desc=f"seed {seed} {name}")
            metrics, scores = evaluate(model, x_test, y_test)
            per_seed[name].append(metrics)
            print(f"  {name:>13}: average precision {metrics['average_precision']:.3f}, "
                  f"minority recall@0.5 {metrics['recall']:.3f}")
            if seed == args.seed:  # the first seed's run is the one drawn
                shown["y_test"] = y_test
                shown["scores"][name], shown["losses"][name], shown["metrics"][name] = scores, loss_curve, metrics
    elapsed = time.perf_counter() - start

    summary = {}
    print(f"held-out, mean ± std over {repeats} seed(s):")
    for name, runs in per_seed.items():
        ap = np.array([m["average_precision"] for m in runs])
        rec = np.array([m["recall"] for m in runs])
        summary[name] = {"average_precision": float(ap.mean()), "recall": float(rec.mean()),
                         "average_precision_std": float(ap.std()), "recall_std": float(rec.std())}
        print(f"  {name:>13}: average precision {ap.mean():.3f} ± {ap.std():.3f}, "
              f"minority recall@0.5 {rec.mean():.3f} ± {rec.std():.3f}")
    print(f"trained {2 * repeats} models x {steps} steps in {elapsed:.1f} s")

    plot(args.out, shown["y_test"], shown["scores"], shown["losses"], shown["metrics"],
         f"digits: {args.digit} vs rest, {100 * args.positive_fraction:g}% positives, {steps} steps, seed {args.seed}; "
         f"focal gamma={args.gamma:g}, alpha={args.alpha}")
    print(f"wrote {args.out}")
    return {"cross_entropy": summary["cross-entropy"], "focal": summary["focal"], "per_seed": per_seed,
            "out": str(args.out)}


if __name__ == "__main__":
    main()
