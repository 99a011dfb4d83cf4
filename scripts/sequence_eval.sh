#!/usr/bin/env bash
# configs/kuairand.yaml (the default, with the cross-day behaviour sequence) against configs/kuairand_nosequence.yaml on
# the ten KuaiRand-Pure days (both CSVs): trained through May 3, judged on May 4, and through May 2, judged on
# May 3 (data.until; the judged day is the validation day, as in docs/results.md), seeds 0 and 1; then each pair
# paired on the same rows (compare-runs), and serving cost at 500 candidates of the seed-0 May 4 models
# (benchmarks/serving.py, latency phase only). Results: benchmarks/results/sequence.md. ~30 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RS=${RS:-.venv/bin/rankstage}
LOGS='[../shared/data/kuairand-pure/log_standard_pure_20220425_to_20220430.csv, ../shared/data/kuairand-pure/log_standard_pure_20220501_to_20220504.csv]'
for until in 20220504 20220503; do
  day=may$((${until: -1}))
  for seed in 0 1; do
    for variant in base:configs/kuairand_nosequence.yaml seq:configs/kuairand.yaml; do
      "$RS" train --config "${variant#*:}" --out "runs/${variant%%:*}_${day}_s$seed" --set "data.log=$LOGS" \
        --set data.until=$until --set training.seed=$seed > "runs/${variant%%:*}_${day}_s$seed.log" 2>&1
    done
    "$RS" compare-runs base="runs/base_${day}_s$seed" sequence="runs/seq_${day}_s$seed" \
      --out "reports/sequence_${day}_s$seed" > /dev/null
  done
done
"$PY" - <<'PY'
import json
rows = [("click", "auc"), ("click", "gauc"), ("like", "auc"), ("long_view", "auc"), ("watch_time", "spearman")]
for day in ("may4", "may3"):
    for seed in (0, 1):
        m = {v: json.load(open(f"runs/{v}_{day}_s{seed}/metrics.json"))["tasks"] for v in ("base", "seq")}
        print(day, seed, " ".join(f"{t}/{k} {m['base'][t][k]:.4f} {m['seq'][t][k]:.4f} {m['seq'][t][k] - m['base'][t][k]:+.4f}"
                                for t, k in rows))
PY
for v in base seq; do
  "$RS" export --run "runs/${v}_may4_s0" --model-base-path "models/sequence_eval_$v" > /dev/null
  "$PY" benchmarks/serving.py --model "models/sequence_eval_$v" --sizes 500 --duration 0 --reload-backends \
    --out "benchmarks/results/sequence_serving_$v.json"
done
