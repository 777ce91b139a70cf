#!/usr/bin/env bash
# Start the example three-node cluster; Ctrl-C (or SIGTERM) stops all three.
#
#   examples/cluster/run.sh              # the metadata app
#   examples/cluster/run.sh --app kv     # extra arguments go to every 'node run'
#   TLS=1 examples/cluster/run.sh        # first run only: mutual TLS for peers and APIs
#
# The first run makes the cluster's secret and configs beside this script with
#   streambus-consensus cluster init --nodes n1=127.0.0.1:7001,... --api n1=127.0.0.1:9101,...
# (cluster.secret, n1.toml, n2.toml, n3.toml; tls/ with TLS=1). Each node is
# then simply: streambus-consensus node run --config nN.toml
# Logs go to logs/nN.log, data to data/nN, both beside this script.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if command -v streambus-consensus >/dev/null 2>&1; then
    cmd=(streambus-consensus)
else
    cmd=("${PYTHON:-python3}" -m streambus_consensus)
fi

if [ ! -f "$here/cluster.secret" ]; then
    "${cmd[@]}" cluster init --dir "$here" \
        --nodes n1=127.0.0.1:7001,n2=127.0.0.1:7002,n3=127.0.0.1:7003 \
        --api n1=127.0.0.1:9101,n2=127.0.0.1:9102,n3=127.0.0.1:9103 \
        ${TLS:+--tls} >/dev/null
    echo "made a new cluster secret and configs in $here (cluster init)"
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
    "${cmd[@]}" node run --config "$here/n$n.toml" "$@" >>"$here/logs/n$n.log" 2>&1 &
    pids+=("$!")
done

sleep 1
for n in 1 2 3; do
    if ! kill -0 "${pids[$((n - 1))]}" 2>/dev/null; then
        echo "node $n exited at once; the end of logs/n$n.log:" >&2
        tail -n 20 "$here/logs/n$n.log" >&2
    fi
done

cat <<MSG
three nodes running (logs in $here/logs); Ctrl-C stops them. Try:
  streambus-consensus status --config $here/n1.toml --config $here/n2.toml --config $here/n3.toml
  streambus-consensus leader transfer n2 --config $here/n1.toml --config $here/n2.toml --config $here/n3.toml
MSG
wait
