"""``torch.export`` of the torch Modules: strict and non-strict, with a static and a dynamic batch dimension.
The exported program, run on inputs it was not traced with, gives the float64 reference's loss; a target
outside [0, 1] (which cannot be checked while tracing) gives NaN, as under ``torch.compile``."""

from __future__ import annotations

import numpy as np
import pytest

from focal_spec import reference
from parity_tests import _harness as H

torch = pytest.importorskip("torch")


def _ft():
    import focal_torch

    return focal_torch


def _sigmoid_case(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g) * 4
    t = torch.rand(n, 3, generator=g)
    return x, t


def _softmax_case(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g) * 4
    y = torch.randint(0, 5, (n,), generator=g)
    return x, y


CASES = {
    "sigmoid": (lambda ft: ft.SigmoidFocalLoss(gamma=1.5, alpha=0.25), _sigmoid_case,
                lambda x, t: reference.sigmoid_focal_loss(x, t, gamma=1.5, alpha=0.25)[0]),
    "softmax": (lambda ft: ft.SoftmaxFocalLoss(gamma=0.5), _softmax_case,
                lambda x, y: reference.softmax_focal_loss(x, y, gamma=0.5, axis=-1)[0]),
}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-batch"])
@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("loss", sorted(CASES))
def test_exported_module_matches_the_reference(loss, strict, dynamic):
    ft = _ft()
    make, inputs, ref = CASES[loss]
    module = make(ft)
    traced_with = inputs(4, 0)
    shapes = None
    if dynamic:
        batch = torch.export.Dim("batch")
        shapes = ({0: batch}, {0: batch})
    program = torch.export.export(module, traced_with, strict=strict, dynamic_shapes=shapes)
    n = 7 if dynamic else 4
    x, t = inputs(n, 1)
    out = program.module()(x, t)
    expected = ref(x.double().numpy(), t.double().numpy() if t.is_floating_point() else t.numpy())
    H.assert_close(out.detach().numpy(), expected, "float32", f"exported {loss}")


@pytest.mark.parametrize("chunk_size", [3, None], ids=["chunk=3", "chunk=auto"])
@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_exported_linear_loss_matches_the_reference(strict, chunk_size):
    """The fused linear loss exported with a dynamic batch: the program holds the chunked operator, and run on a
    batch of another size it gives the float64 reference's loss of the materialised logits."""
    ft = _ft()

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(6, 5)
            self.loss = ft.LinearSoftmaxFocalLoss(gamma=0.5, chunk_size=chunk_size)

        def forward(self, h, y):
            return self.loss(h, self.proj.weight, y, bias=self.proj.bias)

    torch.manual_seed(0)
    head = Head()
    batch = torch.export.Dim("batch")
    g = torch.Generator().manual_seed(0)
    program = torch.export.export(head, (torch.randn(4, 6, generator=g), torch.randint(0, 5, (4,), generator=g)),
                                  strict=strict, dynamic_shapes=({0: batch}, {0: batch}))
    assert any("focal_torch.linear_focal" in str(n.target) for n in program.graph.nodes)
    h, y = torch.randn(7, 6, generator=g) * 3, torch.randint(0, 5, (7,), generator=g)
    out = program.module()(h, y)
    w, b = (t.detach().double().numpy() for t in (head.proj.weight, head.proj.bias))
    logits = h.double().numpy() @ w.T + b
    H.assert_close(out.detach().numpy(), reference.softmax_focal_loss(logits, y.numpy(), gamma=0.5, axis=-1)[0],
                   "float32", "exported linear loss")


def test_exported_sigmoid_gives_nan_for_an_unchecked_target():
    ft = _ft()
    module = ft.SigmoidFocalLoss(reduction="none")
    x, t = _sigmoid_case(4, 0)
    program = torch.export.export(module, (x, t), strict=False)
    t_bad = t.clone()
    t_bad[1, 2] = 1.5
    out = program.module()(x, t_bad)
    bad = np.zeros(out.shape, bool)
    bad[1, 2] = True
    assert torch.isnan(out[1, 2])
    assert torch.isfinite(out[torch.from_numpy(~bad)]).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        module(x, t_bad)  # eager: the same input is rejected


WARNING_FREE = {
    "sigmoid": (lambda ft: ft.SigmoidFocalLoss(gamma=1.5, alpha=0.25), _sigmoid_case),
    "softmax": (lambda ft: ft.SoftmaxFocalLoss(gamma=0.5), _softmax_case),
    "asymmetric": (lambda ft: ft.AsymmetricLoss(), _sigmoid_case),
}


@pytest.mark.parametrize("loss", sorted(WARNING_FREE))
def test_strict_export_warns_about_nothing_in_the_library(loss):
    """Dynamo traces through the library without skipping a cache wrapper (it warns about each one it meets:
    a cached helper must be bypassed while compiling) or warning from the library's own files."""
    import warnings

    ft = _ft()
    make, inputs = WARNING_FREE[loss]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.export.export(make(ft), inputs(4, 0), strict=True)
    ours = [str(w.message)[:200] for w in seen
            if "lru_cache" in str(w.message) or "focal_" in f"{w.filename} {w.message}"]
    assert not ours, ours
