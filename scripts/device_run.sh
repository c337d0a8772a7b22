#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA module, info + demo, the whole test suite on
# the GPU (every available backend; the cuda backend required), then the benchmarks.
# Usage (from the repo root): OUT=/some/dir bash scripts/device_run.sh [test-seconds] [bench-seconds]
# SANITIZERS="memcheck synccheck" runs those compute-sanitizer tools only (racecheck alone takes
# ~4 minutes: run it in a call of its own when the whole run would pass the call's limit);
# SANITIZERS="" none. TESTS=0 skips the test suite, BENCH=0 the benchmarks (a run split over
# calls that each fit the device's 10-minute limit).
set -u -o pipefail
OUT=${OUT:-/tmp/portmla-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
TEST_S=${1:-240}
BENCH_S=${2:-200}
export PORTMLA_TEST_SEED=${PORTMLA_TEST_SEED:-$RANDOM$RANDOM}
# the tree shipped to a GPU machine has no .git: name the commit the caller wrote down
[ -f .device_commit ] && export PORTMLA_GIT_COMMIT=$(cat .device_commit)
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "commit ${PORTMLA_GIT_COMMIT:-unknown}"
  source scripts/cuda_build.sh
  echo "== info"; python -m portmla info
  echo "== demo"; python -m portmla demo
  if [ "${TESTS:-1}" != 0 ]; then
    echo "== tests (seed $PORTMLA_TEST_SEED)"
    PORTMLA_REQUIRE_BACKEND=cuda PORTMLA_REQUIRE_HOPPER=1 timeout "$TEST_S" python -m pytest -q \
      -p no:cacheprovider -n 8 --durations=15 tests
    echo "pytest exit: $?"
  fi
  # racecheck took 233 s on the H100 at 6200b6c (the 40-sequence narrow cases), the others < 130
  for tool in ${SANITIZERS-memcheck racecheck synccheck}; do
    echo "== compute-sanitizer --tool $tool (Hopper kernels, the quantized-cache kernel, cache ops)"
    timeout $([ $tool = racecheck ] && echo 280 || echo 130) compute-sanitizer --tool $tool --error-exitcode 9 \
      python scripts/cuda_device_check.py sanitize 2>&1 | tail -4
  done
} 2>&1 | tee "$OUT/log.txt"
[ "${BENCH:-1}" = 0 ] && exit 0
echo "== bench" | tee -a "$OUT/log.txt"
timeout "$BENCH_S" python -m portmla bench --preset anchors --backends all --peers \
  --out "$OUT/h100" --compare anchors 2>&1 | tee -a "$OUT/log.txt"
timeout 80 python -m portmla bench --specs 128q1s8k,64q1s32k,8q1s8k --heads 16 --fixed \
  --kv-cache-dtype bfloat16,fp8,fp8_ds_mla --backends cuda,triton --no-ceilings \
  --out "$OUT/h100_formats" 2>&1 | tee -a "$OUT/log.txt"
timeout 50 python -m portmla bench --specs 128q1s8k,8q1s8k --heads 16 \
  --kv-cache-dtype bfloat16,fp8,fp8_ds_mla --backends cuda,triton --no-ceilings \
  --out "$OUT/h100_formats_varlen" 2>&1 | tee -a "$OUT/log.txt"
timeout 90 python -m portmla bench --specs 128q1s4k,128q1s8k,64q1s16k --heads 128 \
  --kv-cache-dtype bfloat16,fp8,fp8_ds_mla --backends cuda --no-ceilings \
  --out "$OUT/h100_formats_h128" 2>&1 | tee -a "$OUT/log.txt"
tar czf "$OUT/formats.tgz" -C "$OUT" h100_formats h100_formats_varlen h100_formats_h128 && \
  rm -rf "$OUT/h100_formats" "$OUT/h100_formats_varlen" "$OUT/h100_formats_h128"
