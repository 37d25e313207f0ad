#!/usr/bin/env bash
# The ImageNet recipe on one GPU, in under ten minutes: a few hundred steps of BagNet-17 at 224 px on the streaming
# data path under torchrun (nccl), the data path alone against the model alone, and the certificate's cost against a
# forward pass with a check that it never synchronises with the host. Everything it measures goes into OUT.
#
#   OUT=results/gpu_imagenet bash benchmarks/gpu_imagenet_smoke.sh                      # on a GPU machine
#   DEVICE=cpu STEPS=3 N=120 CLASSES=4 SIZE=64 BATCH=8 WORKERS=1 OUT=/tmp/gpu_smoke bash benchmarks/gpu_imagenet_smoke.sh
#
# The data are a synthetic ImageNet-like JPEG folder (benchmarks/data_path.write_imagenet_like_folder), so the run
# needs no dataset; DATA=<folder> uses a real one (ImageFolder layout) instead.
set -euo pipefail
OUT=${OUT:-results/gpu_imagenet}
DEVICE=${DEVICE:-cuda}
N=${N:-6000}
CLASSES=${CLASSES:-100}
MODEL=${MODEL:-bagnet17}
SIZE=${SIZE:-224}
BATCH=${BATCH:-128}
STEPS=${STEPS:-300}
WORKERS=${WORKERS:-12}
PY=${PY:-python3}
WORK=${WORK:-/tmp/bagcert_gpu_imagenet}
export PYTHONUNBUFFERED=1 BAGCERT_NO_CACHE=1
mkdir -p "$OUT" "$WORK"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" | tee "$OUT/device.txt"
BACKEND_FLAGS=()
[ "$DEVICE" = cpu ] || BACKEND_FLAGS=(--amp --channels-last)

# 1. the data: a synthetic ImageNet-like folder unless DATA is given
DATA=${DATA:-$WORK/folder_${N}_${CLASSES}}
if [ ! -f "$DATA/.complete" ] && [ ! -d "$DATA/train" ]; then
    "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from data_path import write_imagenet_like_folder as w; w(sys.argv[1], int(sys.argv[2]), classes=int(sys.argv[3]))" \
        "$DATA" "$N" "$CLASSES"
    touch "$DATA/.complete"
fi

# 2. STEPS steps of the recipe under torchrun (nccl on CUDA, gloo on the CPU): streaming loader, bf16, channels_last
run="$WORK/train"
rm -rf "$run"
timeout 420 torchrun --standalone --nproc-per-node 1 train.py --dataset "$DATA" --model "$MODEL" --num-classes "$CLASSES" \
    --image-size "$SIZE" --batch-size "$BATCH" --max-steps "$STEPS" --epochs 100 --data-path stream --workers "$WORKERS" \
    --device "$DEVICE" "${BACKEND_FLAGS[@]}" --log-every 20 --eval-every 1000000 --eval-images 256 --no-tensorboard \
    --no-progress --output "$run" 2>&1 | tee "$OUT/train_stdout.log"
cp "$run/config.json" "$run/train_log.jsonl" "$OUT/"

# 3. data path alone against model alone (images/s), on this machine
"$PY" - "$DATA" "$MODEL" "$CLASSES" "$SIZE" "$BATCH" "$WORKERS" "$DEVICE" <<'EOF' | tee "$OUT/throughput.json"
import json, sys, time
sys.path.insert(0, "benchmarks")
import torch
import bagcert
from imagenet_scale import data_alone
from bagcert.report import environment_info
folder, model_name, classes, size, batch, workers, device = sys.argv[1:]
classes, size, batch, workers = int(classes), int(size), int(batch), int(workers)
data = data_alone(folder, size, round(size * 256 / 224), batch, workers, limit=20 * batch)
model = bagcert.create_model(model_name, num_classes=classes).to(device).eval().to(memory_format=torch.channels_last)
x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
amp = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
with torch.no_grad(), amp:
    for _ in range(2):
        model.local_logits(x)
    if device != "cpu":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        model.local_logits(x)
    if device != "cpu":
        torch.cuda.synchronize()
model_ips = 5 * batch / (time.perf_counter() - t)
print(json.dumps({"env": environment_info(device), "data_alone_images_per_s": data, "model_forward_bf16_images_per_s": model_ips,
                  "workers": workers, "batch": batch, "image_size": size, "model": model_name}, indent=2))
EOF

# 4. certificate against forward pass; on a GPU also under set_sync_debug_mode("error")
SYNC=()
[ "$DEVICE" = cpu ] || SYNC=(--sync-debug)
"$PY" benchmarks/certify_overhead.py --model "$MODEL" --image-size "$SIZE" --batch-size "$BATCH" --repeats 9 \
    --device "$DEVICE" "${SYNC[@]}" --output "$OUT/certify_overhead.json"
ls -la "$OUT"
