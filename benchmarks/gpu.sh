#!/usr/bin/env bash
# The GPU suite (benchmarks/gpu.py): SD-1.5 / SD-2-base UNet training at 256² and 512² in bf16, eager and compiled,
# and 50-step sampling; writes benchmarks/gpu_results.md. Under 8 minutes on one H100-class GPU; without a GPU it
# prints why it measured nothing and exits 0. Extra arguments go to benchmarks/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m benchmarks.gpu "$@"
