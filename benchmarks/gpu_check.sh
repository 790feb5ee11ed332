#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU (make gpu-check): build and install densefuse with the CUDA
# extension, run the GPU tests, run the GPU benchmark report. Every step runs under a time limit and the
# script goes on after a failure; the exit codes land in summary.txt and the script exits non-zero if
# any step failed. Everything is written to ${OUT:-benchmarks/results}:
#   summary.txt      GPU, versions, densefuse._C.build_info(), exit code of each step
#   build.log        pip install -e . (CUDA extension, TORCH_CUDA_ARCH_LIST=9.0 unless set)
#   pytest-gpu.xml   junit XML of `pytest -m gpu tests`; pytest-gpu.log its output
#   <gpu>-<date>.json, report.md, report.log   benchmarks/report.py --device cuda
# Wheels in ./.whl (e.g. monai, nibabel where the image lacks them) are installed into /tmp/site first.
# Time limits in seconds (the environment overrides them): BUILD_TIMEOUT 180, TEST_TIMEOUT 110,
# REPORT_TIMEOUT 120, so the check ends within 7 minutes; a report cut short keeps the cases it finished.
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
timeout "${BUILD_TIMEOUT:-180}" "$PY" -m pip install --no-build-isolation --no-deps -e . \
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
timeout "${TEST_TIMEOUT:-110}" "$PY" -m pytest -q -m gpu tests --junitxml="$OUT/pytest-gpu.xml" 2>&1 |
    tee "$OUT/pytest-gpu.log" | tail -n 25
test_rc=$?

echo "== benchmark report"
timeout "${REPORT_TIMEOUT:-120}" "$PY" benchmarks/report.py --device cuda --out-dir "$OUT" \
    >"$OUT/report.md" 2>"$OUT/report.log"
report_rc=$?
cat "$OUT/report.md"
tail -n 5 "$OUT/report.log"

log "exit codes: build $build_rc, gpu tests $test_rc, report $report_rc"
[ "$build_rc" -eq 0 ] && [ "$test_rc" -eq 0 ] && [ "$report_rc" -eq 0 ]
