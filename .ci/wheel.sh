#!/usr/bin/env bash
# Packaging: build the sdist and the wheel, install the wheel into a fresh virtual environment (no system
# site packages) and, from a directory outside the repository, import both backends, check __version__ and run
# one loss of each. The frameworks (torch, jax) are not installed again: the fresh environment reads them from
# the calling environment's site-packages through a .pth file, after its own site-packages (whose only
# project files are the wheel's); that environment's editable install is not processed there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

python -m build --version >/dev/null 2>&1 || python -m pip install -q "build>=1.0"
OUT="$ROOT/build/wheel-check"
rm -rf "$OUT"
mkdir -p "$OUT"
python -m build --sdist --wheel --outdir "$OUT/dist" "$ROOT"
WHEEL=$(ls "$OUT"/dist/focal_parity-*.whl)
SDIST=$(ls "$OUT"/dist/focal_parity-*.tar.gz)
VERSION=$(basename "$WHEEL" | cut -d- -f2)
echo "built $(basename "$WHEEL") and $(basename "$SDIST")"

python -m venv "$OUT/venv"  # --system-site-packages is off by default
"$OUT/venv/bin/python" -m pip install -q --no-deps "$WHEEL"
DEPS=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
OWN=$("$OUT/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$DEPS" > "$OWN/frameworks-of-the-calling-environment.pth"

cd "$(mktemp -d)"  # outside the repository: the packages must come from the wheel
"$OUT/venv/bin/python" - "$VERSION" <<'PY'
import pathlib
import sys

import jax.numpy as jnp
import torch

import focal_jax
import focal_spec
import focal_torch

version = sys.argv[1]
for module in (focal_spec, focal_jax, focal_torch):
    path = pathlib.Path(module.__file__).resolve()
    assert pathlib.Path(sys.prefix).resolve() in path.parents, f"{module.__name__} is not the wheel's: {path}"
    assert module.__version__ == version, (module.__name__, module.__version__, version)
    assert (path.parent / "py.typed").is_file(), f"{module.__name__} lacks py.typed"

x, t = [[2.0, -1.0, 0.5]], [[1.0, 0.0, 1.0]]
jax_loss = float(focal_jax.sigmoid_focal_loss(jnp.asarray(x), jnp.asarray(t), alpha=0.25))
torch_loss = focal_torch.sigmoid_focal_loss(torch.tensor(x), torch.tensor(t), alpha=0.25).item()
assert abs(jax_loss - torch_loss) < 1e-6, (jax_loss, torch_loss)
softmax = focal_torch.softmax_focal_loss(torch.tensor(x), torch.tensor([0])).item()
assert abs(float(focal_jax.softmax_focal_loss(jnp.asarray(x), jnp.asarray([0]))) - softmax) < 1e-6
print(f"wheel {version}: focal_spec, focal_jax, focal_torch import from {path.parent.parent}; "
      f"sigmoid {jax_loss:.6f} (JAX) = {torch_loss:.6f} (PyTorch), softmax {softmax:.6f}")
PY
