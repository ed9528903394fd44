"""The two hand-written codecs against the libraries they replace, on the same input:

- kernel/rtnl.py `parse_link` vs pyroute2's `ifinfmsg` decoding of the same
  RTM_GETLINK dump (a namespace with --links veth ends, made here and removed);
- exporters/exposition.py `render` vs prometheus_client's `generate_latest` of
  the same --series samples (attachment-shaped labels).

Needs root for the namespace. Prints per-item times, best of --repeat runs.
    python bench/codecs.py [--links 500] [--series 11000]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from collector.family import COUNTER, Family  # noqa: E402
from exporters.exposition import render  # noqa: E402
from kernel import rtnl  # noqa: E402
from kernel.nsenter import in_netns  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def netlink(links: int, repeat: int) -> None:
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    ns = f"pwcodec{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        batch = "".join(f"link add c{i} type veth peer name d{i}\n" for i in range(links // 2))
        subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch.encode(), check=True)
        with in_netns(f"/run/netns/{ns}"):
            sock = rtnl.RtnlSocket.open()
        body = rtnl._IFINFOMSG.pack(0, 0, 0, 0, 0)
        msgs = sock._dump(rtnl.RTM_GETLINK, rtnl.RTM_NEWLINK, body, lambda buf, s, e: bytes(buf[s - 16:e]))
        sock.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)

    def ours():
        for m in msgs:
            rtnl.parse_link(m, 16, len(m))

    def theirs():
        for m in msgs:
            msg = ifinfmsg(m)
            msg.decode()
            msg.get_attr("IFLA_IFNAME"), msg.get_attr("IFLA_STATS64")

    n = len(msgs)
    print(f"RTM_GETLINK, {n} links: kernel/rtnl.py {best(ours, repeat) / n * 1e6:.1f} us/link, "
          f"pyroute2 {best(theirs, repeat) / n * 1e6:.1f} us/link")


def exposition(series: int, repeat: int) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily
    labels = ("namespace", "pod", "network", "interface", "plane")
    rows = [(f"ns{i % 40}", f"pod-{i // 8}", f"ns{i % 40}/net{i % 3}", f"net{i % 8}", "data") for i in range(series)]

    def ours():
        fam = Family("planewatch_interface_receive_bytes_total", COUNTER, "Bytes received.", labels)
        for i, row in enumerate(rows):
            fam.add(row, i * 1500)
        render([fam])

    class Theirs:
        def collect(self):
            fam = CounterMetricFamily("planewatch_interface_receive_bytes", "Bytes received.", labels=labels)
            for i, row in enumerate(rows):
                fam.add_metric(row, i * 1500)
            yield fam

    registry = CollectorRegistry()
    registry.register(Theirs())
    print(f"exposition, {series} series: exporters/exposition.py {best(ours, repeat) * 1e3:.1f} ms, "
          f"prometheus_client {best(lambda: generate_latest(registry), repeat) * 1e3:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--links", type=int, default=500)
    ap.add_argument("--series", type=int, default=11000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    netlink(args.links, args.repeat)
    exposition(args.series, args.repeat)


if __name__ == "__main__":
    main()
