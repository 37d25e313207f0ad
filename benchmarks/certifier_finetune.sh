#!/usr/bin/env bash
# Does training for the double-masking certifier certify more than training for votes?
# Two arms fine-tune the shipped bagcert-cifar10-r5 (v2) weights for the same number of steps, the same schedule
# and seed, one with the votes loss (--loss bagcert, the recipe's) and one with the masking loss (--loss masking);
# each is converted to its dense evaluation and certified with double masking of clipped logits (the default
# certificate of bagcert-cifar10-r5-dense) on the full CIFAR-10 test set.
#
#   bash benchmarks/certifier_finetune.sh ARM STEPS OUT [THREADS]
#   ARM: votes | masking        STEPS: optimiser steps (fixed, so that a busy machine changes time, not results)
set -euo pipefail
arm=$1; steps=$2; out=$3; threads=${4:-1}
py=${PYTHON:-python}
data=${BAGCERT_CIFAR10:-../shared/data/cifar10}
case $arm in
  votes) loss=(--loss bagcert) ;;
  masking) loss=(--loss masking --masking-evidence logits --masking-clip 1.0 --masking-pairs greedy) ;;
  *) echo "ARM must be votes or masking, got $arm" >&2; exit 2 ;;
esac
epochs=$(awk -v s="$steps" 'BEGIN { printf "%.4f", s / 390.625 }')  # 50,000 images / batch 128 per epoch
$py train.py --dataset "$data" --init-from checkpoints/bagcert_cifar10_r5s2_v2.pt \
    --model cifar_bagnet5_s2 --model-kwargs '{"width": 128}' "${loss[@]}" \
    --epochs "$epochs" --max-steps "$steps" --lr 2e-4 --warmup-epochs 0 --margin-warmup-epochs 0 --schedule cosine --ema 0.999 --amp \
    --eval-every 1000 --eval-images 1000 --checkpoint-minutes 4 --threads "$threads" --seed 0 \
    --output "$out/train" --no-progress
$py -c "
import sys, bagcert
from bagcert.models import to_dense
m, meta = bagcert.load_checkpoint(sys.argv[1] + '/train/model.pt')
meta['converted_from'] = {'path': sys.argv[1] + '/train/model.pt', 'by': 'bagcert.models.to_dense'}
bagcert.save_checkpoint(sys.argv[1] + '/dense.pt', to_dense(m), **meta)
" "$out"
$py certify.py --checkpoint "$out/dense.pt" --dataset "$data" --split test --patch-sizes 5 \
    --double-masking --double-masking-evidence logits --double-masking-clip=-1,1 \
    --threads "$threads" --output "$out/report" --overwrite
