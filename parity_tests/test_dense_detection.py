"""The dense-detection example: anchor geometry and labelling on hand-checked boxes, the loss it trains
with against the float64 reference, its metric against scikit-learn, and a ``--quick`` run end to end."""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

import focal_spec

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "dense_detection.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dd():
    """The example, imported by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("_example_dense_detection", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------
# IoU and anchor labels, hand-checked.
# ----------------------------------------------------------------------------------------


def test_box_iou_hand_cases(dd):
    a = np.array([[0, 0, 2, 2], [0, 0, 4, 4]], float)
    b = np.array([[0, 0, 2, 2], [1, 1, 3, 3], [1, 0, 3, 2], [2, 0, 4, 2], [5, 5, 6, 6]], float)
    expected = np.array([
        [1.0, 1 / 7, 1 / 3, 0.0, 0.0],  # same box; corner overlap 1 of 4 + 4 - 1; half overlap 2 of 6; edge; apart
        [4 / 16, 4 / 16, 4 / 16, 4 / 16, 0.0],  # every 2x2 box inside the 4x4 one
    ])
    np.testing.assert_allclose(dd.box_iou(a, b), expected, rtol=1e-15, atol=0)


def _tall_anchor(iou: float) -> list[float]:
    """A 10-wide anchor from (0, 0) whose IoU with the box (0, 0, 10, 10) is ``iou``: 100 / (10 h) = iou."""
    return [0.0, 0.0, 10.0, 10.0 / iou]


def test_label_anchors_thresholds(dd):
    box, cls = np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([2])
    anchors = np.array([
        [0, 0, 10, 10],  # IoU 1
        _tall_anchor(0.5),  # exactly the positive threshold: positive
        _tall_anchor(0.49),  # ignore band
        [0, 0, 10, 25],  # IoU exactly 0.4 (100 / 250): still ignored, background is strictly below 0.4
        _tall_anchor(0.39),  # background
        [50, 50, 60, 60],  # no overlap
    ])
    np.testing.assert_allclose(dd.box_iou(anchors, box)[:, 0], [1.0, 0.5, 0.49, 0.4, 0.39, 0.0], rtol=1e-12)
    assert dd.box_iou(anchors, box)[1, 0] == 0.5 and dd.box_iou(anchors, box)[3, 0] == 0.4
    labels = dd.label_anchors(anchors, box, cls)
    np.testing.assert_array_equal(labels, [2, 2, dd.IGNORE, dd.IGNORE, dd.BACKGROUND, dd.BACKGROUND])
    assert dd.IGNORE != dd.BACKGROUND and min(dd.IGNORE, dd.BACKGROUND) < 0  # neither is a class index


def test_label_anchors_takes_the_best_object(dd):
    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [0.0, 10.0, 10.0, 20.0]])  # stacked vertically
    classes = np.array([2, 1])
    anchors = np.array([
        [0, 3, 10, 13],  # IoU 70/130 with the first, 30/170 with the second: class 2
        [0, 6, 10, 16],  # 40/160 and 60/140 = 0.43: ignored, on its best IoU
        [0, 5, 10, 15],  # 50/150 with both: background
        [0, 7, 10, 17],  # 30/170 and 70/130: class 1
    ], float)
    np.testing.assert_allclose(dd.box_iou(anchors, boxes), [[7 / 13, 3 / 17], [1 / 4, 3 / 7], [1 / 3, 1 / 3],
                                                            [3 / 17, 7 / 13]], rtol=1e-12)
    np.testing.assert_array_equal(dd.label_anchors(anchors, boxes, classes), [2, dd.IGNORE, dd.BACKGROUND, 1])


def test_label_anchors_without_objects(dd):
    anchors = dd.anchor_boxes(4, 4)
    labels = dd.label_anchors(anchors, np.zeros((0, 4)), np.zeros(0, int))
    assert labels.shape == (len(anchors),)
    assert np.all(labels == dd.BACKGROUND)


def test_anchor_layout(dd):
    ratios = (0.5, 1.0, 2.0)
    anchors = dd.anchor_boxes(3, 4, sizes=(8.0, 16.0), ratios=ratios)
    assert anchors.shape == (3 * 3 * 6, 4)
    width, height = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    row, col = 1, 2
    for k in range(6):
        i = (row * 3 + col) * 6 + k  # row, column, then anchor
        assert (anchors[i, 0] + anchors[i, 2]) / 2 == pytest.approx((col + 0.5) * 4)
        assert (anchors[i, 1] + anchors[i, 3]) / 2 == pytest.approx((row + 0.5) * 4)
        size, ratio = (8.0, 16.0)[k // 3], ratios[k % 3]
        assert width[i] * height[i] == pytest.approx(size ** 2)
        assert height[i] / width[i] == pytest.approx(ratio)


@pytest.fixture(scope="module")
def small_detector(dd):
    """A freshly initialised narrow detector (9 anchors, 3 classes), built once: its first build compiles."""
    from flax import nnx

    return dd.Detector(9, 3, 8, rngs=nnx.Rngs(0))


def test_model_output_order_matches_the_anchors(dd, small_detector):
    """Channel a * K + k of the classification map is anchor a, class k at every position."""
    import jax.numpy as jnp
    from flax import nnx

    n_anchors, n_classes = 9, 3
    model = nnx.clone(small_detector)
    model.classify.kernel[...] = jnp.zeros_like(model.classify.kernel[...])
    model.classify.bias[...] = jnp.arange(n_anchors * n_classes, dtype=jnp.float32)
    logits = np.asarray(dd.predict(model, jnp.zeros((2, 16, 16, 1))))
    assert logits.shape == (2, 4 * 4 * n_anchors, n_classes)
    per_position = logits.reshape(2, 16, n_anchors, n_classes)
    expected = np.arange(n_anchors * n_classes, dtype=np.float32).reshape(n_anchors, n_classes)
    np.testing.assert_array_equal(per_position, np.broadcast_to(expected, per_position.shape))


def test_prior_initialisation(dd, small_detector):
    import jax

    np.testing.assert_allclose(np.asarray(small_detector.classify.bias[...]), -math.log(99.0), rtol=1e-6)
    image = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
    p = np.asarray(jax.nn.sigmoid(dd.predict(small_detector, image)))
    assert 0.007 < p.mean() < 0.014, p.mean()  # every anchor starts near pi = 0.01


def test_generated_scenes(dd):
    """The labelled scenes have the paper's imbalance: on the order of one positive anchor per thousand."""
    anchors = dd.anchor_boxes(dd.IMAGE_SIZE // dd.STRIDE, dd.STRIDE)
    images, labels = dd.make_scenes(100, np.random.default_rng(123), anchors)
    assert images.shape == (100, dd.IMAGE_SIZE, dd.IMAGE_SIZE, 1) and images.dtype == np.float32
    assert np.all(np.isfinite(images))
    assert set(np.unique(labels)) <= {dd.IGNORE, dd.BACKGROUND, *range(len(dd.CLASSES))}
    positives = int((labels >= 0).sum())
    assert 1 / 2000 < positives / labels.size < 1 / 400, labels.size / max(positives, 1)
    assert (labels == dd.IGNORE).mean() < 0.05
    for k in range(len(dd.CLASSES)):
        assert (labels == k).any(), f"no positive anchor of class {dd.CLASSES[k]}"


def test_render_scene_objects(dd):
    rng = np.random.default_rng(7)
    counts = []
    for _ in range(40):
        image, boxes, classes = dd.render_scene(rng)
        counts.append(len(boxes))
        assert len(boxes) == len(classes) <= dd.MAX_OBJECTS
        assert np.all(boxes >= 0) and np.all(boxes <= dd.IMAGE_SIZE)
        side = boxes[:, 2:] - boxes[:, :2]
        assert np.all(side >= dd.OBJECT_SIDE[0]) and np.all(side <= dd.OBJECT_SIDE[1])
        for box in boxes:  # the shape is drawn: brighter inside its box than the scene on average
            x0, y0, x1, y1 = np.round(box).astype(int)
            assert image[y0:y1, x0:x1].mean() > image.mean()
    assert min(counts) == 0 and max(counts) == dd.MAX_OBJECTS  # empty scenes and full ones both occur


# ----------------------------------------------------------------------------------------
# The training loss and the metrics.
# ----------------------------------------------------------------------------------------


def _loss_case(dd, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.choice([dd.IGNORE, dd.BACKGROUND, 0, 1, 2], p=[0.1, 0.6, 0.1, 0.1, 0.1], size=(2, 40))
    logits = rng.normal(0.0, 2.0, (2, 40, 3)).astype(np.float32)
    return logits, labels


@pytest.mark.parametrize(("gamma", "alpha"), [(0.0, 0.75), (2.0, 0.25), (0.5, None)], ids=lambda v: f"{v}")
def test_detection_loss_matches_reference(dd, gamma, alpha):
    """Sum over counted anchors and classes of the float64 focal loss, divided by the number of positives."""
    import jax.numpy as jnp

    logits, labels = _loss_case(dd)
    targets = (labels[..., None] == np.arange(3)).astype(np.float64)
    elementwise, _ = focal_spec.reference.sigmoid_focal_loss(logits, targets, gamma=gamma, alpha=alpha,
                                                             reduction="none")
    counted = labels != dd.IGNORE
    expected = elementwise[counted].sum() / (labels >= 0).sum()
    actual = float(dd.detection_loss(jnp.asarray(logits), jnp.asarray(labels), gamma=gamma, alpha=alpha))
    assert actual == pytest.approx(expected, rel=4e-6)


def test_detection_loss_ignores_the_band(dd):
    """Ignored anchors add nothing and get no gradient, whatever their logits hold."""
    import jax
    import jax.numpy as jnp

    logits, labels = _loss_case(dd, seed=1)
    ignored = labels == dd.IGNORE
    assert ignored.any()
    garbage = np.where(ignored[..., None], np.float32(1e4), logits)

    def loss(x):
        return dd.detection_loss(x, jnp.asarray(labels), gamma=2.0, alpha=0.25)

    assert float(loss(jnp.asarray(garbage))) == pytest.approx(float(loss(jnp.asarray(logits))), rel=1e-6)
    grad = np.asarray(jax.grad(loss)(jnp.asarray(garbage)))
    assert np.all(grad[ignored] == 0) and np.all(np.isfinite(grad))
    assert np.all(grad[~ignored] != 0)


def test_average_precision_matches_sklearn(dd):
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    positive = rng.random(3000) < 0.05
    scores = np.round(rng.random(3000) + 0.5 * positive, 2)  # rounded: many ties across the classes
    assert dd.average_precision(scores, positive) == pytest.approx(average_precision_score(positive, scores),
                                                                   rel=1e-12)
    # By hand: ranks 1 (pos), 2 (neg), 3 (pos): (1/2) * 1 + (1/2) * (2/3).
    assert dd.average_precision([0.9, 0.8, 0.7], [1, 0, 1]) == pytest.approx(5 / 6, rel=1e-12)
    assert math.isnan(dd.average_precision([0.1, 0.2], [0, 0]))


def test_anchor_ap_leaves_out_ignored_anchors(dd):
    labels = np.array([[0, 1, dd.BACKGROUND, dd.IGNORE]])
    logits = np.array([[[5.0, 0.0], [0.0, 5.0], [1.0, 1.0], [9.0, 9.0]]])  # the ignored anchor outscores all
    np.testing.assert_allclose(dd.anchor_ap(logits, labels), [1.0, 1.0])
    counted = np.array([[0, 1, dd.BACKGROUND, dd.BACKGROUND]])  # the same anchor as background costs precision
    np.testing.assert_allclose(dd.anchor_ap(logits, counted), [0.5, 0.5])


def test_loss_cdf_by_hand(dd):
    x, y = dd.loss_cdf(np.array([2.0, 1.0, 1.0]), points=4)
    np.testing.assert_allclose(x, [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(y, [0, 0.25, 0.5, 1.0])  # ascending: 1, 1, 2 of a total of 4


def test_figure4_samples(dd):
    logits, labels = _loss_case(dd, seed=2)
    positive, negative = dd.figure4_samples(logits, labels, 0.0)
    assert positive.shape == ((labels >= 0).sum(),)
    assert negative.shape == (3 * (labels == dd.BACKGROUND).sum(),)
    # gamma = 0 is the cross-entropy: -log sigma(x) for the positives' own class.
    own = logits[labels >= 0, labels[labels >= 0]].astype(np.float64)
    np.testing.assert_allclose(positive, np.logaddexp(0.0, -own), rtol=4e-6)


# ----------------------------------------------------------------------------------------
# The script, end to end.
# ----------------------------------------------------------------------------------------


def _assert_png(path: pathlib.Path) -> None:
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[:2] == (height, width)
    assert min(width, height) >= 300, f"{path} is only {width}x{height} px"


def test_quick_run(tmp_path):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--quick", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for name in ("dense_detection_ap.png", "dense_detection_loss_cdf.png"):
        _assert_png(tmp_path / name)
    ratio = re.search(r"positive:anchor = 1:(\d+) \((\d+) of (\d+)\)", out)
    assert ratio, out
    assert 400 < int(ratio.group(1)) < 2000
    assert int(ratio.group(3)) / int(ratio.group(2)) == pytest.approx(int(ratio.group(1)), abs=1)
    assert "| loss | γ | α | mAP |" in out
    rows = re.findall(r"^\| (CE|FL)[^|]*\| ([\d.]+) \| ([\d.]+) \| ([\d.]+) ± ([\d.]+) \|", out, flags=re.M)
    assert {(kind, float(g), float(a)) for kind, g, a, _, _ in rows} == {("CE", 0.0, 0.75), ("FL", 2.0, 0.25)}
    for *_, mean, std in rows:
        assert 0.0 <= float(mean) <= 1.0 and float(std) >= 0.0
    assert re.search(r"hardest 1% of negatives: γ=0: [\d.]+, .*γ=2: [\d.]+", out), out
