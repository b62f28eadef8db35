"""Bad numbers in options, both backends: a boolean is never a number, and a NaN or ±inf inside an
``alpha`` or ``weight`` array is an error, not a NaN loss.

Every numeric option of every public loss (functions, modules, the focal family and the original blog
modules) is called with a Python bool, a NumPy ``np.bool_``, a 0-d NumPy bool array and the backend's own
0-d bool array (and, for array options, a bool array of the right shape): each must raise the spec's
``TypeError`` naming the argument, never read the boolean as 0 or 1. Values are readable here (host
arrays, CPU tensors, concrete JAX arrays), so the spec's checks see them.
"""

from __future__ import annotations

import numpy as np
import pytest

import focal_spec

C = 3
X = np.random.default_rng(5).normal(size=(4, C))
T = (np.random.default_rng(6).uniform(size=(4, C)) < 0.4).astype(np.float64)
Q = np.random.default_rng(7).uniform(0.1, 0.9, size=(4, C))  # quality / IoU targets
Y = np.array([0, 2, 1, 1])

# Per loss: its numeric options, each with a valid value and whether it takes an array of one value per
# class ("array"), a number ("number"), or an integer ("int").
OPTIONS = {
    "sigmoid_focal_loss": {"gamma": "number", "alpha": "array", "weight": "array", "pos_weight": "array",
                           "label_smoothing": "number", "poly1": "number", "reduced_threshold": "number"},
    "softmax_focal_loss": {"gamma": "array", "weight": "array", "ignore_index": "int", "label_smoothing": "number",
                           "poly1": "number", "axis": "int"},
    "asymmetric_loss": {"gamma_pos": "number", "gamma_neg": "number", "clip": "number", "weight": "array",
                        "label_smoothing": "number"},
    "quality_focal_loss": {"beta": "number", "weight": "array"},
    "varifocal_loss": {"alpha": "number", "gamma": "number", "weight": "array"},
    "class_balanced_weights": {"beta": "number"},
    "SegmentationFocalLoss": {"gamma": "number", "weights": "array"},
    "ClassificationFocalLoss": {"gamma": "number", "weights": "array", "n_classes": "int"},
}
MODULES = {"sigmoid_focal_loss": "SigmoidFocalLoss", "softmax_focal_loss": "SoftmaxFocalLoss",
           "asymmetric_loss": "AsymmetricLoss", "quality_focal_loss": "QualityFocalLoss",
           "varifocal_loss": "VarifocalLoss"}
BOOLS = ("True", "np.True_", "np.array(True)", "backend 0-d", "bool array")


def _backend(name):
    if name == "jax":
        pytest.importorskip("jax")
        import jax.numpy as jnp

        import focal_jax

        return focal_jax, jnp.asarray
    torch = pytest.importorskip("torch")
    import focal_torch

    return focal_torch, torch.as_tensor


def _bool_value(kind, asarray):
    if kind == "True":
        return True
    if kind == "np.True_":
        return np.True_
    if kind == "np.array(True)":
        return np.array(True)
    if kind == "backend 0-d":
        return asarray(True)
    return asarray(np.ones(C, bool))


def _call(backend, mod, asarray, loss, option, value, module=False):
    """Calls ``loss`` of ``backend`` with ``option=value`` (as a module's constructor argument when
    ``module``), on small valid inputs."""
    x, t, q, y = (asarray(a.astype(np.float32) if a.dtype.kind == "f" else a) for a in (X, T, Q, Y))
    kw = {"dim" if option == "axis" and backend == "torch" else option: value}
    if loss == "class_balanced_weights":
        return mod.class_balanced_weights(asarray(np.array([10.0, 5.0, 1.0], np.float32)), **kw)
    if loss in ("SegmentationFocalLoss", "ClassificationFocalLoss"):
        ctor = {"n_classes": C} if loss == "ClassificationFocalLoss" else {}
        ctor.update(kw)
        if loss == "ClassificationFocalLoss":
            return getattr(mod, loss)(**ctor)(x, y)
        return getattr(mod, loss)(**ctor)(x[..., None, None], t[..., None, None])
    labels = {"softmax_focal_loss": y, "quality_focal_loss": q, "varifocal_loss": q * t}.get(loss, t)
    if module and backend == "torch":
        return getattr(mod, MODULES[loss])(**kw)(x, labels)
    return getattr(mod, loss)(x, labels, **kw)


def _params(cases, backends=("jax", "torch")):
    out = []
    for backend in backends:
        for case in cases:
            out.append(pytest.param(backend, *case, id="-".join((*case, backend))))
    return out


CASES = [(loss, option, kind) for loss, opts in OPTIONS.items() for option, option_kind in opts.items()
         for kind in BOOLS if kind != "bool array" or option_kind == "array"]


@pytest.mark.parametrize(("backend", "loss", "option", "kind"), _params(CASES))
def test_a_boolean_is_not_a_number(backend, loss, option, kind):
    mod, asarray = _backend(backend)
    value = _bool_value(kind, asarray)
    arg = "dim" if option == "axis" and backend == "torch" else option
    with pytest.raises(TypeError, match=f"argument `{arg}`"):
        _call(backend, mod, asarray, loss, option, value)


MODULE_CASES = [(loss, option, kind) for loss, option, kind in CASES if loss in MODULES and option != "axis"]


@pytest.mark.parametrize(("backend", "loss", "option", "kind"), _params(MODULE_CASES, ("torch",)))
def test_a_boolean_is_not_a_number_in_the_torch_modules(backend, loss, option, kind):
    mod, asarray = _backend("torch")
    value = _bool_value(kind, asarray)
    with pytest.raises(TypeError, match=f"argument `{option}`"):
        _call("torch", mod, asarray, loss, option, value, module=True)


# ----------------------------------------------------------------------------------------
# NaN and ±inf inside alpha and weight arrays.
# ----------------------------------------------------------------------------------------

# Per loss: its array options with values, each option's valid values (one per class) and its range.
ARRAYS = {
    "sigmoid_focal_loss": {"alpha": 0.25, "weight": 1.5, "pos_weight": 2.0},
    "softmax_focal_loss": {"weight": 1.5},
    "asymmetric_loss": {"weight": 1.5},
    "quality_focal_loss": {"weight": 1.5},
    "varifocal_loss": {"weight": 1.5},
    "SegmentationFocalLoss": {"weights": 1.5},
    "ClassificationFocalLoss": {"weights": 1.5},
}
BAD = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
ARRAY_CASES = [(loss, option, bad) for loss, opts in ARRAYS.items() for option in opts for bad in BAD]


@pytest.mark.parametrize(("backend", "loss", "option", "bad"), _params(ARRAY_CASES))
@pytest.mark.parametrize("holder", ["numpy", "backend"])
def test_a_non_finite_value_in_an_alpha_or_weight_array_is_an_error(backend, loss, option, bad, holder):
    mod, asarray = _backend(backend)
    values = np.full(C, ARRAYS[loss][option], np.float32)
    values[1] = BAD[bad]
    value = values if holder == "numpy" else asarray(values)
    with pytest.raises(ValueError, match=f"argument `{option}`") as info:
        _call(backend, mod, asarray, loss, option, value)
    assert "Received" in str(info.value)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_message_is_the_specs(backend):
    """Both backends raise the spec's own messages, word for word."""
    mod, asarray = _backend(backend)
    with pytest.raises(TypeError) as info:
        _call(backend, mod, asarray, "sigmoid_focal_loss", "gamma", np.True_)
    assert str(info.value) == focal_spec.invalid_value("gamma", focal_spec.GAMMA_EXPECTED, np.True_)
    alpha = np.array([0.25, np.nan, 0.5], np.float32)
    with pytest.raises(ValueError) as info:
        _call(backend, mod, asarray, "sigmoid_focal_loss", "alpha", alpha)
    assert str(info.value) == focal_spec.invalid_value("alpha", "values in [0, 1]", float("nan"))


@pytest.mark.parametrize("option", ["gamma", "alpha", "label_smoothing", "weight", "pos_weight"])
def test_a_traced_boolean_is_not_a_number(option):
    """Under ``jax.jit`` a traced option's values are unknown, but its dtype is not: bool is refused."""
    pytest.importorskip("jax")
    import jax
    import jax.numpy as jnp

    import focal_jax

    value = jnp.asarray(True) if option in ("gamma", "label_smoothing") else jnp.ones(C, bool)
    fn = jax.jit(lambda v: focal_jax.sigmoid_focal_loss(jnp.asarray(X, jnp.float32), jnp.asarray(T, jnp.float32),
                                                        **{option: v}))
    with pytest.raises(TypeError, match=f"argument `{option}`"):
        fn(value)
