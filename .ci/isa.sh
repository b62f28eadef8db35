#!/usr/bin/env bash
# The numerics, transform and derivative tests again with the vector width of an x86 machine without AVX-512: XLA
# capped at AVX2 (--xla_cpu_max_isa) and ATen's AVX2 kernels (ATEN_CPU_CAPABILITY). On a machine that has no more
# than AVX2 this repeats the main job's checks; on one with AVX-512 it runs them as a user's AVX2 machine would.
# A test that holds only at one vector width (an ulp of summation order decided by an absolute tolerance) fails
# here. Inductor's cache does not key its kernels on ATEN_CPU_CAPABILITY, so this job compiles into a cache of
# its own.
set -euo pipefail
cd "$(dirname "$0")/.."

cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
XLA_FLAGS="--xla_cpu_max_isa=AVX2 ${XLA_FLAGS:-}" ATEN_CPU_CAPABILITY=avx2 TORCHINDUCTOR_CACHE_DIR="$cache" \
  python -m pytest -q -p no:cacheprovider -n 2 \
  parity_tests/test_numerics.py \
  parity_tests/test_jax_transforms.py \
  parity_tests/test_second_derivatives.py \
  parity_tests/test_gamma_gradient.py
