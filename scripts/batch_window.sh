#!/usr/bin/env bash
# The io_uring batch window's trade-off: proxy CPU per message and wake-ups against latency,
# beside epoll, in one run of alternating points (5,000 sessions, 10,000 msg/s of 128 B evenly
# paced unless told otherwise). Each point is a loadgen record tagged batch-window-<stamp>;
# the table goes to results/batch-window/<stamp>.md. Loopback only; every run is bounded by
# loadgen's own limits (about 25 s a point).
#
#   scripts/batch_window.sh [--repeat N] [--conns N] [--rate R] [--windows "0 20us 250us 1ms"]
set -euo pipefail
cd "$(dirname "$0")/.."

repeat=2
conns=5000
rate=10000
windows="0 20us 250us 1ms"
results=results
while [[ $# -gt 0 ]]; do
    case "$1" in
        --repeat) repeat="${2:?}"; shift ;;
        --conns) conns="${2:?}"; shift ;;
        --rate) rate="${2:?}"; shift ;;
        --windows) windows="${2:?}"; shift ;;
        --results) results="${2:?}"; shift ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "batch_window.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

cargo build --release --quiet -p proxy -p loadgen
loadgen=target/release/loadgen
proxy=target/release/proxy
stamp=$(date -u +%Y%m%dT%H%M%SZ)
tag="batch-window-$stamp"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$results/batch-window"

point() { # label, proxy args...
    local label=$1; shift
    "$proxy" --listen 127.0.0.1:0 --log-level warn "$@" >"$work/out" 2>"$work/err" &
    local pid=$!
    local addr=""
    for _ in $(seq 100); do
        addr=$(grep -o '127\.0\.0\.1:[0-9]*' "$work/out" || true)
        [[ -n "$addr" ]] && break
        sleep 0.1
    done
    if [[ -z "$addr" ]]; then
        echo "batch_window.sh: the proxy did not start: $(cat "$work/err")" >&2
        kill "$pid" 2>/dev/null || true
        exit 1
    fi
    "$loadgen" --conns "$conns" --rate "$rate" --proxy "$addr" --proxy-pid "$pid" \
        --proxy-version "proxy $(git rev-parse --short HEAD)" --proxy-started-with "proxy $*" \
        --label "$label" --tag "$tag" --results "$results" --json >>"$work/records.json"
    kill -TERM "$pid"
    wait "$pid" || true
}

for i in $(seq "$repeat"); do
    echo "batch_window.sh: round $i of $repeat" >&2
    point epoll --mode epoll
    for window in $windows; do
        point "uring-bw$window" --mode uring --batch-window "$window"
    done
done

python3 - "$work/records.json" "$results/batch-window/$stamp.md" "$tag" <<'PY'
import json, statistics, sys
text = open(sys.argv[1]).read()
decoder, i, rows = json.JSONDecoder(), 0, {}
while (j := text.find('{', i)) >= 0:
    record, i = decoder.raw_decode(text, j)
    p, h, l = record['proxy'], record['harness'], record['latency_us']
    rows.setdefault(record['config']['label'], []).append((
        p['cpu_us_per_message'], p.get('context_switches_per_message', 0.0),
        l['rtt']['p50'], l['rtt']['p99'], h['lateness_us']['p99'],
        100 * h.get('host_steal_share', 0.0), h['achieved_rate']))
with open(sys.argv[2], 'w') as out:
    out.write(f"# io_uring batch window against epoll (tag {sys.argv[3]})\n\n")
    out.write("Medians of the runs per label (n); loadgen records in runs/ with this tag. "
              "CPU and context switches are the proxy's, per round trip; round trip from the "
              "scheduled send. Every open-loop point carries its harness error: pacer lateness "
              "p99 and the hypervisor's steal.\n\n")
    out.write("| label | n | CPU µs/msg | × epoll | wake-ups/msg | rtt p50 µs | rtt p99 µs | lateness p99 µs | steal % | achieved msg/s |\n")
    out.write("|---|---|---|---|---|---|---|---|---|---|\n")
    base = statistics.median(r[0] for r in rows.get('epoll', [(float('nan'),)]))
    for label, runs in rows.items():
        m = [statistics.median(c) for c in zip(*runs)]
        out.write(f"| {label} | {len(runs)} | {m[0]:.1f} | {m[0]/base:.2f} | {m[1]:.2f} | {m[2]:.0f} | {m[3]:.0f} | {m[4]:.0f} | {m[5]:.1f} | {m[6]:.0f} |\n")
print(open(sys.argv[2]).read())
PY
