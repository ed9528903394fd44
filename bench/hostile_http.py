"""What hostile clients cost `planewatch serve` (issue 14.9: the figures
tests/test_hostile_http.py used to assert; the tests keep the behaviour).

Starts `planewatch serve` on 127.0.0.1 with no pods and no kernel sources, then:
1. /metrics latency idle, and while 1000 connections each hold half a request
   header (ratio to idle);
2. RSS before and after 60 connections each send 1.6 MB of headers (each is
   refused with a 400; before the limit RSS went from 71 to 140 MiB);
Root-free: `.venv/bin/python bench/hostile_http.py [--rounds 20]`. Only 127.0.0.1.
"""
from __future__ import annotations

import argparse
import http.client
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.ports import free_port  # noqa: E402

MIB = 1 << 20
NO_KERNEL = ("--no-collector.netlink", "--no-collector.ebpf", "--no-collector.routes",
             "--no-collector.sriov")


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def scrape_seconds(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        started = time.perf_counter()
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
        return time.perf_counter() - started
    finally:
        conn.close()


def median_ms(port: int, rounds: int) -> float:
    return statistics.median(scrape_seconds(port) for _ in range(rounds)) * 1e3


def send_all(sock: socket.socket, payload: bytes) -> None:
    """Send until the server has refused (closed or reset) or everything is sent."""
    try:
        sock.sendall(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    work = tempfile.mkdtemp(prefix="pw-bench-http-")
    pods = os.path.join(work, "pods.json")
    with open(pods, "w") as f:
        f.write("[]")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "exporters", "serve", "--web.listen-address",
                             f"127.0.0.1:{port}", "--pods-file", pods, "--node-name", "bench", *NO_KERNEL,
                             "--web.read-timeout", "30", "--web.max-connections", "1100",
                             "--web.max-connections-per-client", "1100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    socks: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                scrape_seconds(port)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        idle = median_ms(port, args.rounds)
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: planewatch\r\nX-Never-Ends: aaaa")
            socks.append(s)
        held = median_ms(port, args.rounds)
        print(f"/metrics median: idle {idle:.1f} ms, with 1000 unfinished requests held {held:.1f} ms "
              f"({held / idle:.2f}x idle)")
        for s in socks:
            s.close()
        socks.clear()

        before = rss(proc.pid)
        headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 8000) for i in range(200))
        for _ in range(60):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(s)
            send_all(s, b"GET /metrics HTTP/1.1\r\nHost: planewatch\r\n" + headers)
        for s in socks:                      # each refused: a 400, then the server closes
            s.settimeout(20)
            try:
                while s.recv(65536):
                    pass
            except OSError:
                pass
        after = rss(proc.pid)
        print(f"RSS {before / MIB:.1f} -> {after / MIB:.1f} MiB after 60 x {len(headers) / 1e6:.1f} MB "
              f"of headers (+{(after - before) / MIB:.1f} MiB; before the header limit: 71 -> 140 MiB)")
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(timeout=15)
        for name in os.listdir(work):
            os.unlink(os.path.join(work, name))
        os.rmdir(work)


if __name__ == "__main__":
    main()
