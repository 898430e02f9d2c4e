#!/usr/bin/env bash
# The device check, as one command: tools/gpu_check.sh [--device cuda|cpu] [--quick] [--tiny-only].
# On a lent GPU machine it runs in under 8 minutes; here `tools/gpu_check.sh --device cpu --quick` is its self-test.
# PYTHON: the interpreter to use (default: python on the PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
"${PYTHON:-python}" tools/gpu_check.py "$@" 2>&1 | tee runs/gpu-check.log
