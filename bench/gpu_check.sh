#!/usr/bin/env bash
# The GPU check in one command (see bench/gpu_check.py): bench/gpu_check.sh [--rehearse] OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
