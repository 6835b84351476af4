#!/bin/sh
# One-shot job: register every SuperNode public key in $FEDTUNE_PUBKEYS_DIR with the SuperLink
# (`fedtune-keys register` = `flwr supernode register`, each key under its file name). Keys registered
# before are skipped, so it runs on every `docker compose up`; no keys = nothing to do (exit 0).
#   FEDTUNE_PUBKEYS_DIR        folder of *.pub files (default /pubkeys)
#   FEDTUNE_CONTROL_ADDRESS    SuperLink HOST:PORT (default 127.0.0.1:9000: the SuperLink's own port, so this
#                              job runs in its network namespace/pod; the public port refuses the Control API)
#   FEDTUNE_ROOT_CERTIFICATES  CA the SuperLink's certificate chains to (default /certs/ca.crt)
#   FEDTUNE_CONNECTION         connection name written to $FLWR_HOME/config.toml (default superlink)
set -eu
DIR=${FEDTUNE_PUBKEYS_DIR:-/pubkeys}
ADDRESS=${FEDTUNE_CONTROL_ADDRESS:-127.0.0.1:9000}
CA=${FEDTUNE_ROOT_CERTIFICATES:-/certs/ca.crt}
CONN=${FEDTUNE_CONNECTION:-superlink}
export FLWR_HOME=${FLWR_HOME:-$HOME/.flwr} FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1

python3 -c 'import sys; from fedtune.flwr_config import write_connection; write_connection(*sys.argv[1:5])' \
  "$FLWR_HOME" "$CONN" "$ADDRESS" "$CA" >/dev/null
set -- "$DIR"/*.pub
if [ ! -e "$1" ]; then
  echo "register-job: no public keys in $DIR, nothing to register"
  exit 0
fi
fedtune-keys register --connection "$CONN" --named "$@"
echo "register-job: $# key(s) registered with $ADDRESS"
