#!/usr/bin/env bash
# The main job on the bundled real data: set up; train on KuaiRand Apr 25 - May 3 (validate May 4, refit on all ten
# days); export a versioned SavedModel; publish the statistics snapshot; start the model server (TF Serving's gRPC API) and the ranking service in
# front of it; send rank requests of real logged users of the newest day (ids and context only: the service joins
# the side-table features); print the ranked lists; shut both down with SIGTERM (graceful drain).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-runs/kuairand}
MODEL_PORT=${MODEL_PORT:-8500}
RANK_PORT=${RANK_PORT:-50051}
METRICS_PORT=${METRICS_PORT:-9464}
BIN=.venv/bin/rankstage
$BIN train --config configs/kuairand.yaml --out "$RUN" --refit
$BIN export --run "$RUN" --model-base-path models/ranker
$BIN statistics --config configs/kuairand.yaml   # publish the statistics snapshot the service joins (train keeps its own)

STATE=$(mktemp -d)
cleanup() {
  for pid in ${RANK_PID:-} ${MODEL_PID:-}; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$STATE"
}
trap cleanup EXIT

$BIN model-server --model-base-path models/ranker --port "$MODEL_PORT" 2>"$STATE/model_server.log" &
MODEL_PID=$!
$BIN serve --config configs/serving.yaml --set model.backend=tf_serving \
  --set tf_serving.address="localhost:$MODEL_PORT" --set server.port="$RANK_PORT" \
  --set server.metrics_port="$METRICS_PORT" --ready-file "$STATE/ready" 2>"$STATE/service.log" &
RANK_PID=$!
for _ in $(seq 1 240); do
  [ -s "$STATE/ready" ] && break
  kill -0 "$RANK_PID" 2>/dev/null || { cat "$STATE/service.log" "$STATE/model_server.log"; exit 1; }
  sleep 0.5
done
[ -s "$STATE/ready" ] || { echo "ranking service not ready after 120 s"; tail -5 "$STATE"/*.log; exit 1; }
echo "model server on :$MODEL_PORT, ranking service on :$RANK_PORT (metrics http://127.0.0.1:$METRICS_PORT/metrics)"

$BIN requests --config configs/kuairand.yaml --n 3 --top-k 5 --out "$STATE/requests" >/dev/null
for req in "$STATE"/requests/*.json; do
  echo
  $BIN rank --address "localhost:$RANK_PORT" --request "$req"
done
echo
curl -s "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null | grep -E '^rankstage_(model_version|rank_requests_total)' || true
kill -TERM "$RANK_PID" "$MODEL_PID"
wait "$RANK_PID" "$MODEL_PID" && echo "ranking service and model server drained and stopped"
RANK_PID= MODEL_PID=
