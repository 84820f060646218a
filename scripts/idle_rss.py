#!/usr/bin/env python3
"""Measures the proxy's RSS per idle established session.

Starts the release `proxy` binary and a small asyncio echo target, opens N SOCKS5 sessions
(one echoed message each, so every session is truly established), then holds them idle and
reads the proxy's VmRSS from /proc. Prints RSS before, with N idle sessions, and the
difference per session. Loopback only; bounded by N and a 60 s timeout per socket.

Usage: scripts/idle_rss.py [--conns N] [--mode MODE] [--repeat K]
(loadgen, once it exists, measures this and much more; this script needs only python3.)
"""
import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ECHO = r"""
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
async def echo(r, w):
    try:
        while data := await r.read(65536):
            w.write(data); await w.drain()
    except ConnectionError:
        pass
    w.close()
async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def session(proxy_port, echo_port):
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=60)
    s.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
              + struct.pack(">H", echo_port) + b"ping")
    got = b""
    while len(got) < 2 + 10 + 4:
        chunk = s.recv(64)
        if not chunk:
            raise RuntimeError("proxy closed the session")
        got += chunk
    if got[:4] != b"\x05\x00\x05\x00" or got[-4:] != b"ping":
        raise RuntimeError(f"unexpected reply {got!r}")
    return s


def measure(args):
    binary = os.path.join(ROOT, "target", "release", "proxy")
    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    proxy = subprocess.Popen([binary, "--listen", "127.0.0.1:0", "--mode", args.mode,
                              "--log-level", "warn"], stdout=subprocess.PIPE, text=True)
    try:
        echo_port = int(echo.stdout.readline())
        proxy_port = int(proxy.stdout.readline().split()[2].rsplit(":", 1)[1])
        warm = [session(proxy_port, echo_port) for _ in range(10)]
        for s in warm:
            s.close()
        time.sleep(0.5)
        before = rss_kib(proxy.pid)
        held = []
        for _ in range(args.conns):
            try:
                held.append(session(proxy_port, echo_port))
            except (OSError, RuntimeError) as err:
                print(f"stopped at {len(held)} sessions: {err}", flush=True)
                break
        time.sleep(1.0)
        after = rss_kib(proxy.pid)
        per_session = (after - before) * 1024 / len(held)
        print(f"mode={args.mode} conns={len(held)} rss_before={before} KiB "
              f"rss_idle={after} KiB per_session={per_session:.0f} B", flush=True)
        for s in held:
            s.close()
        return per_session
    finally:
        proxy.terminate()
        echo.terminate()
        proxy.wait(timeout=30)
        echo.wait(timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=5000)
    parser.add_argument("--mode", default="async")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.conns + 100 > hard:
        sys.exit(f"--conns {args.conns} needs {args.conns + 100} descriptors; hard limit is {hard}")
    results = [measure(args) for _ in range(args.repeat)]
    print(f"median per idle session: {statistics.median(results):.0f} B over {len(results)} runs")


if __name__ == "__main__":
    main()
