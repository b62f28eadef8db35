#!/usr/bin/env bash
# Static types: mypy over the three packages, with the configuration of pyproject.toml ([tool.mypy]).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m mypy --version >/dev/null 2>&1 || python -m pip install -q "mypy>=1.10"
python -m mypy focal_spec focal_jax focal_torch
