"""Record the kernel's answers to one scrape of the golden lab, and replay them.

What a scrape reads from the kernel goes through four narrow seams, and this
module sits behind each of them, once recording (as root, on the real lab) and
then replaying (as anybody, with no namespace, socket or BPF map):

- rtnetlink dumps on the sockets a kept pod netns holds (links, addresses,
  RTM_GETSTATS, neighbours, route next hops): `NetnsPool(sockets=...)`; the
  replies are replayed into `kernel.rtnl.RtnlSocket`, whose decoders run;
- the routes source's dumps and route lookups and the rp_filter it reads inside
  the netns: `RoutesSource.read_pod`; `collector.sources.routes.read_facts` runs
  on a socket that replays the recorded replies (kernel/rtnl_routes.py decodes);
- the SR-IOV PF query (RTM_GETLINK with VF info): the transport of
  `NetlinkVfStats`;
- BPF map dumps: `Loader._entries`; the ebpf/maps.py decoders run on the bytes.

Netns inodes are a property of the run, not of the recording: the replay pins
one empty file per recorded namespace and rewrites the netns word of every BPF
map key to that file's inode.

Record again (as root) when the golden /metrics changes on purpose:

    .venv/bin/python -m tests.replay

It writes tests/fixtures/recorded/{kernel.json,pods.yaml,metrics.prom}: the
raw answers, the lab's pods file, and the /metrics the collector served live
from those very answers (scrape durations dropped), which the replay must
reproduce byte for byte (tests/test_replay_golden.py).
"""
from __future__ import annotations

import argparse
import base64
import errno
import json
import os
import re
import struct
import sys
import threading

from collector.netns import Resolver
from collector.netns_pool import NetnsPool, open_sockets
from kernel.rtnl import RtnlSocket, messages
from kernel.rtnl_events import NetnsEvents

HERE = os.path.dirname(os.path.abspath(__file__))
RECORDED = os.path.join(HERE, "fixtures", "recorded")
KERNEL = os.path.join(RECORDED, "kernel.json")
PODS = os.path.join(RECORDED, "pods.yaml")
METRICS = os.path.join(RECORDED, "metrics.prom")

_NLMSGHDR = struct.Struct("=IHHII")
DURATION = re.compile(r"^planewatch_scrape_collector_duration_seconds\{")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _raw(text: str) -> bytes:
    return base64.b64decode(text)


def without_durations(text: str) -> str:
    """The only part of a scrape that no recording can fix: how long it took."""
    return "".join(line for line in text.splitlines(keepends=True) if not DURATION.match(line))


# --- rtnetlink -----------------------------------------------------------------------

def _request_key(msg: bytes) -> str:
    """A request without its sequence numbers and port: two dumps of one type (routes
    of each family, route lookups of each address) are different requests. A
    datagram of several requests (kernel/rtnl.py `_requests`) keys them all."""
    return "+".join(f"{kind}:{msg[start:end].hex()}" for kind, _seq, start, end in messages(msg))


def _first_seq(msg: bytes) -> int:
    return _NLMSGHDR.unpack_from(msg)[3]


def _rebase_seqs(buf: bytes, delta: int) -> bytes:
    """Every message's sequence number plus `delta` (mod 2**32): recordings store
    them relative to the request's first, replays add the new request's first."""
    out = bytearray(buf)
    for _kind, seq, start, _end in messages(buf):
        struct.pack_into("=I", out, start - _NLMSGHDR.size + 8, (seq + delta) & 0xFFFFFFFF)
    return bytes(out)


class RecordingSocket:
    """A netlink socket that keeps the reply buffers of the last answer to each request."""

    def __init__(self, sock, replies: dict[str, list[str]]):
        self._sock = sock
        self._replies = replies
        self._current: list[str] = []
        self._first = 0

    def send(self, msg: bytes) -> int:
        self._current = self._replies[_request_key(msg)] = []
        self._first = _first_seq(msg)
        return self._sock.send(msg)

    def recv(self, size: int) -> bytes:
        buf = self._sock.recv(size)
        self._current.append(_b64(_rebase_seqs(buf, -self._first)))
        return buf

    def recv_into(self, buffer) -> int:
        n = self._sock.recv_into(buffer)
        self._current.append(_b64(_rebase_seqs(bytes(buffer[:n]), -self._first)))
        return n

    def __getattr__(self, name):
        return getattr(self._sock, name)


class ReplaySocket:
    """Answers each request with the buffers recorded for it (or, in hand-made
    tables, for its message type), the sequence number rewritten to the request's."""

    def __init__(self, replies: dict[str, list[str]], where: str):
        self._replies = replies
        self._where = where
        self._pending: list[bytes] = []

    def send(self, msg: bytes) -> int:
        _len, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(msg)
        key = _request_key(msg)
        if key not in self._replies:
            key = str(kind)             # a hand-made table answers every request of a type
        if key not in self._replies:
            raise OSError(errno.EOPNOTSUPP, f"{self._where}: no recorded reply to netlink message type {kind}")
        self._pending = [_rebase_seqs(_raw(b), seq) for b in self._replies[key]]
        return len(msg)

    def recv(self, size: int) -> bytes:
        if not self._pending:
            raise OSError(errno.EBADMSG, f"{self._where}: recording ran out")
        return self._pending.pop(0)

    def recv_into(self, buffer) -> int:
        data = self.recv(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


# --- routes source ---------------------------------------------------------------------

def recording_read_pod(by_pod: dict):
    """`collector.sources.routes.read_pod`, with the socket's replies and the rp_filter
    kept per pod."""
    from collector.sources.routes import read_facts, read_rp_filter
    from kernel.nsenter import in_netns

    def read_pod(netns_fd, procfs, namespace, pod, atts, links, budgets):
        entry = by_pod[f"{namespace}/{pod}"] = {"replies": {}}
        sock = None
        try:
            with in_netns(netns_fd):
                sock = RtnlSocket.open()
                entry["rp_filter"] = read_rp_filter(procfs, [a.interface for a in atts])
            return read_facts(RtnlSocket(RecordingSocket(sock._sock, entry["replies"])), entry["rp_filter"],
                              namespace, pod, atts, links, budgets)
        finally:
            if sock is not None:
                sock.close()
    return read_pod


def replay_read_pod(by_pod: dict):
    from collector.sources.routes import read_facts

    def read_pod(netns_fd, procfs, namespace, pod, atts, links, budgets):
        key = f"{namespace}/{pod}"
        if key not in by_pod:
            raise OSError(errno.ENOENT, f"{key}: not in the recording")
        entry = by_pod[key]
        return read_facts(RtnlSocket(ReplaySocket(entry["replies"], key)), entry["rp_filter"],
                          namespace, pod, atts, links, budgets)
    return read_pod


# --- SR-IOV PF query --------------------------------------------------------------------

class RecordingTransport:
    def __init__(self, transport, answers: dict):
        self._transport = transport
        self._answers = answers

    def __call__(self, pf: str) -> bytes:
        try:
            reply = self._transport(pf)
        except OSError as err:
            self._answers[pf] = {"errno": err.errno}
            raise
        self._answers[pf] = {"reply": _b64(reply)}
        return reply

    def close(self) -> None:
        self._transport.close()


class ReplayTransport:
    def __init__(self, answers: dict):
        self._answers = answers

    def __call__(self, pf: str) -> bytes:
        answer = self._answers.get(pf, {"errno": errno.ENODEV})
        if "errno" in answer:
            raise OSError(answer["errno"], os.strerror(answer["errno"] or errno.EIO))
        return _raw(answer["reply"])


# --- BPF maps ---------------------------------------------------------------------------

def _netns_word(key: bytes, inode: int) -> bytes:
    """Every planewatch map key starts with the netns inode (ebpf/planewatch.bpf.h)."""
    return struct.pack("=I", inode) + key[4:]


def replay_loader(bpf: dict, inode_of: dict[int, int]):
    """The read side of ebpf.loader.Loader (`_counters`, `interface_traffic`,
    `packet_drops`, ...: the same code) over recorded map dumps."""
    from ebpf.loader import Loader

    class ReplayLoader(Loader):
        def __init__(self):         # nothing loaded: the maps are the recording
            _replay_state(self, bpf, inode_of)

        def _entries(self, name, layout, ncpus):
            return list(self._maps.get(name, ()))

        def prune_dead(self):
            return []

        def map_refused(self) -> dict[str, int]:
            return dict(self._recorded_refused)

        def detach(self, netns_inode: int, ifindex: int) -> None:
            self.hooks.pop((netns_inode, ifindex), None)
            self.watch_only.discard((netns_inode, ifindex))

        def close(self) -> None:
            self.hooks.clear()
            self.watch_only.clear()
    return ReplayLoader()


def _replay_state(loader, bpf: dict, inode_of: dict[int, int]) -> None:
    loader.ncpus = bpf["ncpus"]
    loader.mode = bpf["mode"]
    loader.reasons = {int(code): name for code, name in bpf["reasons"].items()}
    loader.hooks = {(inode_of[n], i): None for n, i in bpf["attached"] if n in inode_of}
    loader.watch_only = {(inode_of[n], i) for n, i in bpf.get("watch_only", ()) if n in inode_of}
    loader._lock = threading.Lock()
    loader._census = None
    loader.flow_census_seconds = 0.0
    loader.stale_filters_removed = bpf.get("stale_filters_removed", 0)
    loader._recorded_refused = bpf.get("refused", {})
    loader._maps = {name: [(_netns_word(_raw(k), inode_of.get(struct.unpack_from("=I", _raw(k))[0], 0)),
                            _raw(v)) for k, v in entries]
                    for name, entries in bpf["maps"].items()}


# --- the two sides -------------------------------------------------------------------------

def serve_args(pods_file: str, sysfs: str, netns_dir: str, procfs: str) -> list[str]:
    from lab.objects import NODE_NAME
    return ["--node-name", NODE_NAME, "--pods-file", pods_file, "--path.sysfs", sysfs,
            "--path.netns", netns_dir, "--path.procfs", procfs]


def build(args: list[str]):
    """The Server `planewatch serve <args>` builds (feeds not started)."""
    import argparse as _argparse

    from exporters.cli import add_serve_flags
    from exporters.serve import build_server
    parser = _argparse.ArgumentParser()
    add_serve_flags(parser)
    server, feeds, _ = build_server(parser.parse_args(args))
    # The HTTP refusal counters are the process's (one server a process); other
    # tests in this process may have moved them: this server counts from zero.
    from exporters.httpstats import REFUSALS, Refusals
    extra = server.scraper.extra
    extra[extra.index(REFUSALS.families)] = Refusals().families
    for feed in feeds:
        feed.load_once()        # the pods file read now, not on a thread
    return server, feeds


class Replay:
    """A planewatch Server whose kernel is the recording. `netns_dir` must be an
    empty directory the replay may fill; `procfs` any directory (no pod process
    is found there, as on the lab)."""

    def __init__(self, sysfs: str, netns_dir: str, procfs: str, kernel: dict | None = None):
        if kernel is None:
            with open(KERNEL) as f:
                kernel = json.load(f)
        self.kernel = kernel
        inode_of = {}
        for name, ns in kernel["netns"].items():
            path = os.path.join(netns_dir, name)
            open(path, "w").close()
            inode_of[ns["inode"]] = os.stat(path).st_ino
        self.server, self.feeds = build(serve_args(PODS, sysfs, netns_dir, procfs))
        scraper = self.server.scraper
        netns = kernel["netns"]

        def sockets(fd: int, path: str):
            name = os.path.basename(path)
            # a recording is one instant: nothing is ever announced
            return RtnlSocket(ReplaySocket(netns[name]["replies"], name)), NetnsEvents.quiet()
        scraper.resolver = Resolver(netns_dir, procfs, pool=NetnsPool(scraper.resolver.pool.budgets, sockets=sockets))
        sources = scraper.sources
        for name in ("netlink", "neighbours"):
            if name in sources:
                sources[name].native = False        # the recorded replies, decoded by kernel/rtnl.py
        if "routes" in sources:
            sources["routes"].read_pod = replay_read_pod(kernel["routes"])
        if "sriov" in sources:
            sources["sriov"].netlink.transport = ReplayTransport(kernel["sriov_pf"])
        if "ebpf" in sources:
            sources["ebpf"].loader = replay_loader(kernel["bpf"], inode_of)
            sources["ebpf"].reason = "ok"

    def scrape(self) -> str:
        return self.server.scraper.scrape().decode()

    def close(self) -> None:
        for feed in self.feeds:
            feed.stop()
        self.server.scraper.close()


def record(prefix: str, out_dir: str = RECORDED) -> None:
    """Bring up the golden lab under `prefix`, serve it for real with every kernel
    answer kept, scrape once, and write the recording."""
    import tempfile

    import yaml

    from lab import topology
    from lab.objects import lab_objects
    from lab.sriov_fixture import write_sriov_fixture
    from tests.test_golden import EXTRA

    topology.down(prefix)
    state = topology.up(prefix, topology.demo_pods() + topology.sriov_pods())
    try:
        with open(EXTRA) as f:
            extra = [d for d in yaml.safe_load_all(f) if d]
        pods_text = yaml.safe_dump_all(lab_objects(state) + extra)
        with tempfile.TemporaryDirectory() as tmp:
            pods_file, sysfs = os.path.join(tmp, "pods.yaml"), os.path.join(tmp, "sysfs")
            with open(pods_file, "w") as f:
                f.write(pods_text)
            write_sriov_fixture(sysfs)
            # traffic once BPF is attached, so the counters and drop maps hold numbers
            kernel, metrics = _record_scrape(serve_args(pods_file, sysfs, "/run/netns", "/proc"),
                                             lambda: topology.warm_up(state))
    finally:
        topology.down(prefix)
    kernel["prefix"] = prefix
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "kernel.json"), "w") as f:
        json.dump(kernel, f, indent=1, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out_dir, "pods.yaml"), "w") as f:
        f.write(pods_text)
    with open(os.path.join(out_dir, "metrics.prom"), "w") as f:
        f.write(without_durations(metrics))


def _record_scrape(args: list[str], before_scrape) -> tuple[dict, str]:
    server, feeds = build(args)
    scraper = server.scraper
    replies_by_path: dict[str, dict] = {}

    def sockets(fd: int, path: str):
        rtnl, events = open_sockets(fd)
        replies_by_path[path] = {"inode": os.fstat(fd).st_ino, "replies": {}}
        return RtnlSocket(RecordingSocket(rtnl._sock, replies_by_path[path]["replies"])), events
    scraper.resolver = Resolver(scraper.resolver.netns_dir, scraper.resolver.procfs,
                                pool=NetnsPool(scraper.resolver.pool.budgets, sockets=sockets))
    sources = scraper.sources
    for name in ("netlink", "neighbours"):
        sources[name].native = False        # the replies through RecordingSocket, not kernel/nlbatch.c
    routes: dict = {}
    sources["routes"].read_pod = recording_read_pod(routes)
    sriov_pf: dict = {}
    sources["sriov"].netlink.transport = RecordingTransport(sources["sriov"].netlink.transport, sriov_pf)
    maps: dict[str, list] = {}
    ebpf = sources["ebpf"]
    scraper.reconcile()                 # loads the BPF objects and attaches, as the server's thread does
    loader = ebpf.loader
    if loader is None:
        raise SystemExit(f"BPF did not load ({ebpf.reason}): record where it does")
    real_entries = loader._entries

    def entries(name, layout, ncpus):
        got = real_entries(name, layout, ncpus)
        maps[name] = [[_b64(k), _b64(v)] for k, v in got]
        return got
    loader._entries = entries
    try:
        before_scrape()
        metrics = scraper.scrape().decode()
        snapshot = scraper.snapshot()
        used = {pv.netns_path for pv in snapshot.pods if pv.netns_path}
        netns = {os.path.basename(p): r for p, r in replies_by_path.items() if p in used}
        inodes = {r["inode"] for r in netns.values()}
        hooked, watched = loader.keys()
        watch_only = sorted(k for k in watched - hooked if k[0] in inodes)
        kernel = {
            "netns": netns,
            "routes": routes,
            "sriov_pf": sriov_pf,
            "bpf": {"ncpus": loader.ncpus, "mode": loader.mode,
                    "reasons": {str(c): n for c, n in sorted(loader.reasons.items())},
                    "attached": sorted(k for k in hooked if k[0] in inodes),
                    "refused": loader.map_refused(),
                    "stale_filters_removed": loader.stale_filters_removed,
                    **({"watch_only": watch_only} if watch_only else {}),
                    "maps": {name: [e for e in got if struct.unpack_from("=I", _raw(e[0]))[0] in inodes]
                             for name, got in maps.items()}},
        }
    finally:
        for feed in feeds:
            feed.stop()
        scraper.close()
    return kernel, metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default="pwrec", help="lab prefix for the recording (default pwrec)")
    parser.add_argument("--out", default=RECORDED, help=f"directory to write (default {RECORDED})")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("recording needs root: it brings up the lab and loads BPF", file=sys.stderr)
        return 1
    record(args.prefix, args.out)
    print(f"recorded into {args.out}: review the diff (git diff --stat {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
