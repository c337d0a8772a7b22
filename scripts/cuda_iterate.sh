#!/usr/bin/env bash
# A short GPU call for kernel work on csrc_cuda: build for one arch, resource / SASS summary
# of the decode kernels, the cuda tests, and the anchor rows for the cuda backend.
# Usage (repo root, GPU machine): OUT=/dir bash scripts/cuda_iterate.sh [pytest -k expr]
set -u -o pipefail
OUT=${OUT:-/tmp/portmla-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
K=${1:-}
{
  source scripts/cuda_build.sh
  echo "== tests"
  PORTMLA_REQUIRE_BACKEND=cuda PORTMLA_REQUIRE_HOPPER=1 timeout 300 python -m pytest -q -x \
    -p no:cacheprovider -n 8 tests/test_cuda_hopper.py tests/test_cuda_backend.py ${K:+-k "$K"} 2>&1 | tail -15
} 2>&1 | tee "$OUT/log.txt"
echo "== bench" | tee -a "$OUT/log.txt"
timeout 150 python -m portmla bench --preset anchors --backends cuda --no-ceilings \
  --out "$OUT/bench" --compare anchors 2>&1 | tail -30 | tee -a "$OUT/log.txt"
