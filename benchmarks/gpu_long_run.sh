#!/usr/bin/env bash
# What a longer run of the shipped CIFAR-10 recipe reaches: the same model and loss as the CPU model
# (cifar_bagnet9_s2, width 128, mean-window hinge, BCE pos-weight 3, AdamW lr 0.002, batch 128, EMA 0.999),
# trained for as many epochs as fit in TRAIN_SECONDS on one GPU, then certified on the full test set and
# attacked (PGD patches, soundness check) on a subset.
#
#   DATA=../shared/data/cifar10 OUT=runs/gpu_long TRAIN_SECONDS=330 bash benchmarks/gpu_long_run.sh
#
# train.py's --time-budget-minutes plans the epoch count from the measured speed, so the cosine schedule ends
# inside the budget (docs/training.md).
# Every number this writes is in OUT: config.json, train_log.jsonl, train_stdout.log, the model, the
# certify.py report (results.json, summary.md), the attack check and a fp32/bf16 training throughput run.
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10}
OUT=${OUT:-runs/gpu_long}
TRAIN_SECONDS=${TRAIN_SECONDS:-330}
DEVICE=${DEVICE:-cuda}
AMP=${AMP:---amp}
EXTRA=${EXTRA:-}
PY=${PY:-python3}
WORK=${WORK:-/tmp/bagcert_long}
export PYTHONUNBUFFERED=1 BAGCERT_CACHE=${BAGCERT_CACHE:-$WORK/cache}
mkdir -p "$OUT" "$WORK"
recipe=(--dataset "$DATA" --model cifar_bagnet9_s2 --model-kwargs '{"width":128}' --lr 0.002 --margin-reduce mean
        --bce-pos-weight 3 --ema 0.999 --batch-size 128 --device "$DEVICE" $AMP --no-progress --no-tensorboard $EXTRA)
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

# 1. the long run: train.py plans its epochs from the speed it measures (--time-budget-minutes; the budget starts
#    after the dataset is decoded and cached) and re-plans after every evaluation, so the cosine ends inside it.
#    Resumable; a timeout still leaves last.pt, exported below.
minutes=$("$PY" -c "import sys; print(float(sys.argv[1]) / 60)" "$TRAIN_SECONDS")
run="$WORK/long"
set +e
timeout $((TRAIN_SECONDS * 6 / 5 + 180)) "$PY" train.py "${recipe[@]}" --time-budget-minutes "$minutes" --eval-every 10 \
    --eval-images 1000 --checkpoint-minutes 2 --log-every 100 --resume --output "$run" 2>&1 | tee "$OUT/train_stdout.log"
set -e
if [ ! -f "$run/model.pt" ]; then
    "$PY" -c "import sys; from bagcert.training import export_checkpoint; export_checkpoint(sys.argv[1], sys.argv[1] + '/model.pt')" "$run"
fi
cp "$run/config.json" "$run/train_log.jsonl" "$OUT/"
cp "$run/model.pt" "$OUT/model_gpu_long.pt"

# 2. certify the full test set, then attack a subset (certify.py raises if a certified image is broken)
"$PY" certify.py --checkpoint "$run/model.pt" --dataset "$DATA" --patch-sizes 1,2,3,4,5,6,7,8,3x7,7x3,2x8,8x2 \
    --batch-size 1000 --device "$DEVICE" --no-progress --output "$WORK/report" --overwrite
cp "$WORK/report/results.json" "$WORK/report/summary.md" "$OUT/"
timeout 90 "$PY" certify.py --checkpoint "$run/model.pt" --dataset "$DATA" --patch-sizes 5 --num-images 200 \
    --attacks pgd --attack-steps 100 --attack-locations 40 --batch-size 200 --device "$DEVICE" --no-progress \
    --output "$WORK/attack" --overwrite && cp "$WORK/attack/summary.md" "$OUT/attack_summary.md" || echo "attack check did not finish"

# 3. training throughput on this device: certified loss vs cross-entropy, fp32 vs bf16
timeout 60 "$PY" benchmarks/train_throughput.py --device "$DEVICE" --rounds 5 --steps-per-round 20 \
    --output "$OUT/train_throughput.json" >/dev/null || echo "throughput run did not finish"
ls -la "$OUT"
