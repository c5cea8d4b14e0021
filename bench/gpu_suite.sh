#!/usr/bin/env bash
# The GPU suite: build dynkernels with its CUDA kernels, run the GPU tests and the rest of
# the tests, run the full benchmark, and leave logs, results and the report in OUT_DIR.
#
#   bench/gpu_suite.sh OUT_DIR [phase ...]     (run from anywhere; works in the repo root)
#
# Phases (default: build test bench), so that the suite can be split across calls of at most
# 10 minutes each:
#   build                 pip install --no-build-isolation --no-deps --no-index -e . (CUDA kernels on)
#   test                  pytest -m "cuda or triton", then the remaining tests
#   bench                 python -m dynkernels.bench --full --device cuda (the sweep suite, every family)
#   bench-FAMILY          one family only (sample_gating, channel_sparse_conv, skip_blocks, models);
#                         results of earlier families in the same OUT_DIR are kept, so the
#                         report covers all families run into it
#   headline              the headline suite (python -m dynkernels.bench --suite headline): the speed
#                         targets' configurations, each family in its own process under a time limit
#                         (about 6 minutes in all on an H100), then the report with the verdicts
# OUT_DIR gets at most 8 files: suite.log (every phase appends to it), report.md, results.csv,
# results.json and one plot_<family>.png per family (run the headline phase into its own OUT_DIR).
# Nothing is downloaded: torch, Triton, pytest, numpy and matplotlib must be installed.
set -uo pipefail
export PYTHONUNBUFFERED=1

if [ $# -lt 1 ]; then
    sed -n '2,20p' "$0"
    exit 2
fi
OUT_DIR=$(mkdir -p "$1" && cd "$1" && pwd)
shift
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(build test bench)
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
    build | test | bench | bench-sample_gating | bench-channel_sparse_conv | bench-skip_blocks | bench-models | headline) ;;
    *) echo "gpu_suite: unknown phase '$phase' (expected build, test, bench, bench-FAMILY or headline)" >&2; exit 2 ;;
    esac
done

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
        run "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . || { say "build failed: stopping"; exit 1; }
        info "$PYTHON" -c "import dynkernels, json; print(json.dumps(dynkernels.build_info(), indent=1))"
        ;;
    test)
        run_pytest "$PYTHON" -m pytest -q -rs python_tests -m "cuda or triton"
        run_pytest "$PYTHON" -m pytest -q -rs python_tests -m "not (cuda or triton)"
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
        for spec in channel_sparse_conv:150:170 skip_blocks:55:70 models:110:130; do
            IFS=: read -r family budget limit <<<"$spec"
            # HEADLINE_DEVICE=cpu HEADLINE_ARGS=--smoke: the same phase as a tiny CPU run (to check it)
            run timeout --kill-after=10 "$limit" "$PYTHON" -m dynkernels.bench --suite headline --only "$family" \
                --device "${HEADLINE_DEVICE:-cuda}" ${HEADLINE_ARGS:-} --out "$OUT_DIR" --budget-s "$budget" --no-plots
        done
        run "$PYTHON" -m dynkernels.bench --report-only --out "$OUT_DIR"  # the report with plots; prints the verdicts
        ;;
    esac
done
say "done (status $STATUS); files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
exit $STATUS
