#!/usr/bin/env bash
# A 3-node tso cluster on loopback, for trying failover by hand.
#
#   scripts/cluster.sh start     build, then start nodes 1..3 (data, logs and pids in $TSO_CLUSTER_DIR)
#   scripts/cluster.sh status    which nodes run
#   scripts/cluster.sh kill N    kill -9 node N (then: scripts/cluster.sh start-node N to restart it)
#   scripts/cluster.sh stop      SIGTERM every node
#
# Clients: tso get --endpoints 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003
# Ports: node N serves clients on 700N, peers on 710N and admin on 720N (override
# TSO_CLIENT_BASE/TSO_PEER_BASE/TSO_ADMIN_BASE). Members: tso admin members --endpoint 127.0.0.1:7201
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${TSO_CLUSTER_DIR:-./tso-cluster}
client_base=${TSO_CLIENT_BASE:-7000}
peer_base=${TSO_PEER_BASE:-7100}
admin_base=${TSO_ADMIN_BASE:-7200}
bin=${TSO_BIN:-./target/debug/tso}
nodes=(1 2 3)

members() {
    local list=() n
    for n in "${nodes[@]}"; do
        list+=("$n=127.0.0.1:$((client_base + n))/$((peer_base + n))/$((admin_base + n))")
    done
    local IFS=,
    echo "${list[*]}"
}

# A node runs if its pid is alive and not a zombie awaiting reaping.
running() {
    [ -f "$dir/node-$1.pid" ] || return 1
    local state
    state=$(ps -o stat= -p "$(cat "$dir/node-$1.pid")" 2>/dev/null) || return 1
    [[ $state != Z* ]]
}

start_node() {
    local n=$1
    if running "$n"; then echo "node $n already runs (pid $(cat "$dir/node-$n.pid"))"; return; fi
    mkdir -p "$dir/node-$n"
    "$bin" serve --backend raft --node-id "$n" \
        --listen "127.0.0.1:$((client_base + n))" \
        --peer-addr "127.0.0.1:$((peer_base + n))" \
        --admin-listen "127.0.0.1:$((admin_base + n))" \
        --members "$(members)" \
        --data-dir "$dir/node-$n" \
        >>"$dir/node-$n.log" 2>&1 &
    echo $! >"$dir/node-$n.pid"
    echo "node $n: pid $!, clients 127.0.0.1:$((client_base + n)), peers 127.0.0.1:$((peer_base + n)), log $dir/node-$n.log"
}

case "${1:-}" in
start)
    [ -n "${TSO_BIN:-}" ] || cargo build -p tso
    mkdir -p "$dir"
    for n in "${nodes[@]}"; do start_node "$n"; done
    echo "endpoints: $(for n in "${nodes[@]}"; do printf '127.0.0.1:%d,' $((client_base + n)); done | sed 's/,$//')"
    ;;
start-node) start_node "${2:?node id}" ;;
status)
    for n in "${nodes[@]}"; do
        if running "$n"; then echo "node $n: running (pid $(cat "$dir/node-$n.pid"))"; else echo "node $n: stopped"; fi
    done
    ;;
kill)
    n=${2:?node id}
    running "$n" && kill -9 "$(cat "$dir/node-$n.pid")" && echo "node $n killed"
    ;;
stop)
    for n in "${nodes[@]}"; do
        if running "$n"; then kill -TERM "$(cat "$dir/node-$n.pid")"; fi
    done
    ;;
*)
    sed -n '2,11p' "$0"
    exit 2
    ;;
esac
