#!/usr/bin/env bash
# bench/gpu.sh's checks and figures fitted into one device call of BUDGET_S seconds, with what
# they wrote packed into OUT_DIR (the device tool's $OUT) before the budget runs out.
#
#   bench/gpu_lease.sh BUDGET_S OUT_DIR
#
# A lease is short (minutes of device time per session, one start), so the steps overlap where
# their figures allow it: the CUDA tests and the deepspeed runs (correctness checks, whose timings
# are not figures) run beside the quality runs, which are capped in minutes but need no timing.
# The efficiency benchmark times steps, so it runs alone after them, in whatever time is left (it
# writes its headline first and each further setting after, so a cut-short run keeps what it
# measured). Unpacks bench/gpu_kit.sh's kit first where the tree carries one.
# Environment: QUALITY_MINUTES (5), LOGS (logs/gpu), PYTHON (python3), GPU_SH (bench/gpu.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:?usage: bench/gpu_lease.sh BUDGET_S OUT_DIR}
out=${2:?usage: bench/gpu_lease.sh BUDGET_S OUT_DIR}
started=$SECONDS
export LOGS=${LOGS:-logs/gpu} PYTHON=${PYTHON:-python3} QUALITY_MINUTES=${QUALITY_MINUTES:-5}
GPU_SH=${GPU_SH:-bench/gpu.sh}
mkdir -p "$LOGS" "$out"
if [ -d "${KIT:-.gpu}" ]; then
    # shellcheck source=bench/gpu_kit.sh
    source bench/gpu_kit.sh unpack || exit 1
fi
git log -1 --format='code %h %s' 2>/dev/null | cut -c1-100 || true
"$PYTHON" -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())"

pack_results() {
    tar czf "$out/gpu-results.tgz" "$LOGS" bench/results $(ls runs/*/metrics.json 2>/dev/null) 2>/dev/null
    echo "gpu_lease: packed after $((SECONDS - started)) s"
}
trap pack_results EXIT

OMP_NUM_THREADS=2 "$GPU_SH" cuda-tests deepspeed >"$LOGS/checks.txt" 2>&1 &
checks=$!
"$GPU_SH" quality >"$LOGS/quality.txt" 2>&1
echo "quality: exit $? after $((SECONDS - started)) s"; grep -E '^(ml-1m|beauty)' "$LOGS/quality.txt"
wait "$checks"
echo "checks: exit $? after $((SECONDS - started)) s"; grep -E '^== .*: exit|passed|failed' "$LOGS/checks.txt"

left=$((budget - (SECONDS - started) - 25))
if [ "$left" -ge 60 ]; then
    timeout --kill-after=10 "$left" "$PYTHON" bench/efficiency.py --device cuda --profile >"$LOGS/efficiency.log" 2>&1
    echo "efficiency: exit $? after $((SECONDS - started)) s (limit $left s)"; tail -n 15 "$LOGS/efficiency.log"
else
    echo "efficiency: skipped, $left s left"
fi
