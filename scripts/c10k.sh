#!/usr/bin/env bash
# The c10k sweep: every mode plus `direct`, at several session counts, in two workloads
# (closed loop, and a fixed offered rate paced by loadgen's pacer threads), each point
# repeated; at the largest session count also a sweep of the offered rate; then the charts
# and results/README.md. Loopback only; every run is bounded by loadgen's own limits.
#
#   scripts/c10k.sh            full matrix (about 50 minutes on 2 cores with the peers)
#   scripts/c10k.sh --quick    smaller matrix (a few minutes)
#   scripts/c10k.sh --c100k    20,000, 50,000 and 100,000 sessions (loadgen runs as agents)
#                              for epoll, epoll-et, async, uring, poll and threads, into
#                              results/c100k (about 55 minutes with --repeat 2)
#
# Options: --repeat N (default 2), --results DIR (default results), --conns "100 1000 ..."
# (session counts), --modes "epoll async ..." (default: direct and every mode), --no-peers (only our modes), --no-rate-sweep (skip the other offered rates),
# --allow-dirty (run from a work tree with uncommitted changes; the records then say "-dirty").
# A published sweep must be reproducible from a commit, so a dirty tree is refused by default.
# When it ends, results/sweeps/<tag>.json says the sweep finished: `loadgen plot` draws the
# latest finished sweep, and nothing else, by default.
# The servers people run instead (fast-socks5, microsocks, Dante: scripts/peers.sh) are measured
# in the same sweep when installed; a missing one is skipped with one line.
set -euo pipefail
cd "$(dirname "$0")/.."

args_text=$(printf ' %q' "$@")
quick=0
repeat=2
results=results
peers=1
rate_sweep=1
allow_dirty=0
conns_arg=""
modes_arg=""
c100k=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=1 ;;
        --repeat) repeat="${2:?--repeat needs a number}"; shift ;;
        --results) results="${2:?--results needs a directory}"; shift ;;
        --conns) conns_arg="${2:?--conns needs a list, e.g. \"100 1000\"}"; shift ;;
        --modes) modes_arg="${2:?--modes needs a list, e.g. \"epoll async\"}"; shift ;;
        --c100k) c100k=1 ;;
        --peers) peers=1 ;;
        --no-peers|--no-external) peers=0 ;;
        --no-rate-sweep) rate_sweep=0 ;;
        --allow-dirty) allow_dirty=1 ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
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
if [[ $c100k == 1 ]]; then
    # Past one process's descriptors: loadgen runs as agents, the echo target as several
    # processes, the proxy with as many workers as it needs. The peers and the rate sweep
    # stay in the c10k sweep.
    conns_list=(20000 50000 100000)
    [[ -n $modes_arg ]] || modes_arg="epoll epoll-et async uring poll threads"
    [[ $results != results ]] || results=results/c100k
    peers=0
    other_rates=()
fi
if [[ -n $conns_arg ]]; then
    read -ra conns_list <<<"$conns_arg"
fi
for number in "$repeat" "${conns_list[@]}"; do
    [[ $number =~ ^[1-9][0-9]*$ ]] || { echo "c10k.sh: '$number' is not a positive whole number (--conns takes a space-separated list: --conns \"100 1000\")" >&2; exit 2; }
done
if [[ $rate_sweep == 0 ]]; then
    other_rates=()
fi
# results/ is left out: the sweep itself appends to results/summary.csv.
dirty() { [[ -n $(git status --porcelain --untracked-files=no -- ':(top)' ':(top,exclude)results' 2>/dev/null) ]]; }
if [[ $allow_dirty == 0 ]] && dirty; then
    echo "c10k.sh: the work tree has uncommitted changes; commit them (a published sweep must be reproducible from a commit) or pass --allow-dirty" >&2
    exit 2
fi
tag="$([[ $c100k == 1 ]] && echo c100k || echo c10k)-$(date -u +%Y%m%dT%H%M%SZ)"
started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)

cargo build --release --workspace --quiet
loadgen=./target/release/loadgen
# `direct`, then every proxy mode, as loadgen knows them.
mapfile -t modes < <("$loadgen" modes)
if [[ -n $modes_arg ]]; then
    read -ra wanted <<<"$modes_arg"
    for mode in "${wanted[@]}"; do
        printf '%s\n' "${modes[@]}" | grep -qx -- "$mode" || { echo "c10k.sh: unknown mode '$mode' (loadgen modes lists them)" >&2; exit 2; }
    done
    modes=("${wanted[@]}")
fi

# The peers: the servers people actually run, started fresh for every run by scripts/peers.sh.
peer_names=()
if [[ $peers == 1 ]]; then
    mapfile -t peer_names < <(scripts/peers.sh list)
fi
peer_dir=$(mktemp -d)
trap 'for name in "${peer_names[@]}"; do scripts/peers.sh stop "$name" "$peer_dir"; done; rm -rf "$peer_dir"' EXIT

total=$(( ((${#modes[@]} + ${#peer_names[@]}) * ${#conns_list[@]} * 2 + ${#modes[@]} * ${#other_rates[@]}) * repeat ))
point=0
failures=0
run() {
    point=$((point + 1))
    echo "[$point/$total] $*" >&2
    local status=0
    "$loadgen" "$@" --ramp-rate 4000 --quiet --results "$results" --tag "$tag" "${timing[@]}" >/dev/null || status=$?
    case $status in
        0) ;;
        1) failures=$((failures + 1)); echo "  (run reported a failure; its record is kept)" >&2 ;;
        # Interrupted: stop the sweep (the EXIT trap stops any peer); no manifest is written,
        # so an unfinished sweep is never drawn by default.
        130) echo "c10k.sh: interrupted; sweep $tag is unfinished" >&2; exit 130 ;;
        *) echo "c10k.sh: loadgen could not run (exit $status); sweep $tag stopped, unfinished" >&2; exit 2 ;;
    esac
}

for ((r = 1; r <= repeat; r++)); do
    for conns in "${conns_list[@]}"; do
        for mode in "${modes[@]}"; do
            run --conns "$conns" --mode "$mode"
            run --conns "$conns" --mode "$mode" --rate "$rate"
        done
        for name in "${peer_names[@]}"; do
            for workload in closed open; do
                extra=()
                [[ $workload == open ]] && extra=(--rate "$rate")
                if ! scripts/peers.sh start "$name" "$peer_dir"; then
                    point=$((point + 1))
                    failures=$((failures + 1))
                    echo "[$point/$total] $name did not start; skipped" >&2
                    continue
                fi
                run --conns "$conns" --proxy "$(cat "$peer_dir/$name.addr")" \
                    --proxy-pid "$(cat "$peer_dir/$name.pid")" --label "$name" \
                    --proxy-version "$(cat "$peer_dir/$name.version")" \
                    --proxy-started-with "$(cat "$peer_dir/$name.command")" "${extra[@]}"
                scripts/peers.sh stop "$name" "$peer_dir"
            done
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
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if dirty; then revision="$revision-dirty"; fi
mkdir -p "$results/sweeps"
# JSON strings: backslashes and quotes escaped (the command line may hold either).
json() { local s=${1//\\/\\\\}; printf '"%s"' "${s//\"/\\\"}"; }
cat >"$results/sweeps/$tag.json" <<EOF
{
  "tag": $(json "$tag"),
  "revision": $(json "$revision"),
  "runs": $point,
  "failures": $failures,
  "started_at": $(json "$started_at"),
  "finished_at": $(json "$(date -u +%Y-%m-%dT%H:%M:%SZ)"),
  "command": $(json "scripts/c10k.sh${args_text}")
}
EOF
"$loadgen" plot --results "$results" --tag "$tag"
