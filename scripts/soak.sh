#!/usr/bin/env bash
# The soak of RELIABILITY.md: the default model on the CPU behind `kvserve serve`, loaded by
# `kvserve soak` (mixed requests in load phases, idle phases between them) for DURATION, with
# the server's memory, file descriptors and KV blocks sampled from /metrics.
#
#   scripts/soak.sh [DURATION] [OUT] [extra `kvserve soak` flags...]     # default 30m, /tmp/soak
#
# KVSERVE_SOAK_SERVE_FLAGS adds flags to `kvserve serve` (e.g. "--kv-cache-dtype int8
# --kv-cache-memory 16MiB" for a pool small enough to preempt).
# OUT gets soak.csv, soak.json, soak.png, server.log and soak.txt (the report). The exit status
# is the soak's verdict.
set -euo pipefail
DURATION="${1:-30m}"
OUT="${2:-/tmp/soak}"
shift $(( $# > 2 ? 2 : $# ))
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
cargo build --release -p serve-grpc --bin kvserve
MODEL="$(cargo xtask fetch-model | tail -1)"
BIN=target/release/kvserve
GRPC_PORT="${KVSERVE_SOAK_PORT:-50151}"
METRICS_PORT="${KVSERVE_SOAK_METRICS_PORT:-9564}"
"$BIN" serve --model "$MODEL" --device cpu --port "$GRPC_PORT" --metrics-port "$METRICS_PORT" \
  ${KVSERVE_SOAK_SERVE_FLAGS:-} > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if grep -q "listening" "$OUT/server.log" 2>/dev/null; then break; fi
  if ! kill -0 $SERVER 2>/dev/null; then cat "$OUT/server.log"; exit 1; fi
  sleep 1
done
echo "server pid $SERVER: $(grep -m1 listening "$OUT/server.log")"
"$BIN" soak --addr "http://127.0.0.1:$GRPC_PORT" \
  --metrics-url "http://127.0.0.1:$METRICS_PORT/metrics" --duration "$DURATION" \
  --csv "$OUT/soak.csv" --json "$OUT/soak.json" --plot "$OUT/soak.png" "$@" \
  2> "$OUT/soak.log" | tee "$OUT/soak.txt"
