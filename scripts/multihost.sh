#!/usr/bin/env bash
# One measured run across "hosts" made of network namespaces: two loadgen agents, two proxy
# hosts behind HAProxy (mode tcp, balance leastconn, send-proxy-v2), an echo host. The agents
# dial the balancer, the proxies learn the real client from the PROXY protocol header (their
# --allow-client admits the agents' addresses and not the balancer's), `loadgen sample` measures
# each proxy host, and `loadgen merge` makes one record of it all. Every address lives inside
# the namespaces this script makes (10.200.0.0/24 on a bridge in a namespace of its own); nothing
# is routed anywhere else, and everything is torn down on exit, error or Ctrl-C.
#
#   scripts/multihost.sh                 4,000 sessions, 4,000 msg/s, 10 s window
#   scripts/multihost.sh --quick         400 sessions, 400 msg/s, 1 s window (CI)
#   options: --results DIR (default results/multihost), --mode MODE (proxy mode, default epoll)
#
# Needs root (namespaces) and haproxy (Debian package `haproxy`); where either is missing it
# prints one line starting with "multihost: skipped:" and exits 77.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
results=results/multihost
mode=epoll
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) quick=1 ;;
        --results) results=${2:?--results needs a directory}; shift ;;
        --mode) mode=${2:?--mode needs a mode}; shift ;;
        -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "multihost: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ $quick == 1 ]]; then
    conns=400 rate=400 timing=(--duration 1s --warmup 200ms --idle-hold 200ms)
else
    conns=4000 rate=4000 timing=(--duration 10s --warmup 2s --idle-hold 1s)
fi

skip() { echo "multihost: skipped: $*"; exit 77; }
[[ $(id -u) == 0 ]] || skip "network namespaces need root"
command -v haproxy >/dev/null || skip "haproxy is not installed (apt-get install haproxy)"
command -v ip >/dev/null || skip "ip (iproute2) is not installed"

loadgen=${LOADGEN:-./target/release/loadgen}
proxy=${PROXY:-./target/release/proxy}
if [[ -z ${LOADGEN:-} || -z ${PROXY:-} ]]; then
    cargo build --release --workspace --quiet
fi

# Names unique to this run, so that two runs (or a run and a test) never share a namespace.
prefix="mh$$"
hosts=(sw lb a0 a1 p0 p1 echo)
declare -A addr=([lb]=10.200.0.2 [a0]=10.200.0.11 [a1]=10.200.0.12 [p0]=10.200.0.21
    [p1]=10.200.0.22 [echo]=10.200.0.31)
work=$(mktemp -d)
pids=()
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    for host in "${hosts[@]}"; do ip netns del "$prefix-$host" 2>/dev/null || true; done
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'echo "multihost: interrupted" >&2; exit 130' INT TERM

in_ns() { local host=$1; shift; ip netns exec "$prefix-$host" "$@"; }

# The wiring: a bridge in its own namespace, one veth pair per host.
for host in "${hosts[@]}"; do
    ip netns add "$prefix-$host" 2>/dev/null || skip "cannot create network namespaces here"
    in_ns "$host" ip link set lo up
done
in_ns sw ip link add br0 type bridge
in_ns sw ip link set br0 up
for host in "${hosts[@]:1}"; do
    in_ns sw ip link add "v-$host" type veth peer name eth0 netns "$prefix-$host"
    in_ns sw ip link set "v-$host" master br0 up
    in_ns "$host" ip addr add "${addr[$host]}/24" dev eth0
    in_ns "$host" ip link set eth0 up
done

wait_listening() {
    local file=$1 what=$2
    for _ in $(seq 200); do
        grep -q "listening on" "$file" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "multihost: $what did not start:" >&2
    cat "$file" >&2
    exit 1
}

# Background processes are started by `ip netns exec` itself (it execs the command), so $! is
# the process: the samplers measure the proxy, not a shell around it.
ip netns exec "$prefix-echo" "$loadgen" echo --listen "${addr[echo]}:7000" >"$work/echo.out" 2>&1 &
pids+=($!)
wait_listening "$work/echo.out" "the echo target"

# The proxies trust the balancer's PROXY headers and admit only the agents' network: were the
# header ignored, every session would come from the balancer and be refused with 0x02.
declare -A proxy_pid
for host in p0 p1; do
    ip netns exec "$prefix-$host" "$proxy" --listen "${addr[$host]}:1080" --mode "$mode" \
        --trusted-proxy "${addr[lb]}/32" --allow-client 10.200.0.8/29 \
        >"$work/$host.out" 2>"$work/$host.log" &
    proxy_pid[$host]=$!
    pids+=($!)
    wait_listening "$work/$host.out" "the proxy on $host"
done

cat >"$work/haproxy.cfg" <<EOF
global
    maxconn $((conns + 100))
    stats socket ipv4@${addr[lb]}:9999 level user
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend socks
    bind ${addr[lb]}:1080
    default_backend proxies
backend proxies
    balance leastconn
    server p0 ${addr[p0]}:1080 send-proxy-v2
    server p1 ${addr[p1]}:1080 send-proxy-v2
EOF
haproxy -c -q -f "$work/haproxy.cfg"
ip netns exec "$prefix-lb" haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do
    in_ns lb bash -c "exec 3<>/dev/tcp/${addr[lb]}/9999" 2>/dev/null && break
    sleep 0.05
done

# One shared start for the agents and the samplers; the agents' clocks are the same clock here.
start=$(($(date +%s) + 3))
run=(--conns "$conns" --rate "$rate" --start-at "$start" "${timing[@]}")
mkdir -p "$results"
sampler_pids=()
for host in p0 p1; do
    "$loadgen" sample "${run[@]}" --pid "${proxy_pid[$host]}" --out "$work/sample-$host.json" \
        2>"$work/sample-$host.log" &
    sampler_pids+=($!)
    pids+=($!)
done
agent_pids=()
for index in 0 1; do
    ip netns exec "$prefix-a$index" "$loadgen" "${run[@]}" --segment "$index/2" --label "multihost-$mode" \
        --proxy "${addr[lb]}:1080" --echo "${addr[echo]}:7000" --results "$work/agents" \
        --quiet >"$work/agent-$index.out" 2>&1 &
    agent_pids+=($!)
    pids+=($!)
done
failed=0
for pid in "${agent_pids[@]}" "${sampler_pids[@]}"; do
    wait "$pid" || failed=1
done
if [[ $failed == 1 ]]; then
    echo "multihost: an agent or a sampler failed:" >&2
    tail -n 20 "$work"/agent-*.out "$work"/sample-*.log >&2
    exit 1
fi

# The balancer's own count of the sessions it gave each proxy host (HAProxy's `stot`).
in_ns lb bash -c "exec 3<>/dev/tcp/${addr[lb]}/9999; printf 'show stat\n' >&3; cat <&3" \
    >"$work/haproxy-stat.csv"
declare -A sessions
for host in p0 p1; do
    sessions[$host]=$(awk -F, -v s="$host" '$1 == "proxies" && $2 == s { print $8 }' "$work/haproxy-stat.csv")
done

"$loadgen" merge "$work"/agents/runs/*-agent-*-of-2.json "$work"/sample-p0.json \
    "$work"/sample-p1.json --results "$results"
mkdir -p "$results/parts"
cp "$work"/agents/runs/*-agent-*-of-2.json "$work"/sample-p*.json "$work/haproxy.cfg" \
    "$results/parts/"
printf '{"balancer": "haproxy leastconn send-proxy-v2", "sessions_by_proxy_host": {"p0": %s, "p1": %s}}\n' \
    "${sessions[p0]:-0}" "${sessions[p1]:-0}" >"$results/parts/balancer.json"
echo "multihost: the balancer gave p0 ${sessions[p0]:-0} sessions and p1 ${sessions[p1]:-0}; the merged record is in $results/runs, its parts in $results/parts"
