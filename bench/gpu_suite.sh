#!/usr/bin/env bash
# The GPU suite: build dynkernels with its CUDA kernels, run the GPU tests, tune, measure and check,
# and leave logs, results and the report in OUT_DIR.
#
#   bench/gpu_suite.sh OUT_DIR [phase ...]     (run from anywhere; works in the repo root)
#
# `all` (the default) is the one-call run for a lent GPU, at most about 9 minutes on an H100/H200:
# build, gpu-test, tune, headline, sanitize and gpu-test-rest, each phase under its own time limit
# and all of them under ALL_BUDGET_S (default 530 s: a phase that cannot fit in what is left is
# skipped and says so), then its logs packed into OUT_DIR/logs.tar.gz. Phases:
#   build       pip install --no-build-isolation --no-deps --no-index -e . (CUDA kernels on)
#   gpu-test    pytest -m cuda over the most telling GPU tests (build, tensors past 2^31, the CUDA
#               conv, CUDA graphs, compile); gpu-test-rest: the other GPU tests, in the time left
#   test        the GPU tests, then all the others
#   tune        python -m dynkernels.tune --quick into OUT_DIR/tuned (bf16; the headline then uses it
#               through DYNKERNELS_CONFIG_DIR; copy its JSON into dynkernels/configs/ to ship it)
#   headline    the headline suite (python -m dynkernels.bench --suite headline): the speed targets'
#               configurations, each family in its own process under a time limit, then the report
#   sanitize    compute-sanitizer memcheck, racecheck and initcheck over bench/sanitizer_workload.py
#               (every CUDA and Triton kernel on small shapes): zero errors expected
#   bench       python -m dynkernels.bench --full --device cuda (the sweep suite, every family)
#   bench-FAMILY  one family of the sweep (sample_gating, channel_sparse_conv, skip_blocks, models)
# OUT_DIR gets at most 8 files: suite.log (every phase appends to it), report.md, results.csv,
# results.json, tuned/<device>.json, logs.tar.gz (all, with --no-plots) or plots (other phases).
# Nothing is downloaded: torch, Triton, pytest, numpy and matplotlib must be installed.
set -uo pipefail
export PYTHONUNBUFFERED=1

if [ $# -lt 1 ]; then
    sed -n '2,26p' "$0"
    exit 2
fi
OUT_DIR=$(mkdir -p "$1" && cd "$1" && pwd)
shift
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(all)
PACK=0
if [ "${PHASES[*]}" = all ]; then
    PHASES=(build gpu-test tune headline sanitize gpu-test-rest)
    PACK=1
fi
START=$(date +%s)
ALL_BUDGET_S=${ALL_BUDGET_S:-530}
KEY_TESTS=(python_tests/test_build.py python_tests/test_large_tensors.py python_tests/test_channel_sparse_conv2d_cuda.py
           python_tests/test_skip_graphs.py python_tests/test_compile.py)
cd "$(dirname "$0")/.."
LOG="$OUT_DIR/suite.log"
PYTHON=${PYTHON:-$(command -v python || command -v python3)}  # the first one on PATH
STATUS=0

say() { echo "[gpu_suite $(date -u +%Y-%m-%dT%H:%M:%SZ)] $*" | tee -a "$LOG"; }

run() {  # run a command, its output appended to the log; remember a failure, carry on
    say "\$ $*"
    "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && { say "exit status $rc: $*"; STATUS=1; }
    return "$rc"
}

run_pytest() {  # like run, but pytest's "no tests selected" (exit status 5) is no failure
    say "\$ $*"
    "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    case "$rc" in
    0) ;;
    5) say "no tests selected: $*" ;;
    *) say "exit status $rc: $*"; STATUS=1 ;;
    esac
}

for phase in "${PHASES[@]}"; do
    case "$phase" in
    build | gpu-test | gpu-test-rest | test | tune | headline | sanitize | bench | bench-sample_gating | bench-channel_sparse_conv | bench-skip_blocks | bench-models) ;;
    *) echo "gpu_suite: unknown phase '$phase' (expected all, build, gpu-test, gpu-test-rest, test, tune, headline, sanitize, bench or bench-FAMILY)" >&2; exit 2 ;;
    esac
done

left() { echo $(( ALL_BUDGET_S - ($(date +%s) - START) )); }  # seconds left of the whole run

fits() {  # fits PHASE SECONDS: whether a phase that needs SECONDS fits in what is left; says so if not
    if [ "$(left)" -lt "$2" ]; then
        say "skipping $1: it needs ${2} s, $(left) s are left of ALL_BUDGET_S=$ALL_BUDGET_S"
        STATUS=1
        return 1
    fi
}

info() { say "\$ $*"; "$@" 2>&1 | tee -a "$LOG"; }  # environment facts: a failure here is not a suite failure

say "phases: ${PHASES[*]}; repo $(pwd) at $(git rev-parse --short HEAD 2>/dev/null || echo '?'); out $OUT_DIR"
info nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
info "$PYTHON" -c "import sys, importlib.util as u, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(), '| installed:', *[m for m in ('triton', 'pytest', 'matplotlib', 'numpy') if u.find_spec(m)])"

for phase in "${PHASES[@]}"; do
    case "$phase" in
    build)
        export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
        export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
        export MAX_JOBS=${MAX_JOBS:-$(nproc)}
        export DYNKERNELS_WITH_CUDA=1
        run timeout --kill-after=10 300 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . \
            || { say "build failed: stopping"; exit 1; }
        info "$PYTHON" -c "import dynkernels, json; print(json.dumps(dynkernels.build_info(), indent=1))"
        ;;
    gpu-test)
        # The GPU tests whose answer matters most (a TORCH_CHECK thrown on a GPU, tensors past
        # 2^31 elements, the conv kernels, CUDA-graph replay, compile), capped so that the
        # measurements after them keep their time.
        fits gpu-test 60 && run_pytest timeout --kill-after=10 "$(( $(left) < 80 ? $(left) : 80 ))" \
            "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider "${KEY_TESTS[@]}" -m cuda
        ;;
    gpu-test-rest)
        # The other tests that need a GPU (the Triton-only ones run on the CPU in CI), in what is left.
        fits gpu-test-rest 30 && run_pytest timeout --kill-after=10 "$(left)" \
            "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider --durations=10 python_tests -m cuda "${KEY_TESTS[@]/#/--deselect=}"
        ;;
    test)
        run_pytest "$PYTHON" -m pytest -q -rs python_tests -m "cuda or triton"
        run_pytest "$PYTHON" -m pytest -q -rs python_tests -m "not (cuda or triton)"
        ;;
    tune)
        # Stops starting entries after --budget-s and writes what it has; the headline uses the table.
        fits tune 45 && run timeout --kill-after=10 90 "$PYTHON" -m dynkernels.tune --quick --out "$OUT_DIR/tuned" --budget-s 60 \
            --jobs "$(nproc)" && export DYNKERNELS_CONFIG_DIR="$OUT_DIR/tuned"
        ;;
    sanitize)
        # compute-sanitizer ships with the CUDA toolkit; racecheck covers the shared-memory pipelines.
        SAN=$(command -v compute-sanitizer || ls -d "${CUDA_HOME:-/usr/local/cuda}"/compute-sanitizer/compute-sanitizer \
            /usr/local/cuda*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -1)
        [ -z "$SAN" ] && { say "compute-sanitizer not found: sanitize skipped"; STATUS=1; continue; }
        for tool in memcheck racecheck initcheck; do
            fits "sanitize $tool" 25 && run timeout --kill-after=5 "$(( $(left) < 60 ? $(left) : 60 ))" \
                "$SAN" --tool "$tool" --error-exitcode 1 --print-limit 20 "$PYTHON" bench/sanitizer_workload.py
        done
        ;;
    bench)
        run "$PYTHON" -m dynkernels.bench --full --device cuda --out "$OUT_DIR"
        ;;
    bench-*)
        run "$PYTHON" -m dynkernels.bench --full --device cuda --out "$OUT_DIR" --only "${phase#bench-}"
        ;;
    headline)
        # family:own budget:hard limit (s). A family stops starting cases past its own budget;
        # `timeout` ends it if one case hangs (results.json keeps what it had saved).
        # In `all`, about 3.5 minutes: the families' budgets shrink to fit what is left.
        specs="channel_sparse_conv:150:170 skip_blocks:55:70 models:110:130"
        [ "$PACK" = 1 ] && specs="channel_sparse_conv:85:100 skip_blocks:40:50 models:55:65"
        for spec in $specs; do
            IFS=: read -r family budget limit <<<"$spec"
            [ "$PACK" = 1 ] && { fits "headline $family" "$(( budget / 2 ))" || continue; }
            # HEADLINE_DEVICE=cpu HEADLINE_ARGS=--smoke: the same phase as a tiny CPU run (to check it)
            run timeout --kill-after=10 "$limit" "$PYTHON" -m dynkernels.bench --suite headline --only "$family" \
                --device "${HEADLINE_DEVICE:-cuda}" ${HEADLINE_ARGS:-} --out "$OUT_DIR" --budget-s "$budget" --no-plots
        done
        plots=""; [ "$PACK" = 1 ] && plots=--no-plots  # at most 8 files
        run "$PYTHON" -m dynkernels.bench --report-only --out "$OUT_DIR" $plots  # the report; prints the verdicts
        ;;
    esac
done
if [ "$PACK" = 1 ]; then  # every other log (tune.log, pytest caches are not kept) in one archive
    find "$OUT_DIR" -name '*.log' ! -name suite.log -print0 | tar -czf "$OUT_DIR/logs.tar.gz" --null -T - --remove-files 2>/dev/null
fi
say "done (status $STATUS) in $(( $(date +%s) - START )) s; files in $OUT_DIR: $(find "$OUT_DIR" -type f -printf '%P ' )"
exit $STATUS
