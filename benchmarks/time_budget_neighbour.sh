#!/usr/bin/env bash
# Does a time-budgeted run still end on time when another job starts on the machine after its plan?
#
#   OUT=docs/results/time_budget_neighbour BUDGET_MINUTES=15 NEIGHBOUR_AFTER_S=150 bash benchmarks/time_budget_neighbour.sh
#
# 1. The measured run: the shipped rf-5 recipe with --time-budget-minutes BUDGET_MINUTES, one thread, evaluating
#    500 held-out images every epoch (so it can re-plan every epoch). It plans alone on the machine.
# 2. NEIGHBOUR_AFTER_S seconds after the start, a neighbour job starts: a second training run with
#    NEIGHBOUR_THREADS threads (on a 2-core machine, 2 threads oversubscribe the cores). It is killed when the
#    measured run ends.
# 3. A summary (summary.json, printed): the budget, the run's wall time, its plan and every re-plan, with the end
#    time the previous plan would have had at the speed measured then (projected_seconds_before).
# OUT receives config.json, train_log.jsonl, stdout.log of the measured run and summary.json.
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10}
OUT=${OUT:-runs/time_budget_neighbour}
BUDGET_MINUTES=${BUDGET_MINUTES:-15}
NEIGHBOUR_AFTER_S=${NEIGHBOUR_AFTER_S:-150}
NEIGHBOUR_THREADS=${NEIGHBOUR_THREADS:-2}
PY=${PY:-python3}
WORK=${WORK:-/tmp/bagcert_budget_neighbour}
export PYTHONUNBUFFERED=1
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK"
recipe=(--dataset "$DATA" --model cifar_bagnet5_s2 --model-kwargs '{"width":128}' --lr 0.002 --margin-reduce mean
        --bce-pos-weight 3 --ema 0.999 --amp --no-progress --no-tensorboard)
# decode and cache the dataset first, so that neither run spends its time on JPEG decoding
"$PY" -c "import sys; from bagcert.data import load_dataset; load_dataset(sys.argv[1], 'train'); load_dataset(sys.argv[1], 'test')" "$DATA"

OMP_NUM_THREADS=1 "$PY" train.py "${recipe[@]}" --threads 1 --time-budget-minutes "$BUDGET_MINUTES" --eval-every 1 \
    --eval-images 500 --checkpoint-minutes 4 --output "$WORK/run" > "$OUT/stdout.log" 2>&1 &
run_pid=$!
sleep "$NEIGHBOUR_AFTER_S"
OMP_NUM_THREADS=$NEIGHBOUR_THREADS "$PY" train.py "${recipe[@]}" --threads "$NEIGHBOUR_THREADS" --epochs 1000 \
    --eval-images 100 --checkpoint-minutes 1000 --output "$WORK/neighbour" > "$WORK/neighbour.log" 2>&1 &
neighbour_pid=$!
wait $run_pid
kill $neighbour_pid 2>/dev/null || true
wait $neighbour_pid 2>/dev/null || true
cp "$WORK/run/config.json" "$WORK/run/train_log.jsonl" "$OUT/"

"$PY" - "$OUT" "$BUDGET_MINUTES" "$NEIGHBOUR_AFTER_S" "$NEIGHBOUR_THREADS" <<'PYEOF'
import datetime, json, os, sys
from bagcert.report import hardware_string
out, budget_min, after_s, threads = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
recs = [json.loads(l) for l in open(os.path.join(out, "train_log.jsonl"))]
done = [r for r in recs if r.get("done")][-1]
plans = [dict(step=r["step"], kind=k, **r[k]) for r in recs for k in ("time_budget_plan", "time_budget_replan") if k in r]
summary = {
    "date": datetime.date.today().isoformat(), "hardware": hardware_string("cpu", threads=1),
    "budget_seconds": 60 * budget_min, "wall_seconds": done["wall_seconds"],
    "over_budget_percent": 100 * (done["wall_seconds"] / (60 * budget_min) - 1),
    "steps": done["steps"], "neighbour_after_seconds": after_s, "neighbour_threads": threads, "plans": plans,
}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(json.dumps({k: v for k, v in summary.items() if k != "plans"}, indent=2))
for p in plans:
    before = p.get("projected_seconds_before")
    print(f"step {p['step']:>6} {p['kind']:<19} {p['seconds_per_step']:.3f} s/step -> {p['total_steps']} steps"
          + (f" (the previous plan would have ended at {before:.0f} s)" if before is not None else ""))
PYEOF
