#!/usr/bin/env bash
# A rolling restart of a 3-node tso raft cluster under load, measuring what clients see.
#
#   scripts/rolling-restart.sh                 build (release), then ROUNDS rolling restarts
#   TSO_NO_HANDOFF=1 scripts/rolling-restart.sh   the same, with the leader's handoff disabled
#                                                 (servers get --no-handoff: an election instead)
#
# Each round SIGTERMs and restarts every node once, waiting for the cluster to be healthy
# (a serving leader, every node ready) between steps. Within a round the current leader goes
# first while it has not been restarted yet, so most rounds hand leadership on twice.
# Every step runs its own `tso bench --mode library --json` (the client library against all
# three endpoints) across the SIGTERM, the stop and the restart; its longest stretch without a
# successful reply is the step's client-visible gap. The old leader's log line
# ("handed leadership to node N in X ms") is shown as well.
#
# Environment: ROUNDS (default 3), TSO_BIN (default: release build in $CARGO_TARGET_DIR or
# ./target), TSO_RR_DIR (data, logs; default a fresh temporary directory), TSO_RR_BASE (ports
# BASE+1..3 for clients, BASE+11..13 for peers, BASE+21..23 for metrics; default 27100),
# CALLERS (bench callers, default 4).
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${ROUNDS:-3}
base=${TSO_RR_BASE:-27100}
callers=${CALLERS:-4}
target_dir=${CARGO_TARGET_DIR:-./target}
bin=${TSO_BIN:-$target_dir/release/tso}
dir=${TSO_RR_DIR:-$(mktemp -d -t tso-rolling-XXXXXX)}
extra=()
if [ -n "${TSO_NO_HANDOFF:-}" ]; then extra+=(--no-handoff); fi
nodes=(1 2 3)
declare -A pid

if [ -z "${TSO_BIN:-}" ]; then cargo build --release -p tso; fi
mkdir -p "$dir"

client() { echo "127.0.0.1:$((base + $1))"; }
peer() { echo "127.0.0.1:$((base + 10 + $1))"; }
metrics() { echo "127.0.0.1:$((base + 20 + $1))"; }
members() {
    local list=() n
    for n in "${nodes[@]}"; do list+=("$n=$(client "$n")/$((base + 10 + n))"); done
    local IFS=,
    echo "${list[*]}"
}
endpoints() {
    local list=() n
    for n in "${nodes[@]}"; do list+=("$(client "$n")"); done
    local IFS=,
    echo "${list[*]}"
}

start_node() {
    local n=$1
    mkdir -p "$dir/node-$n"
    "$bin" serve --backend raft --node-id "$n" \
        --listen "$(client "$n")" --peer-addr "$(peer "$n")" \
        --metrics-listen "$(metrics "$n")" \
        --members "$(members)" --data-dir "$dir/node-$n" "${extra[@]}" \
        >>"$dir/node-$n.out" 2>>"$dir/node-$n.log" &
    pid[$n]=$!
}

stop_all() {
    local n
    for n in "${nodes[@]}"; do
        if [ -n "${pid[$n]:-}" ]; then kill -TERM "${pid[$n]}" 2>/dev/null || true; fi
    done
    wait 2>/dev/null || true
}
trap stop_all EXIT

# The node whose oracle serves (granted its fence), or nothing.
leader() {
    local n
    for n in "${nodes[@]}"; do
        if curl -sf "http://$(metrics "$n")/metrics" 2>/dev/null | grep -q '^tso_serving 1'; then
            echo "$n"
            return
        fi
    done
}

# A serving leader and every node ready (following it), within 60 s.
wait_healthy() {
    local deadline=$((SECONDS + 60)) n ok
    while ((SECONDS < deadline)); do
        ok=1
        [ -n "$(leader)" ] || ok=0
        for n in "${nodes[@]}"; do
            curl -sf "http://$(metrics "$n")/readyz" >/dev/null 2>&1 || ok=0
        done
        if ((ok)); then return 0; fi
        sleep 0.1
    done
    echo "the cluster did not become healthy within 60 s; logs in $dir" >&2
    exit 1
}

json_field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }

echo "binary $bin; data and logs in $dir; handoff $([ -n "${TSO_NO_HANDOFF:-}" ] && echo disabled || echo enabled)"
echo "load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores (the machine may be shared)"
for n in "${nodes[@]}"; do start_node "$n"; done
wait_healthy
sleep 1 # let a node that came up late settle

gaps=()
for round in $(seq 1 "$rounds"); do
    done_nodes=" "
    for step in 1 2 3; do
        current=$(leader)
        victim=""
        if [[ -n $current && $done_nodes != *" $current "* ]]; then
            victim=$current
        else
            for n in "${nodes[@]}"; do
                if [[ $done_nodes != *" $n "* ]]; then victim=$n; break; fi
            done
        fi
        role=follower
        [[ $victim == "$current" ]] && role=leader
        out="$dir/bench-$round-$step.json"
        "$bin" bench --endpoints "$(endpoints)" --mode library --callers "$callers" \
            --warmup 1s --duration 5s --timeout 5s --json >"$out" 2>"$dir/bench-$round-$step.err" &
        bench=$!
        sleep 2
        lines_before=$(wc -l <"$dir/node-$victim.log")
        t0=$(date +%s%N)
        kill -TERM "${pid[$victim]}"
        code=0
        wait "${pid[$victim]}" || code=$?
        t1=$(date +%s%N)
        handoff=$(tail -n +"$((lines_before + 1))" "$dir/node-$victim.log" |
            grep -oE 'handed leadership to node [0-9]+ in [0-9]+ ms|leadership handoff failed: [^"]*' |
            head -1 || true)
        start_node "$victim"
        wait_healthy
        bench_code=0
        wait "$bench" || bench_code=$?
        gap=$(json_field "$out" "round(d['longest_gap_ms'], 1)")
        # Where the longest gap lies, from the SIGTERM: its start and end in ms.
        gap_at=$(json_field "$out" "'%+.0f..%+.0f' % (d['longest_gap_end_unix_ms'] - d['longest_gap_ms'] - $t0 / 1e6, d['longest_gap_end_unix_ms'] - $t0 / 1e6)")
        errors=$(json_field "$out" "sum(d['errors'].values()) if isinstance(d['errors'], dict) else d['errors']")
        check=$(json_field "$out" "d['check']['ok']")
        echo "round $round step $step: node $victim ($role) SIGTERM -> exit $code in $(((t1 - t0) / 1000000)) ms;" \
            "${handoff:-no handoff}; client longest gap ${gap} ms (${gap_at} ms from the SIGTERM), errors ${errors}, checks ok ${check}, bench exit ${bench_code}"
        [[ $role == leader ]] && gaps+=("$gap")
        done_nodes+="$victim "
    done
done
echo "leader restarts: client longest gaps (ms): ${gaps[*]:-none}"
echo "load average $(cut -d' ' -f1-3 /proc/loadavg)"
