"""Bad input: both backends raise the same exception type with the same message, taken from focal_spec."""

from __future__ import annotations

import re

import numpy as np
import pytest

import focal_spec
from focal_spec import reference

X = np.zeros((4, 3), np.float32)
T = np.zeros((4, 3), np.float32)
Y = np.zeros((4,), np.int64)

# The bad-input table: every argument x every bad kind (wrong type, wrong dtype, wrong shape, out of range,
# NaN/inf, string). Each row raises the spec's exception with the spec's message in JAX (eager and jit) and in
# torch. The bad-input table of docs/guide/bad-input.md lists the same ids (test_docs_list_every_row checks it).
# (id, loss, logits, labels, kwargs, exception type). Logits and labels in the torch layout.
BAD = [
    ("gamma-negative", "sigmoid", X, T, {"gamma": -1.0}, ValueError),
    ("gamma-nan", "sigmoid", X, T, {"gamma": float("nan")}, ValueError),
    ("gamma-inf", "softmax", X, Y, {"gamma": float("inf")}, ValueError),
    ("gamma-string", "sigmoid", X, T, {"gamma": "2"}, TypeError),
    ("gamma-none", "softmax", X, Y, {"gamma": None}, TypeError),
    ("gamma-bool", "sigmoid", X, T, {"gamma": True}, TypeError),
    ("gamma-array-negative", "sigmoid", X, T, {"gamma": np.array([1.0, -2.0, 0.5])}, ValueError),
    ("gamma-array-nan", "softmax", X, Y, {"gamma": np.array([1.0, np.nan, 0.5])}, ValueError),
    ("gamma-array-shape-sigmoid", "sigmoid", X, T, {"gamma": np.ones(4)}, ValueError),
    ("gamma-array-shape-softmax", "softmax", X, Y, {"gamma": np.ones(2)}, ValueError),
    ("alpha-above-one", "sigmoid", X, T, {"alpha": 1.5}, ValueError),
    ("alpha-negative", "sigmoid", X, T, {"alpha": -0.25}, ValueError),
    ("alpha-nan", "sigmoid", X, T, {"alpha": float("nan")}, ValueError),
    ("alpha-string", "sigmoid", X, T, {"alpha": "1.5"}, TypeError),
    ("alpha-bool", "sigmoid", X, T, {"alpha": True}, TypeError),
    ("alpha-array-out-of-range", "sigmoid", X, T, {"alpha": np.array([0.2, 1.2, 0.5])}, ValueError),
    ("alpha-array-negative", "sigmoid", X, T, {"alpha": np.array([0.2, -0.1, 0.5])}, ValueError),
    ("alpha-array-bad-shape", "sigmoid", X, T, {"alpha": np.array([0.2, 0.5])}, ValueError),
    ("label-smoothing-sigmoid", "sigmoid", X, T, {"label_smoothing": 1.5}, ValueError),
    ("label-smoothing-softmax", "softmax", X, Y, {"label_smoothing": -0.1}, ValueError),
    ("label-smoothing-nan", "softmax", X, Y, {"label_smoothing": float("nan")}, ValueError),
    ("label-smoothing-string", "sigmoid", X, T, {"label_smoothing": "0.1"}, TypeError),
    ("label-smoothing-none", "sigmoid", X, T, {"label_smoothing": None}, TypeError),
    ("label-smoothing-array", "softmax", X, Y, {"label_smoothing": np.array([0.1, 0.2])}, ValueError),
    ("reduction-sigmoid", "sigmoid", X, T, {"reduction": "avg"}, ValueError),
    ("reduction-softmax", "softmax", X, Y, {"reduction": "batchmean"}, ValueError),
    ("reduction-none-object", "sigmoid", X, T, {"reduction": None}, ValueError),
    ("ignore-index-bool", "softmax", X, Y, {"ignore_index": True}, TypeError),
    ("ignore-index-float", "softmax", X, Y, {"ignore_index": 1.5}, TypeError),
    ("ignore-index-string", "softmax", X, Y, {"ignore_index": "255"}, TypeError),
    ("targets-shape", "sigmoid", X, np.zeros((4, 2), np.float32), {}, ValueError),
    ("targets-more-dims", "sigmoid", X, np.zeros((2, 4, 3), np.float32), {}, ValueError),
    ("targets-complex", "sigmoid", X, T.astype(np.complex64), {}, TypeError),
    ("labels-shape", "softmax", X, np.zeros((5,), np.int64), {}, ValueError),
    ("probs-shape", "softmax", X, np.zeros((4, 2), np.float32), {}, ValueError),
    ("float-labels", "softmax", X, Y.astype(np.float32), {}, TypeError),
    ("bool-labels", "softmax", X, Y.astype(bool), {}, TypeError),
    ("weight-length", "softmax", X, Y, {"weight": np.ones(4, np.float32)}, ValueError),
    ("weight-2d-softmax", "softmax", X, Y, {"weight": np.ones((1, 3), np.float32)}, ValueError),
    ("weight-broadcast", "sigmoid", X, T, {"weight": np.ones(4, np.float32)}, ValueError),
    ("pos-weight-broadcast", "sigmoid", X, T, {"pos_weight": np.ones(4, np.float32)}, ValueError),
    ("where-shape-sigmoid", "sigmoid", X, T, {"where": np.ones((4, 2), bool)}, ValueError),
    ("where-shape-softmax", "softmax", X, Y, {"where": np.ones((3,), bool)}, ValueError),
    ("where-float", "sigmoid", X, T, {"where": np.full((4, 3), 0.3, np.float32)}, TypeError),
    ("where-int", "softmax", X, Y, {"where": np.ones((4,), np.int32)}, TypeError),
    ("int-logits-sigmoid", "sigmoid", X.astype(np.int32), T, {}, TypeError),
    ("bool-logits-softmax", "softmax", X.astype(bool), Y, {}, TypeError),
    ("complex-logits", "sigmoid", X.astype(np.complex64), T, {}, TypeError),
    ("scalar-logits-softmax", "softmax", np.float32(0.0).reshape(()), np.zeros((), np.int64), {}, ValueError),
]

def _expected(loss, logits, labels, kwargs):
    """The exception the spec raises for this call: the reference validates with focal_spec too."""
    fn = reference.sigmoid_focal_loss if loss == "sigmoid" else reference.softmax_focal_loss
    extra = {} if loss == "sigmoid" else {"axis": 1 if np.ndim(logits) > 1 else -1}
    with pytest.raises(Exception) as info:
        fn(logits, labels, **kwargs, **extra)
    return info.value


def _jax_options(kwargs):
    import jax.numpy as jnp

    return {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}


def _call_jax(loss, logits, labels, kwargs, options=None):
    import jax.numpy as jnp

    import focal_jax

    kw = _jax_options(kwargs) if options is None else options
    fn = focal_jax.sigmoid_focal_loss if loss == "sigmoid" else focal_jax.softmax_focal_loss
    extra = {} if loss == "sigmoid" else {"axis": -1}
    return fn(jnp.asarray(logits), jnp.asarray(labels), **kw, **extra)


def _call_jax_jit(loss, logits, labels, kwargs):
    """Logits and labels traced; array options concrete JAX arrays closed over by the jitted function."""
    import jax

    options = _jax_options(kwargs)
    return jax.jit(lambda a, b: _call_jax(loss, a, b, kwargs, options))(logits, labels)


def _call_torch(loss, logits, labels, kwargs):
    import torch

    import focal_torch

    kw = {k: (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
    fn = focal_torch.sigmoid_focal_loss if loss == "sigmoid" else focal_torch.softmax_focal_loss
    return fn(torch.as_tensor(logits), torch.as_tensor(labels), **kw)


# Array options become arrays of the backend: a concrete JAX array and a CPU tensor are range-checked like
# NumPy data (that costs no device sync). Traced and accelerator arrays are checked by shape only.
CALLERS = {"jax": _call_jax, "jax-jit": _call_jax_jit, "torch": _call_torch}


@pytest.mark.parametrize("backend", list(CALLERS))
@pytest.mark.parametrize("bad", [pytest.param(b, id=b[0]) for b in BAD])
def test_bad_input_raises_the_spec_error(backend, bad):
    name, loss, logits, labels, kwargs, exc = bad
    expected = _expected(loss, logits, labels, kwargs)
    assert type(expected) is exc
    # under jit, JAX may append a note on filtered traceback frames after the message
    with pytest.raises(exc, match="^" + re.escape(str(expected)) + r"($|\n)"):
        CALLERS[backend](loss, logits, labels, kwargs)


def test_messages_name_the_argument_what_is_allowed_and_what_was_received():
    e = _expected("sigmoid", X, T, {"reduction": "avg"})
    assert str(e) == ("Invalid value for argument `reduction`. Expected one of ('none', 'mean', 'sum'). "
                      "Received: reduction='avg'")
    e = _expected("sigmoid", X, np.zeros((4, 2), np.float32), {})
    assert "targets.shape=(4, 2)" in str(e) and "logits.shape=(4, 3)" in str(e)
    e = _expected("softmax", X, Y, {"weight": np.ones(4, np.float32)})
    assert "(3,)" in str(e) and "weight.shape=(4,)" in str(e)
    e = _expected("sigmoid", X.astype(np.int32), T, {})
    assert "`logits`" in str(e) and "int32" in str(e)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_class_axis_out_of_range(backend):
    msg = focal_spec.invalid_value("dim" if backend == "torch" else "axis",
                                   "an integer in [-2, 2) for 2-d logits", 2)
    if backend == "jax":
        import jax.numpy as jnp

        import focal_jax

        with pytest.raises(ValueError, match=re.escape(msg)):
            focal_jax.softmax_focal_loss(jnp.asarray(X), jnp.asarray(Y), axis=2)
    else:
        import torch

        import focal_torch

        with pytest.raises(ValueError, match=re.escape(msg)):
            focal_torch.softmax_focal_loss(torch.as_tensor(X), torch.as_tensor(Y), dim=2)


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("module", ["SegmentationFocalLoss", "ClassificationFocalLoss"])
def test_original_weights_length_must_match_classes(backend, module):
    mod = __import__("focal_jax" if backend == "jax" else "focal_torch")
    args = (3,) if module == "ClassificationFocalLoss" else ()
    if module == "ClassificationFocalLoss":
        # n_classes is known at construction: the mismatch is caught there.
        with pytest.raises(ValueError, match=re.escape("Invalid value for argument `weights`")):
            getattr(mod, module)(*args, weights=[1.0, 2.0])
        return
    loss = getattr(mod, module)(*args, weights=[1.0, 2.0])
    pred = np.zeros((2, 3, 4, 4), np.float32)
    if backend == "jax":
        import jax.numpy as jnp

        pred_a, teacher = jnp.asarray(pred), jnp.asarray(pred)
    else:
        import torch

        pred_a, teacher = torch.as_tensor(pred), torch.as_tensor(pred)
    with pytest.raises(ValueError, match=re.escape("Invalid value for argument `weights`")):
        loss(pred_a, teacher)


# Bad values that only the data can reveal. torch reads the data in eager mode and raises the spec's error;
# JAX cannot raise on a traced value, so the element's loss is NaN there (never a silently wrong number).
# (id, loss, logits, labels, kwargs, the spec's message)
DATA = [
    ("targets-255", "sigmoid", X, np.full((4, 3), 255, np.uint8), {}, focal_spec.targets_out_of_range(255)),
    ("targets-negative", "sigmoid", X, np.full((4, 3), -0.5, np.float32), {}, focal_spec.targets_out_of_range(-0.5)),
    ("labels-too-large", "softmax", X, np.array([0, 1, 3, 2]), {}, focal_spec.label_out_of_range(3, 3, -100)),
    ("labels-negative", "softmax", X, np.array([0, -1, 2, 2]), {"ignore_index": 255},
     focal_spec.label_out_of_range(-1, 3, 255)),
    ("labels-uint8-wrap", "softmax", X, np.array([0, 156, 2, 2], np.uint8), {},
     focal_spec.label_out_of_range(156, 3, -100)),
]


@pytest.mark.parametrize("row", [pytest.param(r, id=r[0]) for r in DATA])
def test_bad_data_raises_in_torch_and_is_nan_in_jax(row):
    name, loss, logits, labels, kwargs, message = row
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        _expected_raise(loss, logits, labels, kwargs)
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        _call_torch(loss, logits, labels, kwargs)
    out = np.asarray(_call_jax(loss, logits, labels, {**kwargs, "reduction": "none"}))
    bad = np.isnan(out)
    assert bad.any(), out
    assert np.isfinite(out[~bad]).all()
    assert np.isnan(np.asarray(_call_jax_jit(loss, logits, labels, kwargs)))  # the mean is NaN too


def _expected_raise(loss, logits, labels, kwargs):
    fn = reference.sigmoid_focal_loss if loss == "sigmoid" else reference.softmax_focal_loss
    extra = {} if loss == "sigmoid" else {"axis": 1}
    fn(logits, labels, **kwargs, **extra)


@pytest.mark.parametrize("value", [np.zeros((4, 3), np.float32), [[0.0] * 3] * 4], ids=["numpy", "list"])
def test_torch_logits_must_be_a_tensor(value):
    import focal_torch

    msg = focal_spec.invalid_type("input", "a torch.Tensor", value)
    for fn, labels in ((focal_torch.sigmoid_focal_loss, T), (focal_torch.softmax_focal_loss, Y)):
        with pytest.raises(TypeError, match="^" + re.escape(msg) + "$"):
            fn(value, labels)


@pytest.mark.parametrize("arg", ["target", "weight", "where"])
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_torch_meta_device_options_raise_the_spec_error(arg, loss):
    import torch

    import focal_torch

    x = torch.zeros(4, 3)
    meta = torch.device("meta")
    if loss == "sigmoid":
        fn, kwargs = focal_torch.sigmoid_focal_loss, {"target": torch.zeros(4, 3), "weight": torch.ones(4, 3),
                                                      "where": torch.ones(4, 3, dtype=torch.bool)}
    else:
        fn, kwargs = focal_torch.softmax_focal_loss, {"target": torch.zeros(4, dtype=torch.long),
                                                      "weight": torch.ones(3), "where": torch.ones(4, dtype=torch.bool)}
    kwargs[arg] = kwargs[arg].to(meta)
    msg = focal_spec.invalid_device(arg, x.device, meta)
    target = kwargs.pop("target")
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        fn(x, target, **kwargs)


def test_docs_list_every_row():
    """The bad-input tables of the user guide (docs/guide/bad-input.md) name every row of BAD and DATA, and
    nothing else."""
    import pathlib

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "guide" / "bad-input.md").read_text()
    listed = re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.M)
    assert len(listed) == len(set(listed)), "a case is listed twice"
    assert set(listed) == {row[0] for row in BAD + DATA}
