#!/usr/bin/env bash
# GetTs and GetSeq (one shared key) side by side at 1, 16 and 256 callers, in one run: the file
# backend, then a 3-node raft cluster on loopback. For GetSeq it also reports the durable writes
# the leader made (tso_seq_writes_total from /metrics, warm-up included), so calls per write.
#
#   cargo build --release -p tso && scripts/bench-seq.sh        (DUR=10s for longer runs)
set -u
cd "$(dirname "$0")/.."
T=${T:-./target/release/tso}
D=$(mktemp -d)
DUR=${DUR:-5s}
writes() { curl -s "http://$1/metrics" | awk '/^tso_seq_writes_total\{outcome="ok"\}/{print $2}'; }
run() { # label endpoints metrics-addr
  for c in 1 16 256; do
    for rpc in ts seq; do
      before=$(writes $3)
      out=$($T bench --endpoints $2 --rpc $rpc --callers $c --duration $DUR --warmup 1s 2>&1)
      after=$(writes $3)
      calls=$(echo "$out" | awk '/^calls/{print $2}' | tr -d ,)
      rate=$(echo "$out" | awk '/^calls/{print $3}')
      lat=$(echo "$out" | awk '/^latency/{print $3, $6, $9, $15}')
      extra=""
      if [ $rpc = seq ]; then extra="writes $((${after%.*}-${before%.*})) for ~$calls calls"; fi
      echo "$1 rpc=$rpc callers=$c: $rate calls/s, p50/p90/p99/max ms $lat $extra"
    done
  done
}
$T serve --data-dir $D/file --listen 127.0.0.1:50661 --metrics-listen 127.0.0.1:50671 >/dev/null 2>$D/file.err &
P0=$!
sleep 1
run file 127.0.0.1:50661 127.0.0.1:50671
kill $P0; wait $P0 2>/dev/null
M="1=127.0.0.1:50681/50691,2=127.0.0.1:50682/50692,3=127.0.0.1:50683/50693"
for i in 1 2 3; do
  $T serve --backend raft --node-id $i --listen 127.0.0.1:5068$i --peer-addr 127.0.0.1:5069$i \
    --members $M --data-dir $D/n$i --metrics-listen 127.0.0.1:5070$i >/dev/null 2>$D/n$i.err &
done
sleep 3
# the leader's metrics: the node whose /readyz says serving
for i in 1 2 3; do
  if curl -s http://127.0.0.1:5070$i/readyz | grep -q serving; then L=$i; fi
done
run "raft(3)" 127.0.0.1:50681,127.0.0.1:50682,127.0.0.1:50683 127.0.0.1:5070$L
pkill -f -- "--data-dir $D" ; sleep 1
rm -rf $D
