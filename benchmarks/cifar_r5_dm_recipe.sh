#!/usr/bin/env bash
# bagcert-cifar10-r5-dm: bagcert-cifar10-r5 (v2, 140.5 minutes of training) fine-tuned for its double-masking
# certificate with the masking loss (--loss masking) under a wall-clock budget, converted to its dense evaluation and
# certified on the full CIFAR-10 test set with double masking of the logits clipped to (-1, 1).
#
#   bash benchmarks/cifar_r5_dm_recipe.sh OUT [MINUTES] [THREADS]      (defaults: 8.5 minutes, 2 threads)
# Run it alone: the budget buys as many steps as the machine gives in that time (it re-plans at every evaluation,
# each half epoch, on 1,000 images). INIT (default: checkpoints/bagcert_cifar10_r5s2_v2.pt) and MODEL_KWARGS (default:
# {"width": 128}) start from another cifar_bagnet5_s2 run, e.g. MODEL_KWARGS='{"width": 128, "norm": "nf"}'.
set -euo pipefail
out=$1; minutes=${2:-8.5}; threads=${3:-2}
py=${PYTHON:-python}
data=${BAGCERT_CIFAR10:-../shared/data/cifar10}
$py train.py --dataset "$data" --init-from "${INIT:-checkpoints/bagcert_cifar10_r5s2_v2.pt}" \
    --model cifar_bagnet5_s2 --model-kwargs "${MODEL_KWARGS:-{\"width\": 128\}}" \
    --loss masking --masking-evidence logits --masking-clip 1.0 --masking-pairs greedy \
    --time-budget-minutes "$minutes" --lr 2e-4 --warmup-epochs 0 --margin-warmup-epochs 0 --schedule cosine \
    --ema 0.999 --amp --eval-every 0.5 --eval-images 1000 --checkpoint-minutes 4 --threads "$threads" --seed 0 \
    --output "$out/train" --no-progress ${EXTRA_TRAIN_FLAGS:-}
$py -c "
import sys, bagcert
from bagcert.models import to_dense
m, meta = bagcert.load_checkpoint(sys.argv[1] + '/train/model.pt')
meta['converted_from'] = {'path': sys.argv[1] + '/train/model.pt', 'by': 'bagcert.models.to_dense'}
bagcert.save_checkpoint(sys.argv[1] + '/dense.pt', to_dense(m), **meta)
" "$out"
$py certify.py --checkpoint "$out/dense.pt" --dataset "$data" --split test --patch-sizes 5 \
    --double-masking --double-masking-evidence logits --double-masking-clip=-1,1 \
    --threads "$threads" --output "$out/report" --overwrite --no-progress
