#!/usr/bin/env bash
# Fusion evidence, reproducible: a model that has not seen Apr 30, calibration and fusion tuned on Apr 29,
# everything judged on Apr 30.
#   train Apr 25-28 (validate / early-stop on Apr 29; no refit) -> export -> calibrate (fit Apr 29, judge Apr 30)
#   -> replay Apr 30 with the hand-set profiles -> tune-fusion on Apr 29, judge on Apr 30.
# Outputs in reports/fusion_eval/ (calibration/, replay/, tune/). About 10 minutes on 2 cores, after setup.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/rankstage ] || bash scripts/setup.sh
OUT=${OUT:-reports/fusion_eval}
TRIALS=${TRIALS:-300}
RUN=runs/until_20220429
MODELS=models/until_20220429
R=.venv/bin/rankstage
$R train --config configs/kuairand.yaml --set data.until=20220429 --out "$RUN"
rm -rf "$MODELS"
$R export --run "$RUN" --model-base-path "$MODELS"
$R calibrate --model-base-path "$MODELS" --fit-day 20220429 --eval-day 20220430 --method platt \
  --tasks click like long_view watch_time completion --out "$OUT/calibration"
$R replay --model-base-path "$MODELS" --fusion configs/fusion.yaml --day 20220430 --out "$OUT/replay"
$R tune-fusion --model-base-path "$MODELS" --fusion configs/fusion.yaml --tune-day 20220429 --eval-day 20220430 \
  --trials "$TRIALS" --seed 0 --out "$OUT/tune"
echo "reports: $OUT/calibration/calibration.md $OUT/replay/replay.md $OUT/tune/tune.md $OUT/tune/tradeoff.png"
