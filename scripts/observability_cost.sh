#!/usr/bin/env bash
# The access log and metrics, on against off: epoll with two workers, 10,000 sessions at
# 10,000 msg/s, three pairs alternating (one run each), records into results/observability.
#   scripts/observability_cost.sh [--results DIR] [--pairs N]
set -euo pipefail
cd "$(dirname "$0")/.."
results=results/observability
pairs=3
while [[ $# -gt 0 ]]; do
    case $1 in
        --results) results=${2:?}; shift ;;
        --pairs) pairs=${2:?}; shift ;;
        *) echo "observability_cost.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
cargo build --release --workspace --quiet
work=$(mktemp -d)
pid=
cleanup() { [[ -n $pid ]] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
for _ in $(seq "$pairs"); do
    for observed in off on; do
        extra=()
        [[ $observed == on ]] && extra=(--access-log "$work/access.log" --metrics 127.0.0.1:0)
        ./target/release/proxy --listen 127.0.0.1:0 --mode epoll --workers 2 --threads 1 \
            "${extra[@]}" >"$work/ready" 2>"$work/log" &
        pid=$!
        for _ in $(seq 200); do grep -q listening "$work/ready" && break; sleep 0.05; done
        addr=$(awk '{print $3}' "$work/ready")
        ./target/release/loadgen --proxy "$addr" --proxy-pid "$pid" --label "epoll-obs-$observed" \
            --conns 10000 --rate 10000 --duration 10s --warmup 2s --quiet --results "$work/out" \
            >/dev/null
        kill "$pid"; wait "$pid" 2>/dev/null || true
        pid=
    done
done
mkdir -p "$results"
cp "$work"/out/runs/*.json "$results/"
echo "records in $results"
