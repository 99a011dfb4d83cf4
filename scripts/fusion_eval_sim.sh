#!/usr/bin/env bash
# Fusion tuning checked against planted truth: simulate a log (biased policy, days 0-4) and a randomized test log
# (day 5), train the simulator config on days 0-3 (validate day 4), tune fusion weights on day 4 and judge on day 5
# against the planted attraction and utility as well as the simulated clicks, likes, shares and watch time.
# Outputs in reports/fusion_eval_sim/tune/. About 5 minutes on 2 cores, after setup.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/rankstage ] || bash scripts/setup.sh
OUT=${OUT:-reports/fusion_eval_sim}
SIM=runs/fusion_sim
R=.venv/bin/rankstage
$R simulate --out "$SIM/log" --rows 60000 --seed 0
.venv/bin/python -c "import pandas as pd, sys; pd.concat([pd.read_csv(f) for f in sys.argv[1:3]]).to_csv(sys.argv[3], index=False)" \
  "$SIM/log/train.csv" "$SIM/log/test.csv" "$SIM/log/all.csv"
$R train --config configs/simulated.yaml --data "$SIM/log/train.csv" --out "$SIM/run"
rm -rf "$SIM/models"
$R export --run "$SIM/run" --model-base-path "$SIM/models" --data "$SIM/log/train.csv"
$R tune-fusion --model-base-path "$SIM/models" --logs "$SIM/log/all.csv" --fusion configs/fusion_simulated.yaml \
  --group request --list-column request_id --order-column position \
  --truth-column true_attraction --truth-column true_utility --min-list 6 --k 3 \
  --tune-day 4 --eval-day 5 --trials 100 --seed 0 --out "$OUT/tune"
echo "report: $OUT/tune/tune.md $OUT/tune/tradeoff.png"
