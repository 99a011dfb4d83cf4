#!/usr/bin/env bash
# The level of each task on the next day, before / after post-hoc calibration fitted on the exported version's own
# predictions of the run's validation day
# (no --refit: a refit version trained on that day, and calibrate refuses it). Two held-out days: Apr 30 (window
# through Apr 29) and Apr 29 (through Apr 28).
# Results: $OUT/cal_<until>/calibration.md (default OUT=/tmp/next_day_level). ~4 min per day on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/next_day_level}
mkdir -p "$OUT"
for pair in "20220429 20220430" "20220428 20220429"; do
  set -- $pair
  until=$1 judged=$2
  echo "window through $until, judged on $judged"
  .venv/bin/rankstage train --config configs/kuairand.yaml --set data.until="$until" \
    --out "$OUT/run_$until" > "$OUT/train_$until.log" 2>&1
  .venv/bin/rankstage export --run "$OUT/run_$until" --model-base-path "$OUT/models_$until" > "$OUT/export_$until.log" 2>&1
  .venv/bin/rankstage calibrate --model-base-path "$OUT/models_$until" --from-run "$OUT/run_$until" \
    --eval-day "$judged" --method platt --tasks click like long_view watch_time completion --out "$OUT/cal_$until" \
    | grep -v "^W0000\|^I0000"
done
