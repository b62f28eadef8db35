#!/usr/bin/env bash
# The releases that pyproject.toml claims, tested: each job is a fresh virtual environment with the named
# versions, the project installed without its dependencies, and the tests that exercise every framework API the
# library relies on (torch: autograd.Function, torch.func, forward-mode AD, torch.compile, torch.export, the
# distributed mean over gloo; JAX: jit/vmap/grad/checkpoint/export, shard_map over 8 host devices, the Flax NNX
# training step; Hessians of both backends).
#
#   oldest  torch, jax, jaxlib, flax and optax at the lower bounds of pyproject.toml
#   newest  the newest torch the registry serves (a pip constraints file of the machine lifted for that job:
#           PIP_CONSTRAINT=/dev/null; an empty value leaves the configured file in force);
#           the main job already resolves the newest jax, flax and optax
#
# Usage: bash .ci/versions.sh [oldest|newest ...]   (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."

# Lower bounds (torch 2.4-2.7: Dynamo recompiles for each Python float γ; flax 0.12.0 does not import
# with jax 0.10.0; optax 0.2.4 has no per-class α): keep in step with pyproject.toml (parity_tests/test_versions.py checks that they agree).
OLDEST=("torch==2.8.0" "jax==0.10.0" "jaxlib==0.10.0" "flax==0.12.2" "optax==0.2.5" "numpy==2.0.2")
TEST_DEPS=("pytest>=8" "pytest-xdist>=3" "hypothesis>=6.100" "matplotlib>=3.7" "tqdm>=4.60" "scikit-learn>=1.3" "mpmath>=1.3")
TORCH_TESTS=(
  parity_tests/test_torch_sigmoid_transforms.py
  parity_tests/test_torch_softmax_transforms.py
  parity_tests/test_torch_transform_constants.py
  parity_tests/test_second_derivatives.py
  parity_tests/test_torch_export.py
  parity_tests/test_linear_torch.py
  parity_tests/test_distributed_torch.py
  parity_tests/test_torch_specific.py
  parity_tests/test_values.py
  parity_tests/test_api.py
)
JAX_TESTS=(
  parity_tests/test_jax_transforms.py
  parity_tests/test_distributed_jax.py
  "parity_tests/test_examples.py::test_flax_train"
)

job() {
  local name=$1
  shift
  local venv=".ci/venv-$name"
  local started=$SECONDS
  echo "=== versions: $name ($*)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "$@" "${TEST_DEPS[@]}"
  "$venv/bin/python" -m pip install -q --no-deps -e .
  "$venv/bin/python" -c "import torch, jax, flax, optax, numpy; print('versions:', 'torch', torch.__version__, \
'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'numpy', numpy.__version__)"
  local tests=("${TORCH_TESTS[@]}")
  if [[ $name == oldest ]]; then tests+=("${JAX_TESTS[@]}"); fi
  "$venv/bin/python" -m pytest -q -p no:cacheprovider -n 2 "${tests[@]}"
  echo "=== versions: $name passed in $((SECONDS - started)) s"
}

for name in "${@:-oldest newest}"; do
  for n in $name; do
    case $n in
      oldest) job oldest "${OLDEST[@]}" ;;
      newest) PIP_CONSTRAINT=/dev/null job newest "torch" "jax" "jaxlib" "flax" "optax" ;;
      *) echo "unknown job: $n" >&2; exit 2 ;;
    esac
  done
done
