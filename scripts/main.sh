#!/usr/bin/env bash
# The main job on the bundled real data: set up, train on KuaiRand Apr 25-29 (validate Apr 30, then refit on the
# whole window), export a versioned SavedModel, score logged requests with it and rank them by the hand-set fusion.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-runs/kuairand}
.venv/bin/rankstage train --config configs/kuairand.yaml --out "$RUN" --refit
.venv/bin/rankstage export --run "$RUN" --model-base-path models/ranker
.venv/bin/rankstage score --model-base-path models/ranker --requests 3 --top-k 5 --fusion configs/fusion.yaml
