"""The two backends expose the same public names, keyword arguments and defaults."""

from __future__ import annotations

import inspect

import pytest

import focal_spec

# nn.Module wrappers of the functionals
TORCH_ONLY = {"SigmoidFocalLoss", "SoftmaxFocalLoss", "AsymmetricLoss", "QualityFocalLoss", "VarifocalLoss",
              "LinearSoftmaxFocalLoss"}
# Per-ecosystem names for the same thing: the class axis and the multi-device handle, and torch's
# (input, target) positional names.
RENAMED = {"axis": "dim", "axis_name": "process_group", "hidden": "input", "logits": "input", "targets": "target",
           "labels": "target"}


def test_every_public_name_has_its_twin():
    import focal_jax
    import focal_torch

    assert set(focal_jax.__all__) == set(focal_torch.__all__) - TORCH_ONLY
    assert TORCH_ONLY <= set(focal_torch.__all__)
    for name in focal_jax.__all__:
        assert hasattr(focal_jax, name) and hasattr(focal_torch, name), name


def _params(fn):
    sig = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn)
    return {n: p for n, p in sig.parameters.items() if n != "self"}


@pytest.mark.parametrize("name", ["sigmoid_focal_loss", "softmax_focal_loss", "positive_normalizer",
                                  "SegmentationFocalLoss", "ClassificationFocalLoss", "asymmetric_loss",
                                  "quality_focal_loss", "varifocal_loss", "class_balanced_weights"])
def test_twins_share_arguments_and_defaults(name):
    import focal_jax
    import focal_torch

    j, t = _params(getattr(focal_jax, name)), _params(getattr(focal_torch, name))
    renamed = dict(RENAMED)
    if name in ("SegmentationFocalLoss", "ClassificationFocalLoss"):
        j.pop("axis")  # JAX only: the original layout is class axis 1, JAX adds channels-last
        renamed = {}  # `logits` is the constructor's flag there, not an array
    assert [renamed.get(n, n) for n in j] == list(t), (list(j), list(t))
    for n, p in j.items():
        q = t[renamed.get(n, n)]
        assert p.kind == q.kind, n
        if n in ("axis", "axis_name"):
            continue
        assert p.default == q.default, n


@pytest.mark.parametrize("name", ["sigmoid_focal_loss", "softmax_focal_loss"])
def test_defaults_come_from_the_spec(name):
    import focal_jax
    import focal_torch

    for mod, axis_arg, axis_default in ((focal_jax, "axis", focal_spec.JAX_CLASS_AXIS),
                                        (focal_torch, "dim", focal_spec.TORCH_CLASS_DIM)):
        p = _params(getattr(mod, name))
        assert p["gamma"].default == focal_spec.GAMMA
        assert p["reduction"].default == focal_spec.REDUCTION
        assert p["label_smoothing"].default == focal_spec.LABEL_SMOOTHING
        if name == "softmax_focal_loss":
            assert p["ignore_index"].default == focal_spec.IGNORE_INDEX
            assert p[axis_arg].default == axis_default


def test_torch_modules_take_the_functional_arguments():
    import focal_torch

    for mod, fn in (("SigmoidFocalLoss", "sigmoid_focal_loss"), ("SoftmaxFocalLoss", "softmax_focal_loss"),
                    ("AsymmetricLoss", "asymmetric_loss"), ("QualityFocalLoss", "quality_focal_loss"),
                    ("VarifocalLoss", "varifocal_loss")):
        m = _params(getattr(focal_torch, mod))
        f = {n: p for n, p in _params(getattr(focal_torch, fn)).items() if n not in ("input", "target")}
        # the same names and defaults; the constructors keep their historical positional order, and
        # options added later are keyword-only
        assert set(m) == set(f), (mod, sorted(set(m) ^ set(f)))
        assert all(m[n].default == f[n].default for n in f), mod


TENSOR_OPTIONS = [("SigmoidFocalLoss", "weight"), ("SigmoidFocalLoss", "pos_weight"), ("SigmoidFocalLoss", "where"),
                  ("SoftmaxFocalLoss", "weight"), ("SoftmaxFocalLoss", "where"), ("AsymmetricLoss", "weight"),
                  ("QualityFocalLoss", "where"), ("VarifocalLoss", "weight"),
                  ("LinearSoftmaxFocalLoss", "class_weight"), ("LinearSoftmaxFocalLoss", "where")]


@pytest.mark.parametrize("module,name", TENSOR_OPTIONS, ids=[f"{m}.{n}" for m, n in TENSOR_OPTIONS])
def test_torch_tensor_option_assigned_later_is_a_buffer(module, name):
    """A tensor-only option built as None is an empty buffer, as ``torch.nn``'s losses' ``weight``: a tensor
    assigned later is in ``state_dict`` and follows ``module.to(...)``, and the call uses it."""
    import torch

    import focal_torch

    m = getattr(focal_torch, module)()
    assert name not in m.state_dict()
    value = torch.tensor([True, False, True]) if name == "where" else torch.tensor([0.5, 2.0, 1.0])
    setattr(m, name, value)
    assert torch.equal(m.state_dict()[name], value)
    m.double()
    assert getattr(m, name).dtype == (torch.bool if name == "where" else torch.float64)
    x, w = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    if module == "LinearSoftmaxFocalLoss":
        y = torch.tensor([0, 2, 1])
        got = m(x, w, y)
        fn, call = focal_torch.linear_softmax_focal_loss, (x, w, y)
    else:
        y = torch.tensor([0, 2, 1]) if module == "SoftmaxFocalLoss" else torch.rand(3, 3, dtype=torch.float64)
        got = m(x, y)
        fn = getattr(focal_torch, {"SigmoidFocalLoss": "sigmoid_focal_loss", "SoftmaxFocalLoss": "softmax_focal_loss",
                                   "AsymmetricLoss": "asymmetric_loss", "QualityFocalLoss": "quality_focal_loss",
                                   "VarifocalLoss": "varifocal_loss"}[module])
        call = (x, y)
    expected = fn(*call, **{name: getattr(m, name)})
    without = fn(*call)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, without)
