#!/usr/bin/env bash
# Set up (system Vulkan driver where needed, .venv, flowmanip) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONWARNINGS="ignore::FutureWarning"
.venv/bin/python -m pytest -q "$@"
