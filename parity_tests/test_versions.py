"""The releases the project claims are the releases CI tests, and the library stays on public framework APIs.

``pyproject.toml`` states lower bounds; ``.ci/versions.sh`` installs exactly those (its ``oldest`` job) and runs
the framework tests there. The two must not drift apart. PyTorch internals (``torch._inductor``, ``torch._C``,
``torch._dynamo``...) change between releases without notice: ``focal_torch`` uses none. Whether a tensor is
wrapped by a ``torch.func`` transform is asked of ``torch.func.debug_unwrap``, and whether a transform is active at
all, of the documented refusal of a ``forward(ctx, ...)`` Function to run under one (``focal_torch._common``).
"""

from __future__ import annotations

import pathlib
import re

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _lower_bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    bounds: dict[str, str] = {}
    for requirement in requirements:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?>=([0-9.]+)", requirement.strip())
        if m:
            name, version = m.group(1).lower(), m.group(2)
            assert bounds.setdefault(name, version) == version, f"{name}: two lower bounds in pyproject.toml"
    return bounds


def _oldest_pins() -> dict[str, str]:
    text = (ROOT / ".ci" / "versions.sh").read_text()
    line = next(line for line in text.splitlines() if line.startswith("OLDEST=("))
    return {name.lower(): version for name, version in re.findall(r'"([A-Za-z0-9_.-]+)==([0-9.]+)"', line)}


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def test_the_oldest_job_installs_the_lower_bounds():
    bounds, pins = _lower_bounds(), _oldest_pins()
    for name in ("torch", "jax", "flax", "optax"):
        assert name in pins, f".ci/versions.sh does not pin {name} in its oldest job"
        # the pin is the bound itself, or its first patch release (the bound names the minor release)
        bound, pin = _release(bounds[name]), _release(pins[name])
        assert pin[: len(bound)] == bound and pin >= bound, f"{name}: pyproject says >={bounds[name]}, " \
                                                            f"the oldest job installs {pins[name]}"
    assert _release(pins["jaxlib"]) == _release(pins["jax"]), "jax and jaxlib are released together"
    assert _release(pins["numpy"]) >= _release(bounds["numpy"])


PRIVATE = re.compile(r"\btorch(?:\.[A-Za-z]\w*)*\._[A-Za-z]")  # a dotted path with a _name in it
ALLOWED: set[tuple[str, str]] = set()  # (file name, line) pairs exempted from the check: none


def test_focal_torch_uses_no_private_torch_api():
    found = []
    for path in sorted((ROOT / "focal_torch").glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if PRIVATE.search(code) and (path.name, code.strip()) not in ALLOWED:
                found.append(f"{path.name}:{number}: {line.strip()}")
    assert not found, "private torch APIs on the library's path:\n" + "\n".join(found)


def test_the_private_api_check_finds_what_it_should():
    for line in ("torch._inductor.compile_fx", "torch._C._autograd._get_current_graph_task_keep_graph()",
                 "torch.autograd.forward_ad._current_level", "torch._log_softmax_backward_data(g, y, 1, dt)"):
        assert PRIVATE.search(line), line
    for line in ("torch.log_softmax(x, 1)", "torch.autograd.forward_ad.unpack_dual(t)",
                 "torch.compiler.is_compiling()"):
        assert not PRIVATE.search(line), line
