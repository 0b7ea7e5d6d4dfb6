#!/usr/bin/env bash
# The CUDA checks and figures on one GPU machine, in one go. Each step has its own time limit and
# log, and a failed step does not stop the ones after it; the exit status counts the failures.
#
#   bench/gpu.sh [STEP ...]      (default: every step, in this order)
#
#   cuda-tests     the tests that need a GPU (masking without host sync, bf16 training over NCCL)
#   deepspeed      `deepspeed --num_gpus 1 launcher/train.py`: the demo job (pretrained MiniLM,
#                  bf16, NCCL, ZeRO-2), then the tiny job under ZeRO-3
#   efficiency     bench/efficiency.py --device cuda (vs naive, MFU against this GPU's bf16 peak,
#                  evaluation and reader ratios), kept under "gpu" in bench/results/efficiency.json,
#                  plus the eager step's operator table (--profile: bench/results/profile_cuda.txt),
#                  to find where the host time of the launch-bound eager step goes; then
#                  bench/host_overhead.py --device cuda (seqrec's step against a plain PyTorch step of
#                  a tiny model, eager and compiled: how much of that host time is seqrec's own)
#   quality        four bench/quality.py runs side by side on the one GPU (the eager step is bound by
#                  the host launching kernels, so one run leaves the GPU mostly idle), QUALITY_MINUTES
#                  each, every run at the product defaults (lr 1e-3, encoder at 0.3 x, weight decay 1):
#                  ML-1M with all 6 MiniLM layers; Beauty with 1 (its bench default) and with 6; and Beauty's
#                  published SASRec+ configuration (recipe sasrec). Logs: LOGS/quality-<run>.log
#
# Environment: PYTHON (python3), LOGS (logs/gpu), QUALITY_MINUTES (7.5), QUALITY_ARGS (extra
# bench/quality.py arguments), SEQREC_DATA_DIR (../shared/data).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${LOGS:-logs/gpu}
QUALITY_MINUTES=${QUALITY_MINUTES:-7.5}
QUALITY_ARGS=${QUALITY_ARGS:-}
export PYTHONUNBUFFERED=1 WANDB_MODE=${WANDB_MODE:-disabled}
mkdir -p "$LOGS"
failures=0

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=20 "$limit" bash -c '"$@"' "$name" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOGS/$name.log"
    echo "== $name: exit $rc after $((SECONDS - started)) s"
    [ "$rc" -eq 0 ] || failures=$((failures + 1))
}

deepspeed_runs() {
    "$PYTHON" -m seqrec synth --preset demo --out shards/synthetic-demo.csv &&
    "$PYTHON" -m seqrec prepare shards/synthetic-demo.csv --out shards/synthetic-demo --shard-size 500 --quiet &&
    "$PYTHON" -m seqrec synth --preset tiny --out shards/synthetic-tiny.csv &&
    "$PYTHON" -m seqrec prepare shards/synthetic-tiny.csv --out shards/synthetic-tiny --shard-size 50 --quiet &&
    "$PYTHON" -m deepspeed.launcher.runner --num_gpus 1 launcher/train.py --config configs/demo.yaml \
        --set distributed.deepspeed_config=configs/deepspeed/zero2.json --set run_dir=runs/gpu-demo &&
    "$PYTHON" -m deepspeed.launcher.runner --num_gpus 1 launcher/train.py --config configs/tiny.yaml \
        --set distributed.zero_stage=3 --set run_dir=runs/gpu-tiny-zero3 &&
    "$PYTHON" - <<'EOF'
import json
for run in ("runs/gpu-demo", "runs/gpu-tiny-zero3"):
    metrics = json.load(open(f"{run}/metrics.json"))
    print(run, {key: metrics.get(key) for key in ("device", "precision", "backend", "zero_stage", "sequences_per_s", "train_seconds")},
          "test NDCG@10", metrics["test"]["NDCG@10"], "popularity", metrics["popularity"]["test"]["NDCG@10"])
    assert metrics["device"].startswith("cuda") and metrics["backend"] == "nccl", metrics
EOF
}

quality_runs() {  # quality_runs MINUTES: each run in the background, then wait for all
    local minutes=$1 failed=0 name pid
    local budget="--minutes $minutes --set train.epochs=1000 --set train.patience=10"
    # Prepared once up front, so the runs do not race to write the same shards.
    "$PYTHON" -c "import sys; sys.path.insert(0, 'bench'); import quality; quality.prepared('ml-1m'); quality.prepared('beauty')" || return 1
    declare -A runs=(
        [ml-1m-6-layers]="--dataset ml-1m --keep-layers 6 --recipes default $budget --label gpu-6-layers-defaults-$minutes-min"
        [beauty-1-layer]="--dataset beauty --recipes default $budget --set train.eval_every=3 --label gpu-1-layer-$minutes-min"
        [beauty-6-layers]="--dataset beauty --keep-layers 6 --recipes default $budget --set train.eval_every=3 --label gpu-6-layers-$minutes-min"
        [beauty-sasrec]="--dataset beauty --recipes sasrec $budget --set train.eval_every=2 --label gpu-$minutes-min"
    )
    declare -A pids=()
    for name in "${!runs[@]}"; do
        # shellcheck disable=SC2086  (the run's arguments are words)
        OMP_NUM_THREADS=3 "$PYTHON" bench/quality.py ${runs[$name]} $QUALITY_ARGS >"$LOGS/quality-$name.log" 2>&1 &
        pids[$name]=$!
    done
    for name in "${!pids[@]}"; do
        pid=${pids[$name]}
        if wait "$pid"; then
            echo "$name: $(grep -E 'test metrics' -A2 "$LOGS/quality-$name.log" | tail -n 1)"
        else
            echo "$name: failed (log $LOGS/quality-$name.log)"; failed=1
        fi
    done
    return $failed
}

export -f deepspeed_runs quality_runs
export PYTHON QUALITY_ARGS LOGS
minutes_limit() { awk -v m="$1" 'BEGIN { print int(m * 60 + 180) }'; }

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(cuda-tests deepspeed efficiency quality)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for name in "${steps[@]}"; do
    case $name in
        cuda-tests) step cuda-tests 300 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_masking.py tests/test_train.py -k cuda ;;
        deepspeed) step deepspeed 300 deepspeed_runs ;;
        efficiency) step efficiency 600 "$PYTHON" bench/efficiency.py --device cuda --profile
                    step host-overhead 300 "$PYTHON" bench/host_overhead.py --device cuda ;;
        quality) step quality "$(minutes_limit "$QUALITY_MINUTES")" quality_runs "$QUALITY_MINUTES" ;;
        *) echo "unknown step $name"; failures=$((failures + 1)) ;;
    esac
done
echo "gpu.sh: $failures step(s) failed"
exit $((failures > 0))
