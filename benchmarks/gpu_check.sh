#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU (make gpu-check): build and install densefuse with the CUDA
# extension, run the GPU tests, run the GPU benchmark reports of the three op families and the memory
# planner check. Every step runs under a time limit and the script goes on after a failure; the exit
# codes land in summary.txt and the script exits non-zero if any step failed. Everything is written to
# ${OUT:-benchmarks/results}:
#   summary.txt      GPU, versions, densefuse._C.build_info(), exit code of each step
#   build.log        pip install -e . (CUDA extension, TORCH_CUDA_ARCH_LIST=9.0 unless set)
#   pytest-gpu.xml   junit XML of `pytest -m gpu tests`; pytest-gpu.log its output
#   <gpu>-<date>.json, report.md, report.log   losses: benchmarks/report.py --device cuda
#   fusion-<gpu>-<date>.json, fusion.log       sliding-window fusion: benchmarks/fusion_providers.py
#   dense-<gpu>-<date>.json, dense.log         dense blocks: benchmarks/dense_providers.py
#   memory-model.json/.png, plan.json, plan.log  FCDenseNet3d 128^3 batch 4 (naive/checkpoint/fused,
#                    fp32/bf16) and `densefuse plan --check` (prediction vs measured peak)
# Wheels in ./.whl (e.g. monai, nibabel where the image lacks them) are installed into /tmp/site first.
# Time limits in seconds (the environment overrides them): BUILD 150, TEST 100, REPORT 90, FUSION 45,
# DENSE 70, MODEL 90, PLAN 60: the check ends within about 9.5 minutes; a report cut short keeps the
# cases it finished (the loss report; profile-memory rewrites its JSON after every point) or its log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
summary="$OUT/summary.txt"
: >"$summary"
log() { echo "$*" | tee -a "$summary"; }

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    log "wheels from .whl: exit $?"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$summary"
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>&1 |
    tee -a "$summary"

echo "== build (log: $OUT/build.log)"
timeout "${BUILD_TIMEOUT:-150}" "$PY" -m pip install --no-build-isolation --no-deps -e . \
    >"$OUT/build.log" 2>&1
build_rc=$?
tail -n 5 "$OUT/build.log"
if [ "$build_rc" -ne 0 ]; then  # go on with the Python backends from the source tree
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$summary"
import densefuse
import densefuse._C
print("build_info", densefuse._C.build_info())
print("backends for cuda tensors", densefuse.available_backends("cuda"))
EOF

echo "== GPU tests"
timeout "${TEST_TIMEOUT:-100}" "$PY" -m pytest -q -m gpu tests --junitxml="$OUT/pytest-gpu.xml" 2>&1 |
    tee "$OUT/pytest-gpu.log" | tail -n 25
test_rc=$?

step() {  # step NAME TIMEOUT LOGFILE COMMAND...: run under a time limit, record the exit code
    local name=$1 limit=$2 logfile=$3
    shift 3
    echo "== $name (log: $logfile)"
    timeout "$limit" "$@" >"$logfile" 2>&1
    local rc=$?
    tail -n 12 "$logfile"
    log "$name: exit $rc"
    [ "$rc" -eq 0 ] || failed=1
}
failed=0

echo "== loss benchmark report"
timeout "${REPORT_TIMEOUT:-90}" "$PY" benchmarks/report.py --device cuda --out-dir "$OUT" \
    >"$OUT/report.md" 2>"$OUT/report.log"
report_rc=$?
cat "$OUT/report.md"
tail -n 5 "$OUT/report.log"

export PYTHONPATH=benchmarks${PYTHONPATH:+:$PYTHONPATH}
slug=$("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); import report; print(report.slug(report.device_info("cuda")))')
day=$(date +%F)
step fusion "${FUSION_TIMEOUT:-45}" "$OUT/fusion.log" \
    "$PY" benchmarks/fusion_providers.py --reps 20 --out "$OUT/fusion-$slug-$day.json"
step dense "${DENSE_TIMEOUT:-70}" "$OUT/dense.log" \
    "$PY" benchmarks/dense_providers.py --reps 5 --out "$OUT/dense-$slug-$day.json"
step model-memory "${MODEL_TIMEOUT:-90}" "$OUT/model.log" \
    "$PY" -m densefuse.cli profile-memory --device cuda --patches 128 --batches 4 --reps 3 --quiet \
    --implementations fused naive checkpoint --out "$OUT/memory-model-$slug-$day.json"
step plan "${PLAN_TIMEOUT:-60}" "$OUT/plan.log" \
    "$PY" -m densefuse.cli plan --device cuda --memory 40GiB --patch 128 --implementations fused \
    --check --quiet --out "$OUT/plan-$slug-$day.json"

log "exit codes: build $build_rc, gpu tests $test_rc, loss report $report_rc"
[ "$build_rc" -eq 0 ] && [ "$test_rc" -eq 0 ] && [ "$report_rc" -eq 0 ] && [ "$failed" -eq 0 ]
