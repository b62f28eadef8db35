"""Every example runs with ``--quick``, writes a valid PNG of a sensible size, and returns sane results."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import struct

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_SIDE = 300  # pixels


def load_example(name: str):
    """Imports ``examples/<name>.py`` by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_quick(name: str, out: pathlib.Path) -> dict:
    return load_example(name).main(["--quick", "--out", str(out)])


def png_size(path: pathlib.Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature and that the image decodes."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR", f"{path}: first chunk is {data[12:16]!r}, not IHDR"
    width, height = struct.unpack(">II", data[16:24])
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    return width, height


def assert_png(path: pathlib.Path) -> None:
    assert path.is_file(), f"{path} was not written"
    width, height = png_size(path)
    assert width >= MIN_SIDE and height >= MIN_SIDE, f"{path} is only {width}x{height} px"


def assert_unit(value: float, what: str) -> None:
    assert math.isfinite(value) and 0.0 <= value <= 1.0, f"{what} = {value}"


def test_flax_train(tmp_path):
    out = tmp_path / "flax_train.png"
    result = run_quick("flax_train", out)
    assert_png(out)
    for loss in ("cross_entropy", "focal"):
        for metric in ("average_precision", "recall"):
            assert_unit(result[loss][metric], f"{loss} {metric}")


def test_torch_segmentation(tmp_path):
    out = tmp_path / "torch_segmentation.png"
    result = run_quick("torch_segmentation", out)
    assert_png(out)
    for loss, ious in result["iou"].items():
        assert set(ious) == {"background", "blob", "small object"}
        for cls, iou in ious.items():
            # A class absent from both prediction and truth has no IoU (NaN); the generator draws every class.
            assert_unit(iou, f"{loss} IoU of {cls}")
        assert math.isfinite(result["final_loss"][loss])


def test_focal_curve(tmp_path):
    out = tmp_path / "focal_curve.png"
    result = run_quick("focal_curve", out)
    assert_png(out)
    assert result["max_abs_diff"] < 1e-5
    for backend, diff in result["max_abs_diff_from_reference"].items():
        assert diff < 1e-5, f"{backend} differs from the float64 reference by {diff}"


@pytest.mark.parametrize("name", ["flax_train", "torch_segmentation", "focal_curve"])
def test_default_out_is_in_figures(name):
    assert load_example(name).DEFAULT_OUT == EXAMPLES / "figures" / f"{name}.png"
