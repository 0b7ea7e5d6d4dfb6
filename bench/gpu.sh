#!/usr/bin/env bash
# The CUDA checks and figures on one GPU machine, in one go. Each step has its own time limit and
# log, and a failed step does not stop the ones after it; the exit status counts the failures.
#
#   bench/gpu.sh [STEP ...]      (default: every step, in this order)
#
#   cuda-tests     the tests that need a GPU (masking and the divergence watch without host sync,
#                  bf16 training over NCCL, stopped by a signal and resumed, resumed under ZeRO-3)
#   deepspeed      `deepspeed --num_gpus 1 launcher/train.py`: the demo job (pretrained MiniLM,
#                  bf16, NCCL, ZeRO-2) and `seqrec evaluate` of its model on the GPU, then the tiny
#                  job under ZeRO-3
#   efficiency     bench/efficiency.py --device cuda (vs naive, MFU against this GPU's bf16 peak,
#                  evaluation and reader ratios), kept under "gpu" in bench/results/efficiency.json,
#                  plus the eager step's operator table (--profile: bench/results/profile_cuda.txt),
#                  to find where the host time of the launch-bound eager step goes; then
#                  bench/host_overhead.py --device cuda (seqrec's step against a plain PyTorch step of
#                  a tiny model, eager and compiled: how much of that host time is seqrec's own); then
#                  bench/activation_memory.py --device cuda (a step's memory and time with
#                  model.activation_checkpointing 0, 1 and 2: all 6 layers, batch 256 x length 200)
#   quality        six bench/quality.py runs side by side on the one GPU (the eager step is bound by
#                  the host launching kernels, so one run leaves the GPU mostly idle), each capped at
#                  QUALITY_MINUTES: ML-1M with all 6 layers at the product defaults, and Beauty's
#                  CPU bench command (first 2 MiniLM layers, mask 0.4 and weight decay 2.5, 40
#                  epochs), each at seeds 0-2, so every GPU figure has seeds beside it (Beauty with
#                  all 6 layers fell behind 2 at 9e64fcb and is no longer run). A run the cap
#                  reaches re-plans its decay to end there and records its epochs.
#                  Logs: LOGS/quality-<run>.log
#
# Environment: PYTHON (python3), LOGS (logs/gpu), QUALITY_MINUTES (6: with the 180 s
# allowance for preparing and merging, the step fits a 600 s call), QUALITY_ARGS (extra
# bench/quality.py arguments), SEQREC_DATA_DIR (../shared/data).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${LOGS:-logs/gpu}
QUALITY_MINUTES=${QUALITY_MINUTES:-6}
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
    "$PYTHON" -m seqrec evaluate --model runs/gpu-demo/model --dataset shards/synthetic-demo --device cuda --precision bf16 \
        --predictions runs/gpu-demo/test-predictions.jsonl --quiet &&
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
    local beauty="--dataset beauty --recipes default --epochs 40 --minutes $minutes --set train.patience=8 --set train.eval_every=2"
    # Prepared once up front, so the runs do not race to write the same shards.
    "$PYTHON" -c "import sys; sys.path.insert(0, 'bench'); import quality; quality.prepared('ml-1m'); quality.prepared('beauty')" || return 1
    local ml1m="--dataset ml-1m --keep-layers 6 --recipes default --minutes $minutes --set train.epochs=1000 --set train.patience=10"
    declare -A runs=()
    local seed
    for seed in 0 1 2; do
        runs[ml-1m-6-layers-seed-$seed]="$ml1m --set train.seed=$seed --label gpu-6-layers-seed-$seed-$minutes-min"
        runs[beauty-seed-$seed]="$beauty --set train.seed=$seed --label gpu-seed-$seed-40-epochs"
    done
    declare -A pids=()
    for name in "${!runs[@]}"; do
        # shellcheck disable=SC2086  (the run's arguments are words)
        OMP_NUM_THREADS=2 "$PYTHON" bench/quality.py ${runs[$name]} $QUALITY_ARGS >"$LOGS/quality-$name.log" 2>&1 &
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
        cuda-tests) step cuda-tests 300 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_masking.py tests/test_train.py tests/test_divergence.py tests/test_stop_signals.py tests/test_distributed.py tests/test_export_eval.py -k cuda ;;
        deepspeed) step deepspeed 300 deepspeed_runs ;;
        efficiency) step efficiency 600 "$PYTHON" bench/efficiency.py --device cuda --profile
                    step host-overhead 300 "$PYTHON" bench/host_overhead.py --device cuda
                    step activation-memory 300 "$PYTHON" bench/activation_memory.py --device cuda --batch 256 ;;
        quality) step quality "$(minutes_limit "$QUALITY_MINUTES")" quality_runs "$QUALITY_MINUTES" ;;
        *) echo "unknown step $name"; failures=$((failures + 1)) ;;
    esac
done
echo "gpu.sh: $failures step(s) failed"
exit $((failures > 0))
