#!/usr/bin/env bash
# The accelerator check (≤ 8 minutes on one GPU): examples/s of the DP and non-private training
# loop for ResNet-18 at 224² and WRN-16-4 on CIFAR-shaped data, peak memory, and the input pipeline's images/s.
#   bash benchmarks/gpu_check.sh [--smoke] [--json FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -u benchmarks/gpu_check.py "$@"
