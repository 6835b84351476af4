#!/bin/sh
# One-shot job: submit the Flower App in $FEDTUNE_APP to the SuperLink, stream its logs, and exit 0 only
# when the run ends `finished:completed` (compose's `job` service; also usable as a Kubernetes Job).
# With arguments, it writes the same connection and runs `flwr ARGS...` instead (the operator's CLI):
#   fedtune-flwr-job ls remote-deployment --format json
# It must run where the SuperLink's Control API is: its host, container network namespace
# (compose: network_mode: service:superlink) or pod; the public port serves the Fleet API only.
#   FEDTUNE_CONTROL_ADDRESS   SuperLink HOST:PORT (default 127.0.0.1:9000, the SuperLink's own port)
#   FEDTUNE_ROOT_CERTIFICATES CA the SuperLink's certificate chains to (default /certs/ca.crt)
#   FEDTUNE_INSECURE=1        plain HTTP instead (testing only)
#   FEDTUNE_APP               app folder (default /app)
#   FEDTUNE_RUN_CONFIG        --run-config: a TOML file or 'k=v ...' (default /app/profiles/demo.toml;
#                             empty = the app's own config)
#   FEDTUNE_CONNECTION        connection name in $FLWR_HOME/config.toml (default remote-deployment)
#   FEDTUNE_JOB_TIMEOUT       seconds to wait for the run to finish (default 7200)
set -eu
CONN=${FEDTUNE_CONNECTION:-remote-deployment}
ADDRESS=${FEDTUNE_CONTROL_ADDRESS:-127.0.0.1:9000}
CA=${FEDTUNE_ROOT_CERTIFICATES:-/certs/ca.crt}
APP=${FEDTUNE_APP:-/app}
RUN_CONFIG=${FEDTUNE_RUN_CONFIG-/app/profiles/demo.toml}
TIMEOUT=${FEDTUNE_JOB_TIMEOUT:-7200}
export FLWR_HOME=${FLWR_HOME:-$HOME/.flwr} FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1

mkdir -p "$FLWR_HOME"
case "${FEDTUNE_INSECURE:-}" in
  1|true|yes|on) tls='insecure = true' ;;
  *) [ -r "$CA" ] || { echo "flwr-job: CA certificate $CA not readable" >&2; exit 2; }
     tls="root-certificates = \"$CA\"" ;;
esac
cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "$CONN"

[superlink.$CONN]
address = "$ADDRESS"
$tls
TOML

if [ $# -gt 0 ]; then
  exec flwr "$@"
fi
if [ -n "$RUN_CONFIG" ]; then
  set -- --run-config "$RUN_CONFIG"
else
  set --
fi
out=$(flwr run "$APP" "$CONN" "$@" --format json) || { echo "$out" >&2; exit 1; }
run_id=$(printf '%s' "$out" | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print(d["run-id"] if d.get("success") else "")')
[ -n "$run_id" ] || { echo "flwr-job: run not started: $out" >&2; exit 1; }
echo "flwr-job: started run $run_id on $ADDRESS (config: ${RUN_CONFIG:-app default})"

# Logs until the SuperLink closes the stream (the run ended), then the final status.
flwr log "$run_id" "$CONN" --stream || echo "flwr-job: log stream ended with an error; polling status"
deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
  status=$(flwr ls "$CONN" --run-id "$run_id" --format json 2>/dev/null |
    python3 -c 'import json,sys
try:
    d = json.loads(sys.stdin.read())
    print(d["runs"][0]["status"])
except Exception:
    print("unknown")') || status=unknown
  case "$status" in
    finished:completed) echo "flwr-job: run $run_id $status"; exit 0 ;;
    finished:*) echo "flwr-job: run $run_id $status" >&2
                flwr ls "$CONN" --run-id "$run_id" --format json >&2 || true; exit 1 ;;
  esac
  [ "$(date +%s)" -lt "$deadline" ] || { echo "flwr-job: run $run_id still $status after ${TIMEOUT}s" >&2; exit 1; }
  sleep 5
done
