#!/usr/bin/env bash
# Interleaved A/B of two checkouts of cellserve under the same open-loop load: each run starts a
# fresh server from one tree and offers it the same `cellserve bench load` (this checkout's).
#   scripts/ab-overload.sh MODEL RATES PAIRS TREE_A TREE_B [http|grpc]
# e.g. git worktree add /tmp/before <commit>; cp cellserve/kernels/*.so /tmp/before/cellserve/kernels/
#      scripts/ab-overload.sh gru-256 600,900,1200,3000 3 /tmp/before "$PWD" http
# Prints each run's table and the server's admission metrics; JSON under /tmp/ab-overload/.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1 rates=$2 pairs=$3 tree_a=$4 tree_b=$5 protocol=${6:-http}
py=$PWD/.venv/bin/python
out=/tmp/ab-overload
mkdir -p $out
for i in $(seq 1 "$pairs"); do
  for side in a b; do
    tree=$tree_a
    [ $side = b ] && tree=$tree_b
    # from /tmp, so that the tree on PYTHONPATH, not this checkout, is the cellserve imported
    (cd /tmp && PYTHONPATH=$tree exec "$py" -m cellserve.cli serve --model "$model" --http-port 18100 \
        --grpc-port 18101 --metrics-port 18102 > $out/server.log 2>&1) &
    server=$!
    for _ in $(seq 1 240); do curl -s -o /dev/null localhost:18100/v2/health/ready && break; sleep 0.5; done
    url=localhost:18100
    [ "$protocol" = grpc ] && url=localhost:18101
    .venv/bin/cellserve bench load --url $url --protocol "$protocol" --model "$model" --slo-ms 250 --deadline \
        --rates "$rates" --seconds 3 --json $out/$model-$protocol-$side-$i.json | grep -E "^ +[0-9]|offered"
    echo "== $side ($tree) run $i: $(curl -s localhost:18102/metrics | grep -E \
        '^cellserve_(requests_shed_total|admission_limit|admission_cuts_total|engine_step_overhead_seconds) ' | tr '\n' ' ')"
    kill $server
    wait $server 2>/dev/null || true
  done
done
