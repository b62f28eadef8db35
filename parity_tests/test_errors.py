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

# (id, loss, logits, labels, kwargs, exception type). Logits and labels in the torch layout.
BAD = [
    ("gamma-negative", "sigmoid", X, T, {"gamma": -1.0}, ValueError),
    ("gamma-nan", "sigmoid", X, T, {"gamma": float("nan")}, ValueError),
    ("gamma-inf", "softmax", X, Y, {"gamma": float("inf")}, ValueError),
    ("gamma-string", "sigmoid", X, T, {"gamma": "2"}, TypeError),
    ("alpha-above-one", "sigmoid", X, T, {"alpha": 1.5}, ValueError),
    ("alpha-negative", "sigmoid", X, T, {"alpha": -0.25}, ValueError),
    ("alpha-array-out-of-range", "sigmoid", X, T, {"alpha": np.array([0.2, 1.2, 0.5])}, ValueError),
    ("alpha-array-bad-shape", "sigmoid", X, T, {"alpha": np.array([0.2, 0.5])}, ValueError),
    ("label-smoothing-sigmoid", "sigmoid", X, T, {"label_smoothing": 1.5}, ValueError),
    ("label-smoothing-softmax", "softmax", X, Y, {"label_smoothing": -0.1}, ValueError),
    ("reduction-sigmoid", "sigmoid", X, T, {"reduction": "avg"}, ValueError),
    ("reduction-softmax", "softmax", X, Y, {"reduction": "batchmean"}, ValueError),
    ("targets-shape", "sigmoid", X, np.zeros((4, 2), np.float32), {}, ValueError),
    ("targets-more-dims", "sigmoid", X, np.zeros((2, 4, 3), np.float32), {}, ValueError),
    ("labels-shape", "softmax", X, np.zeros((5,), np.int64), {}, ValueError),
    ("probs-shape", "softmax", X, np.zeros((4, 2), np.float32), {}, ValueError),
    ("weight-length", "softmax", X, Y, {"weight": np.ones(4, np.float32)}, ValueError),
    ("weight-broadcast", "sigmoid", X, T, {"weight": np.ones(4, np.float32)}, ValueError),
    ("where-shape-sigmoid", "sigmoid", X, T, {"where": np.ones((4, 2), bool)}, ValueError),
    ("where-shape-softmax", "softmax", X, Y, {"where": np.ones((3,), bool)}, ValueError),
    ("int-logits-sigmoid", "sigmoid", X.astype(np.int32), T, {}, TypeError),
    ("bool-logits-softmax", "softmax", X.astype(bool), Y, {}, TypeError),
    ("float-labels", "softmax", X, Y.astype(np.float32), {}, TypeError),
    ("bool-labels", "softmax", X, Y.astype(bool), {}, TypeError),
    ("scalar-logits-softmax", "softmax", np.float32(0.0).reshape(()), np.zeros((), np.int64), {}, ValueError),
]


def _expected(loss, logits, labels, kwargs):
    """The exception the spec raises for this call: the reference validates with focal_spec too."""
    fn = reference.sigmoid_focal_loss if loss == "sigmoid" else reference.softmax_focal_loss
    extra = {} if loss == "sigmoid" else {"axis": 1 if np.ndim(logits) > 1 else -1}
    with pytest.raises(Exception) as info:
        fn(logits, labels, **kwargs, **extra)
    return info.value


def _call_jax(loss, logits, labels, kwargs):
    import jax.numpy as jnp

    import focal_jax

    kw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) and k != "alpha" else v) for k, v in kwargs.items()}
    fn = focal_jax.sigmoid_focal_loss if loss == "sigmoid" else focal_jax.softmax_focal_loss
    extra = {} if loss == "sigmoid" else {"axis": -1}
    return fn(jnp.asarray(logits), jnp.asarray(labels), **kw, **extra)


def _call_jax_jit(loss, logits, labels, kwargs):
    import jax

    return jax.jit(lambda a, b: _call_jax(loss, a, b, kwargs))(logits, labels)


def _call_torch(loss, logits, labels, kwargs):
    import torch

    import focal_torch

    kw = {k: (torch.as_tensor(v) if isinstance(v, np.ndarray) and k != "alpha" else v) for k, v in kwargs.items()}
    fn = focal_torch.sigmoid_focal_loss if loss == "sigmoid" else focal_torch.softmax_focal_loss
    return fn(torch.as_tensor(logits), torch.as_tensor(labels), **kw)


# alpha stays a NumPy array: array values are range-checked when they are host data (NumPy or a
# sequence); device arrays are checked for shape only, so that validation never syncs a device.
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
