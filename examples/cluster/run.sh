#!/usr/bin/env bash
# Start the example three-node cluster; Ctrl-C (or SIGTERM) stops all three.
#
#   examples/cluster/run.sh              # the metadata app
#   examples/cluster/run.sh --app kv     # extra arguments go to every 'node run'
#
# Each node is simply: streambus-consensus node run --config nodeN.toml
# Logs go to logs/nodeN.log, data to data/nN, both beside this script.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if command -v streambus-consensus >/dev/null 2>&1; then
    cmd=(streambus-consensus)
else
    cmd=("${PYTHON:-python3}" -m streambus_consensus)
fi

mkdir -p "$here/logs"
pids=()
stop() {
    trap - INT TERM
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    wait
    echo "stopped"
}
trap stop INT TERM

for n in 1 2 3; do
    "${cmd[@]}" node run --config "$here/node$n.toml" "$@" >>"$here/logs/node$n.log" 2>&1 &
    pids+=("$!")
done

sleep 1
for n in 1 2 3; do
    if ! kill -0 "${pids[$((n - 1))]}" 2>/dev/null; then
        echo "node $n exited at once; the end of logs/node$n.log:" >&2
        tail -n 20 "$here/logs/node$n.log" >&2
    fi
done

api="127.0.0.1:9101,127.0.0.1:9102,127.0.0.1:9103"
cat <<MSG
three nodes running (logs in $here/logs); Ctrl-C stops them. Try:
  export STREAMBUS_CONSENSUS_API=$api
  export STREAMBUS_CONSENSUS_SECRET_FILE=$here/cluster.secret
  streambus-consensus status
  streambus-consensus leader transfer n2
  curl -s http://127.0.0.1:9101/metrics | grep streambus_consensus_term
MSG
wait
