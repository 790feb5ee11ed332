#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU (make gpu-check): build and install densefuse with the CUDA
# extension, run the GPU tests, run the GPU benchmark reports of the three op families and the memory
# planner check. Every step runs under a time limit, and the whole check under a deadline (DEADLINE
# seconds, default 540): a step gets what is left of it. The script goes on after a failure; the exit
# codes land in summary.txt and the script exits non-zero if any step failed.
#
# BUILD=0 skips the build where the extension that an earlier check kept (densefuse/_C*.so) was carried.
# STEPS (default "tests profile loss fusion dense model plan") selects the steps, run in that order
# (TEST_FILES narrows the test step to some files):
#   tests   the tests marked gpu or named for cuda (pytest -k "gpu or cuda"; pytest-xdist where installed)
#   profile benchmarks/profile_fusion.py: torch.profiler tables of one fusion call, densefuse and MONAI
#   loss    benchmarks/report.py --device cuda                        -> <gpu>-<date>.json, report.md
#   fusion  benchmarks/fusion_providers.py (fusion only, the host's work alone on tiny windows, a
#           conv model, a 16-class 320^3 argmax through SlidingWindowPredictor, the deterministic
#           mode)                                                     -> fusion-<gpu>-<date>.json/.png
#   dense   benchmarks/dense_providers.py: blocks, then the network step (--model)
#                                                                     -> dense-/model-step-<gpu>-<date>.json
#   model   densefuse profile-memory: FCDenseNet3d 128^3 batch 4, fused/naive/checkpoint, fp32/bf16
#                                                                     -> memory-model-<gpu>-<date>.json/.png
#   plan    densefuse plan --check (prediction vs measured peak)      -> plan-<gpu>-<date>.json
#
# Seen on an H100 (2026-11-27, 16 cores): build 99 s; the full test selection 113 s with 16 xdist
# workers (Triton compiles included); fusion 39 s; the planner test alone needs over 60 s. A full
# check does not fit one 10-minute call: pick STEPS (e.g. "tests fusion profile", then
# "loss dense model plan" with BUILD=0 and the kept extension carried). A second lease the same day
# ran STEPS="tests fusion profile" TEST_FILES="tests/test_patch_fuse.py tests/test_inference.py" in
# 222 s (build 100, tests 49, fusion 32, profile 20): the CUDA fusion kernels' check and timing.
#
# Results and logs are written to a work folder; at the end (also when a step fails or the deadline
# cuts it short) $OUT (default benchmarks/results) receives summary.txt and gpu-check.tar.gz holding
# everything (two files: the device tool returns at most eight). Wheels in ./.whl (monai, nibabel,
# which the GPU image lacks) are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
STEPS=${STEPS:-tests profile loss fusion dense model plan}
DEADLINE=$((SECONDS + ${DEADLINE:-540}))
WORK=$(mktemp -d /tmp/gpu-check.XXXX)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
summary="$WORK/summary.txt"
: >"$summary"
log() { echo "$*" | tee -a "$summary"; }
pack() {
    cp "$summary" "$OUT/summary.txt"
    tar -czf "$OUT/gpu-check.tar.gz" -C "$WORK" .
}
trap pack EXIT
left() {  # left LIMIT: the step's limit, or what is left of the deadline if less
    local rest=$((DEADLINE - SECONDS - 5))
    echo $(($1 < rest ? $1 : (rest > 1 ? rest : 1)))
}
failed=0
step() {  # step NAME LIMIT COMMAND...: run under a time limit, log to NAME.log, record the exit code
    local name=$1 limit
    limit=$(left "$2")
    shift 2
    echo "== $name (limit ${limit}s, log: $name.log)"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$WORK/$name.log"
    log "$name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed=1
}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    log "wheels from .whl: exit $?"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$summary"
"$PY" -c 'import torch, triton, numpy; print("torch", torch.__version__, "triton", triton.__version__,
"numpy", numpy.__version__)' 2>&1 | tee -a "$summary"

if [ "${BUILD:-1}" = 0 ] && compgen -G "densefuse/_C.cpython-*.so" >/dev/null; then
    log "build: skipped (BUILD=0), with the extension carried in densefuse/"
    ln -sfn ../kernels densefuse/kernels  # what the editable install maps densefuse.kernels to
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    step build 200 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
fi
if grep -q "build: exit 0" "$summary"; then  # keep the extension: a later check with unchanged csrc/ may reuse it
    cp "densefuse/_C$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" "$WORK/"
else  # go on with the Python backends from the source tree
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$summary"
import densefuse
import densefuse._C
print("build_info", densefuse._C.build_info())
print("backends for cuda tensors", densefuse.available_backends("cuda"))
EOF

export PYTHONPATH=$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
slug=$("$PY" -c 'import report; print(report.slug(report.device_info("cuda")))')
day=$(date +%F)
TEST_FILES=${TEST_FILES:-tests}  # the test step's files (default: all; tests -k "gpu or cuda")

run_step() {  # one step of STEPS, by name
    case $1 in
    tests)
        local plugins=()  # one line per test as it finishes, so a cut-short run still names its failures
        "$PY" -c "import xdist" 2>/dev/null && plugins+=(-n "$(nproc)")
        "$PY" -c "import pytest_timeout" 2>/dev/null && plugins+=(--timeout 150)
        # shellcheck disable=SC2086
        DENSEFUSE_FAILURE_LOG="$WORK/failures.log" step tests 170 "$PY" -m pytest -v --tb=short -rfE --durations 15 ${plugins[@]+"${plugins[@]}"} $TEST_FILES \
            --ignore tests/test_triton_sm90.py -k "gpu or cuda" --junitxml="$WORK/pytest-gpu.xml" ;;
    profile)
        step profile 40 "$PY" benchmarks/profile_fusion.py --providers densefuse-triton,densefuse-cuda,monai ;;
    loss)
        step loss 90 "$PY" benchmarks/report.py --device cuda --out "$WORK/$slug-$day.json" ;;
    fusion)
        step fusion 120 "$PY" benchmarks/fusion_providers.py --reps 20 --out "$WORK/fusion-$slug-$day.json"
        step fusion-chart 30 "$PY" benchmarks/plot_fusion.py "$WORK/fusion-$slug-$day.json" ;;
    dense)
        step dense 70 "$PY" benchmarks/dense_providers.py --reps 5 --out "$WORK/dense-$slug-$day.json"
        step model-step 70 "$PY" benchmarks/dense_providers.py --model --reps 3 \
            --out "$WORK/model-step-$slug-$day.json" ;;
    model)
        step model-memory 90 "$PY" -m densefuse.cli profile-memory --device cuda --patches 128 \
            --batches 4 --reps 3 --quiet --implementations fused naive checkpoint \
            --out "$WORK/memory-model-$slug-$day.json" ;;
    plan)
        step plan 60 "$PY" -m densefuse.cli plan --device cuda --memory 40GiB --patch 128 \
            --implementations fused --check --quiet --out "$WORK/plan-$slug-$day.json" ;;
    *)
        log "unknown step $1"
        failed=1 ;;
    esac
}
for name in $STEPS; do
    if [ $((DEADLINE - SECONDS)) -lt 15 ]; then
        log "$name: skipped (deadline)"
        failed=1
        continue
    fi
    run_step "$name"
done
[ "$failed" -eq 0 ]
