#!/usr/bin/env bash
# The c10k sweep: every mode plus `direct`, at several session counts, in two workloads
# (closed loop, and a fixed offered rate paced by loadgen's pacer threads), each point
# repeated; at the largest session count also a sweep of the offered rate; then the charts
# and results/README.md. Loopback only; every run is bounded by loadgen's own limits.
#
#   scripts/c10k.sh            full matrix (about 40 minutes on 2 cores)
#   scripts/c10k.sh --quick    smaller matrix (a few minutes)
#
# Options: --repeat N (default 2), --results DIR (default results), --no-external
# External servers (microsocks, Dante's sockd) are measured too when installed.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
repeat=2
results=results
external=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=1 ;;
        --repeat) repeat="$2"; shift ;;
        --results) results="$2"; shift ;;
        --no-external) external=0 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "c10k.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

if [[ $quick == 1 ]]; then
    conns_list=(100 1000)
    timing=(--duration 2s --warmup 500ms --idle-hold 500ms)
    rate=2000
    other_rates=(500)
else
    conns_list=(100 1000 5000 10000)
    # 10 s at 10,000 msg/s: 100,000 measured round trips per open-loop point (closed loop
    # measures more); 2 s of warm-up.
    timing=(--duration 10s --warmup 2s --idle-hold 1s)
    rate=10000
    other_rates=(2000 30000)
fi
tag="c10k-$(date -u +%Y%m%dT%H%M%SZ)"

cargo build --release --workspace --quiet
loadgen=./target/release/loadgen
# `direct`, then every proxy mode, as loadgen knows them.
mapfile -t modes < <("$loadgen" modes)

# Optional external servers: name, command to start (listening on 127.0.0.1:PORT).
externals=()
if [[ $external == 1 ]] && command -v microsocks >/dev/null 2>&1; then
    externals+=(microsocks)
fi

total=$(( ((${#modes[@]} + ${#externals[@]}) * ${#conns_list[@]} * 2 + ${#modes[@]} * ${#other_rates[@]}) * repeat ))
point=0
failures=0
run() {
    point=$((point + 1))
    echo "[$point/$total] $*" >&2
    if ! "$loadgen" "$@" --ramp-rate 4000 --quiet --results "$results" --tag "$tag" "${timing[@]}" >/dev/null; then
        failures=$((failures + 1))
        echo "  (run reported a failure; its record is kept)" >&2
    fi
}

for ((r = 1; r <= repeat; r++)); do
    for conns in "${conns_list[@]}"; do
        for mode in "${modes[@]}"; do
            run --conns "$conns" --mode "$mode"
            run --conns "$conns" --mode "$mode" --rate "$rate"
        done
        for name in "${externals[@]}"; do
            port=$((20000 + RANDOM % 10000))
            case "$name" in
                microsocks) microsocks -i 127.0.0.1 -p "$port" >/dev/null 2>&1 & ;;
            esac
            pid=$!
            sleep 0.5
            run --conns "$conns" --proxy "127.0.0.1:$port" --proxy-pid "$pid" --label "$name"
            run --conns "$conns" --proxy "127.0.0.1:$port" --proxy-pid "$pid" --label "$name" --rate "$rate"
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        done
    done
    # CPU per message and latency against the offered rate, at the largest session count.
    top=${conns_list[-1]}
    for other in "${other_rates[@]}"; do
        for mode in "${modes[@]}"; do
            run --conns "$top" --mode "$mode" --rate "$other"
        done
    done
done

echo "sweep $tag: $point runs, $failures reported failures" >&2
"$loadgen" plot --results "$results" --tag "$tag"
