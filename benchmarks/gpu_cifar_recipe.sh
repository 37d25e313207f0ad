#!/usr/bin/env bash
# The paper-scale CIFAR-10 recipe for one GPU: a wider and deeper rf-5 region scorer trained at stride 2 (cheap),
# then fine-tuned and certified as its dense evaluation (every pixel a location, the same weights; see
# docs/certification.md#dense-evaluation), all inside a stated time, everything written into one folder.
#
#   DATA=../shared/data/cifar10 OUT=runs/gpu_recipe bash benchmarks/gpu_cifar_recipe.sh
#
# Stages (train.py plans each stage's epochs from the speed it measures, --time-budget-minutes, so each cosine
# schedule ends inside its budget; both stages are resumable: a rerun with the same OUT continues them):
#   1. strided training, STAGE1_SECONDS (default 420 s = 7 min)
#   2. dense fine-tuning from stage 1 for the double-masking certificate (STAGE2_LOSS, default masking: --loss masking,
#      docs/experiments/2026-12-05-masking-loss.md; bagcert for the votes loss), STAGE2_SECONDS (default 120 s = 2 min);
#      together 9 minutes of training
#   3. certify.py on the full test set (dense), then PGD and certificate-guided PGD on ATTACK_IMAGES test images
#      (certify.py exits non-zero if any certificate is broken)
#   4. the best one-pass certificate on CPU so far: double masking of the local logits clipped to (-1, 1), 5x5, on the
#      full test set (report_double_masking/), and PGD / certificate-guided PGD judged by its defended prediction on
#      DM_ATTACK_IMAGES images (benchmarks/double_masking_accuracy.py, on the host's CPU cores; it lists any broken image)
# OUT receives: stage1/ and stage2/ (config.json, train_log.jsonl, train_stdout.log, model.pt), report/ (results.json,
# summary.md, per_sample.csv), attack/ and attack_adaptive/ (summary.md), env.txt (torch, device, date).
#
# CPU smoke test (tiny budget, a 3,000-image training subset, 200 test images):
#   DEVICE=cpu STAGE1_SECONDS=150 STAGE2_SECONDS=150 TEST_IMAGES=200 ATTACK_IMAGES=10 ATTACK_STEPS=5 DM_ATTACK_IMAGES=4 \
#       EXTRA="--train-limit 3000 --threads 2" KWARGS='{"width":32}' PY=.venv/bin/python \
#       OUT=/tmp/gpu_recipe_smoke bash benchmarks/gpu_cifar_recipe.sh
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10}
OUT=${OUT:-runs/gpu_recipe}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-cifar_bagnet5_s2}
KWARGS=${KWARGS:-'{"width":384,"depth":8}'}
STAGE1_SECONDS=${STAGE1_SECONDS:-420}
STAGE2_SECONDS=${STAGE2_SECONDS:-120}
STAGE2_LOSS=${STAGE2_LOSS:-masking}
BATCH=${BATCH:-512}
LR=${LR:-0.004}
TEST_IMAGES=${TEST_IMAGES:-0}          # 0: the full test set
ATTACK_IMAGES=${ATTACK_IMAGES:-500}
ATTACK_STEPS=${ATTACK_STEPS:-100}
DM_ATTACK_IMAGES=${DM_ATTACK_IMAGES:-100}
EXTRA=${EXTRA:-}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 BAGCERT_CACHE=${BAGCERT_CACHE:-/tmp/bagcert_recipe_cache}
mkdir -p "$OUT"
"$PY" - "$OUT/env.txt" <<'EOF'
import datetime, platform, sys, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
text = f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\ntorch {torch.__version__}\ndevice {name}\n"
open(sys.argv[1], "w").write(text)
print(text, end="")
EOF
minutes() { "$PY" -c "import sys; print(float(sys.argv[1]) / 60)" "$1"; }
dense_kwargs=$("$PY" -c "import json, sys; k = json.loads(sys.argv[1]); k['dense'] = True; print(json.dumps(k))" "$KWARGS")
common=(--dataset "$DATA" --model "$MODEL" --margin-reduce mean --bce-pos-weight 3 --ema 0.999 --amp
        --device "$DEVICE" --eval-images 1000 --checkpoint-minutes 2 --log-every 100 --no-progress --no-tensorboard
        --resume $EXTRA)

# 1. strided training
"$PY" train.py "${common[@]}" --model-kwargs "$KWARGS" --batch-size "$BATCH" --lr "$LR" \
    --time-budget-minutes "$(minutes "$STAGE1_SECONDS")" --eval-every 10 --output "$OUT/stage1" \
    2>&1 | tee -a "$OUT/stage1.log"
# 2. dense fine-tuning from stage 1's EMA weights: a tenth of the peak learning rate, no warm-up, the masking loss
loss2=(--loss "$STAGE2_LOSS"); [ "$STAGE2_LOSS" = masking ] && loss2+=(--masking-evidence logits --masking-clip 1.0)
"$PY" train.py "${common[@]}" "${loss2[@]}" --model-kwargs "$dense_kwargs" --init-from "$OUT/stage1/model.pt" --batch-size "$BATCH" \
    --lr "$("$PY" -c "import sys; print(float(sys.argv[1]) / 10)" "$LR")" --warmup-epochs 0 --margin-warmup-epochs 0 \
    --time-budget-minutes "$(minutes "$STAGE2_SECONDS")" --eval-every 1 --output "$OUT/stage2" \
    2>&1 | tee -a "$OUT/stage2.log"
# 3. certify every test image, then attack a subset
n=(); [ "$TEST_IMAGES" -gt 0 ] && n=(--num-images "$TEST_IMAGES")
"$PY" certify.py --checkpoint "$OUT/stage2/model.pt" --dataset "$DATA" "${n[@]}" \
    --patch-sizes 1,2,3,4,5,6,7,8,3x7,7x3,2x8,8x2 --batch-size 1000 --device "$DEVICE" --no-progress \
    --output "$OUT/report" --overwrite
for attack in pgd pgd-adaptive; do
    folder=attack; [ "$attack" = pgd-adaptive ] && folder=attack_adaptive
    "$PY" certify.py --checkpoint "$OUT/stage2/model.pt" --dataset "$DATA" --patch-sizes 5 --num-images "$ATTACK_IMAGES" \
        --attacks "$attack" --attack-steps "$ATTACK_STEPS" --attack-locations 20 --batch-size 250 --device "$DEVICE" \
        --no-progress --output "$OUT/$folder" --overwrite
done
# 4. double masking of clipped logits (docs/peers.md), and the attacks judged by its prediction
"$PY" certify.py --checkpoint "$OUT/stage2/model.pt" --dataset "$DATA" "${n[@]}" --patch-sizes 5 --double-masking \
    --double-masking-evidence logits --batch-size 1000 --device "$DEVICE" --no-progress \
    --output "$OUT/report_double_masking" --overwrite
"$PY" benchmarks/double_masking_accuracy.py --checkpoint "$OUT/stage2/model.pt" --dataset "$DATA" \
    --num-images "$DM_ATTACK_IMAGES" --logit-clips=-1:1 --adversary-images 0 --pgd-images "$DM_ATTACK_IMAGES" \
    --pgd-evidence logits --pgd-clip=-1:1 --output "$OUT/double_masking_pgd_check.json"
ls -la "$OUT" "$OUT/report" "$OUT/report_double_masking"
