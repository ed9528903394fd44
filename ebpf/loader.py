"""Load the planewatch BPF objects, attach them to pod interfaces, read the maps.

One `Loader` per process. TCX links (kernel >= 6.6) are created inside the
pod's netns and die with their fd, so a SIGKILLed collector leaves nothing
behind; on older kernels clsact + cls_bpf filters are used instead and must be
removed explicitly (`detach`, `close`). Readers return plain dicts keyed by
(netns inode, ifindex, ...) because ifindex is only unique inside one netns.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ebpf import btf, libbpf, maps, tc
from ebpf.traffic_slots import TrafficSlots
from kernel.nsenter import in_netns, netns_inode

log = logging.getLogger(__name__)

OBJECTS_DIR = Path(__file__).resolve().parent / "build"
TRAFFIC_OBJECT = "interface_traffic.bpf.o"
DROPS_OBJECT = "packet_drops.bpf.o"
BENCH_PROGRAMS = ("bench_noop", "bench_counters", "bench_parse", "bench_lookup",
                  "bench_uncached_ingress", "bench_uncached_egress")
MAX_TOP_FLOWS = 1000
ATTACH_MODES = ("auto", "tcx", "clsact")

# Why loading failed, as a bounded label value (collector/sources/ebpf.py exports it).
OK = "ok"
OBJECTS_MISSING = "objects_missing"
LIBBPF_MISSING = "libbpf_missing"
BTF_MISSING = "btf_missing"
PERMISSION_DENIED = "permission_denied"
VERIFIER_REJECTED = "verifier_rejected"
KERNEL_UNSUPPORTED = "kernel_unsupported"
LOAD_FAILED = "load_failed"
REASONS = (OK, OBJECTS_MISSING, LIBBPF_MISSING, BTF_MISSING, PERMISSION_DENIED,
           VERIFIER_REJECTED, KERNEL_UNSUPPORTED, LOAD_FAILED)


class LoadError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def load_failure_reason(err: OSError) -> str:
    """Map libbpf's errno to a reason: EPERM without CAP_BPF, EACCES/EINVAL from
    the verifier, ESRCH/ENOTSUPP when a kfunc or attach point does not exist."""
    if err.errno == errno.EPERM:
        return PERMISSION_DENIED
    if err.errno in (errno.EACCES, errno.EINVAL, errno.E2BIG):
        return VERIFIER_REJECTED
    if err.errno in (errno.ESRCH, errno.ENOENT, errno.EOPNOTSUPP, 524):   # 524: ENOTSUPP
        return KERNEL_UNSUPPORTED
    return LOAD_FAILED


@dataclass
class Hook:
    """Our programs on one interface."""

    netns_inode: int
    ifindex: int
    netns_path: str
    mode: str                          # "tcx" | "clsact"
    link_fds: tuple[int, ...] = ()     # tcx
    created_clsact: bool = False       # clsact: the qdisc is ours to remove


def tcx_link_alive(hook: Hook) -> bool:
    """False when the device of a TCX hook went away (clsact hooks: always True).
    Both links sit on one device, so the first tells; os.open/os.read because
    this runs for every hook at every scrape (7 us against 25 us for open())."""
    if not hook.link_fds:
        return True
    try:
        fd = os.open(f"/proc/self/fdinfo/{hook.link_fds[0]}", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return b"\nifindex:\t0\n" not in os.read(fd, 4096)
    finally:
        os.close(fd)

# Least time between two walks of the flow table for per-interface evictions.
FLOW_CENSUS_SECONDS = 10.0


class Loader:
    """Loads both objects at construction; raises LoadError (with a reason)."""

    def __init__(self, objects_dir: str | Path = OBJECTS_DIR, *, btf_path: str = btf.VMLINUX_BTF,
                 attach_mode: str = "auto", flow_entries: int = 16384, counter_slots: int = 2048,
                 bench: bool = False):
        if attach_mode not in ATTACH_MODES:
            raise ValueError(f"attach_mode {attach_mode!r} not in {ATTACH_MODES}")
        self.mode = attach_mode
        self.hooks: dict[tuple[int, int], Hook] = {}
        # Interfaces whose drops are counted with no program on them (watch()).
        self.watch_only: set[tuple[int, int]] = set()
        self._lock = threading.RLock()
        self._objects: list[int] = []
        self._drop_link = 0
        # Refusals seen here rather than in BPF (a full watch map), and clsact
        # filters of a crashed predecessor removed before attaching.
        self.refused = {"watched": 0}
        self.stale_filters_removed = 0
        self.flow_census_seconds = FLOW_CENSUS_SECONDS
        self._census: tuple[float, dict] | None = None
        started = time.monotonic()
        self._preflight(Path(objects_dir), btf_path)
        try:
            self._load(Path(objects_dir), flow_entries, counter_slots, bench)
        except BaseException:
            self.close()
            raise
        try:
            self.reasons = btf.drop_reasons(btf_path)
        except btf.BTFError as err:         # costs the reason names only: drops stay counted
            self.reasons = {}
            log.warning("drop reasons by number (UNKNOWN_<n>): %s: %s", btf_path, err)
        self.load_seconds = time.monotonic() - started

    # --- loading ------------------------------------------------------------------

    @staticmethod
    def _preflight(objects_dir: Path, btf_path: str) -> None:
        for name in (TRAFFIC_OBJECT, DROPS_OBJECT):
            if not (objects_dir / name).is_file():
                raise LoadError(OBJECTS_MISSING, f"{objects_dir / name} (run make -C ebpf)")
        if not os.path.exists(btf_path):
            raise LoadError(BTF_MISSING, f"{btf_path} (kernel without CONFIG_DEBUG_INFO_BTF)")
        try:
            libbpf.lib()
        except OSError as err:
            raise LoadError(LIBBPF_MISSING, str(err)) from None

    def _open_and_load(self, path: Path, before_load=None) -> int:
        try:
            obj = libbpf.open_object(str(path))
        except OSError as err:
            raise LoadError(LOAD_FAILED, str(err)) from None
        self._objects.append(obj)
        if before_load:
            before_load(obj)
        with libbpf.capture_messages() as messages:
            try:
                libbpf.load_object(obj)
            except OSError as err:
                # the verifier's verdict is at the end of its (long) log
                tail = " | ".join(messages).replace("\n", " | ")[-1500:]
                raise LoadError(load_failure_reason(err), f"{path.name}: {err}; {tail}") from None
        return obj

    def _load(self, objects_dir: Path, flow_entries: int, counter_slots: int, bench: bool) -> None:
        def tune(obj: int) -> None:
            libbpf.set_max_entries(libbpf.find_map(obj, "flows"), flow_entries)
            try:
                libbpf.set_max_entries(libbpf.find_map(obj, "traffic_slots"), counter_slots)
            except FileNotFoundError:       # a build from before the slots: see below
                pass
            for name in BENCH_PROGRAMS if bench else ():
                try:                        # an older object may lack a variant
                    libbpf.set_autoload(libbpf.find_program(obj, name), True)
                except OSError:
                    pass

        traffic = self._open_and_load(objects_dir / TRAFFIC_OBJECT, tune)
        drops = self._open_and_load(objects_dir / DROPS_OBJECT)
        self.traffic_obj = traffic
        self.ingress_fd = libbpf.program_fd(libbpf.find_program(traffic, "tcx_ingress"))
        self.egress_fd = libbpf.program_fd(libbpf.find_program(traffic, "tcx_egress"))
        self.fds = {name: libbpf.map_fd(libbpf.find_map(obj, name)) for obj, name in (
            (traffic, "iface_traffic"), (traffic, "flows"), (traffic, "asym_packets"), (traffic, "flows_created"),
            (drops, "packet_drops"), (drops, "watched"))}
        self.drop_fd = libbpf.program_fd(libbpf.find_program(drops, "count_drop"))
        self._refused_fds = [libbpf.map_fd(libbpf.find_map(obj, "map_refused")) for obj in (traffic, drops)]
        try:
            self._drop_link = libbpf.attach_program(libbpf.find_program(drops, "count_drop"))
        except OSError as err:
            raise LoadError(load_failure_reason(err), f"attach tp_btf/kfree_skb: {err}") from None
        self.ncpus = libbpf.num_possible_cpus()
        try:
            index_fd, slots_fd = (libbpf.map_fd(libbpf.find_map(traffic, name))
                                  for name in ("traffic_index", "traffic_slots"))
        except FileNotFoundError:
            # objects built before the counter slots (bench --objects of an
            # older checkout) count every interface in iface_traffic: no slots
            index_fd, slots_fd, counter_slots = -1, -1, 0
        self.slots = TrafficSlots(index_fd, slots_fd, counter_slots, self.ncpus)

    def kernel_ids(self) -> dict[str, set[int]]:
        """Ids of our programs and links, as `bpftool prog/link show` lists them."""
        fds = [self.ingress_fd, self.egress_fd, libbpf.link_fd(self._drop_link)]
        fds += [fd for hook in self.hooks.values() for fd in hook.link_fds]
        ids: dict[str, set[int]] = {"programs": set(), "links": set()}
        for fd in fds:
            found = libbpf.fd_ids(fd)
            ids["programs"].add(found["prog_id"])
            if "link_id" in found:
                ids["links"].add(found["link_id"])
        return ids

    def program_fd(self, name: str) -> int:
        """fd of any program of interface_traffic (bench variants need bench=True)."""
        return libbpf.program_fd(libbpf.find_program(self.traffic_obj, name))

    # --- attach / detach ------------------------------------------------------------

    def attach(self, netns_path: str, ifindex: int) -> Hook:
        """Attach to `ifindex` inside the netns at `netns_path` (idempotent).
        Raises OSError when the netns or the interface is gone."""
        with self._lock:
            key = (netns_inode(netns_path), ifindex)
            if key in self.hooks:
                return self.hooks[key]
            self.slots.claim(key)           # before the programs: their first packet counts there
            try:
                with in_netns(netns_path):
                    self.stale_filters_removed += tc.remove_stale(key[1])
                    hook = self._attach_here(netns_path, key)
            except BaseException:
                self.slots.release(key)
                raise
            try:
                self._watch_key(key)
            except OSError:
                # The watch map is full: undo the attach, or its TCX links (fds)
                # and clsact filters would stay with no hook to remove them.
                self._unhook(hook)
                self.slots.release(key)
                raise
            self.hooks[key] = hook
            return hook

    def watch(self, netns_path: str, ifindex: int) -> tuple[int, int]:
        """Count `ifindex`'s drops (kfree_skb) without attaching any program to
        it: nothing runs per packet. Returns its (netns inode, ifindex) key.
        Raises OSError when the netns is gone or the watch map is full."""
        with self._lock:
            key = (netns_inode(netns_path), ifindex)
            if key in self.hooks or key in self.watch_only:
                return key
            self._watch_key(key)
            self.watch_only.add(key)
            return key

    def _watch_key(self, key: tuple[int, int]) -> None:
        """The key into the kfree_skb program's `watched` map; a full map is
        counted as refused and raised."""
        try:
            maps.put(self.fds["watched"], maps.WATCHED, key, (1,))
        except OSError as err:
            if err.errno == errno.E2BIG:
                self.refused["watched"] += 1
            raise

    def _attach_here(self, netns_path: str, key: tuple[int, int]) -> Hook:
        netns, ifindex = key
        if self.mode in ("auto", "tcx"):
            try:
                hook = Hook(netns, ifindex, netns_path, "tcx", self._tcx_links(ifindex))
                self.mode = "tcx"
                return hook
            except OSError as err:
                # EINVAL: the kernel does not know BPF_TCX_* (< 6.6)
                if self.mode == "tcx" or err.errno != errno.EINVAL:
                    raise
                log.info("TCX unavailable (%s); using clsact + cls_bpf", err)
                self.mode = "clsact"
        created = tc.attach(ifindex, self.ingress_fd, self.egress_fd)
        return Hook(netns, ifindex, netns_path, "clsact", created_clsact=created)

    def _tcx_links(self, ifindex: int) -> tuple[int, int]:
        ingress = libbpf.link_create(self.ingress_fd, ifindex, libbpf.BPF_TCX_INGRESS, libbpf.BPF_F_BEFORE)
        try:
            egress = libbpf.link_create(self.egress_fd, ifindex, libbpf.BPF_TCX_EGRESS, libbpf.BPF_F_BEFORE)
        except OSError:
            os.close(ingress)
            raise
        return ingress, egress

    def detach(self, netns_inode: int, ifindex: int) -> None:
        """Remove our programs from one interface and forget its counts."""
        with self._lock:
            hook = self.hooks.pop((netns_inode, ifindex), None)
            if hook is not None:
                self._unhook(hook)
            self.watch_only.discard((netns_inode, ifindex))
            self._forget(netns_inode, ifindex)

    def _unhook(self, hook: Hook) -> None:
        for fd in hook.link_fds:
            os.close(fd)        # an unpinned TCX link goes away with its last fd
        if hook.mode == "clsact":
            self._remove_clsact(hook)

    @staticmethod
    def _remove_clsact(hook: Hook) -> None:
        try:
            with in_netns(hook.netns_path):
                # the path may now name another netns: only touch the one we used
                if netns_inode("/proc/thread-self/ns/net") != hook.netns_inode:
                    return
                tc.detach(hook.ifindex, hook.created_clsact)
        except FileNotFoundError:
            pass                # the netns is gone, and our filters with it
        except OSError as err:
            log.warning("removing clsact filters from ifindex %d: %s", hook.ifindex, err)

    def _forget(self, netns: int, ifindex: int) -> None:
        """Drop the interface's counts, so a later interface under the same key
        (netns inodes and ifindexes are reused) starts from zero. Traffic keys
        are known exactly; drop and asymmetry keys need one pass over small maps."""
        maps.remove(self.fds["watched"], maps.WATCHED, (netns, ifindex))
        self.slots.release((netns, ifindex))
        for direction in range(len(maps.DIRECTIONS)):
            maps.remove(self.fds["iface_traffic"], maps.TRAFFIC, (netns, ifindex, direction))
        maps.remove(self.fds["flows_created"], maps.CREATED, (netns, ifindex))
        maps.delete_where(self.fds["packet_drops"], maps.DROPS, lambda k: k[:2] == (netns, ifindex))
        maps.delete_where(self.fds["asym_packets"], maps.ASYMMETRIC,
                          lambda k: k[0] == netns and ifindex in (k[1], k[2]))

    def keys(self) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
        """(the keys hooked, the keys whose drops are counted: the hooked ones and
        the watch() ones) read at one instant (copies: safe across threads); the
        first within the second."""
        with self._lock:
            return set(self.hooks), self.watch_only.union(self.hooks)

    def prune_dead(self) -> list[tuple[int, int]]:
        """Detach hooks whose interface is gone, returning their keys. A TCX link
        outlives its device (fdinfo then shows ifindex 0); without this, a new pod
        netns that reuses the inode and ifindex would look attached but count nothing."""
        with self._lock:
            dead = [key for key, hook in self.hooks.items() if not tcx_link_alive(hook)]
            for key in dead:
                self.detach(*key)
            return dead

    def close(self) -> None:
        """Detach everything and unload; safe to call twice."""
        with self._lock:
            for hook in list(self.hooks.values()):
                try:
                    self._unhook(hook)
                except OSError as err:
                    log.warning("detach %s: %s", hook, err)
            self.hooks.clear()
            self.watch_only.clear()
            if self._drop_link:
                libbpf.destroy_link(self._drop_link)
                self._drop_link = 0
            self._close_objects()

    def _close_objects(self) -> None:
        for obj in self._objects:
            libbpf.close_object(obj)
        self._objects.clear()

    # --- readers --------------------------------------------------------------------

    def _entries(self, name: str, layout: maps.Layout, ncpus: int) -> list[tuple[bytes, bytes]]:
        """The raw (key, value) bytes of one map: the only map read the decoders see
        (tests/replay.py feeds recorded dumps here). traffic_slots is read as
        its owners' entries (ebpf/traffic_slots.py), keyed like the other maps."""
        if name == "traffic_slots":
            return self.slots.entries()
        return maps.read_entries(self.fds[name], layout, ncpus)

    def _counters(self, name: str, layout: maps.Layout) -> dict:
        return maps.decode_counters(self._entries(name, layout, self.ncpus), layout, self.ncpus)

    def interface_counters(self) -> dict[tuple[int, int], tuple[int, int, int, int]]:
        """(netns, ifindex) -> (ingress packets, ingress bytes, egress packets, egress bytes)."""
        return maps.traffic_by_interface(self._counters("iface_traffic", maps.TRAFFIC),
                                         self._counters("traffic_slots", maps.SLOTTED_TRAFFIC))

    def interface_traffic(self) -> dict[tuple[int, int, str], tuple[int, int]]:
        """(netns, ifindex, "ingress"|"egress") -> (packets, bytes): the same, by direction."""
        return maps.traffic_by_direction(self.interface_counters())

    def packet_drops(self) -> dict[tuple[int, int, str], int]:
        """(netns, ifindex, drop reason name) -> packets."""
        return maps.drops_by_reason(self.drop_counters(), self.reasons)

    def drop_counters(self) -> dict[tuple[int, int, int], tuple[int]]:
        """(netns, ifindex, skb_drop_reason value) -> (packets,), as the map holds
        them (`reasons` names the values): what /metrics reads, in one pass."""
        return self._counters("packet_drops", maps.DROPS)

    def asymmetric_packets(self) -> dict[tuple[int, int, int], int]:
        """(netns, ingress ifindex of the request, egress ifindex of the reply) -> packets."""
        return {k: v[0] for k, v in self._counters("asym_packets", maps.ASYMMETRIC).items()}

    def flow_evictions(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(netns, ifindex) -> (flows it created, flows it created that the LRU
        table evicted since). Flows are never deleted otherwise, so what an
        interface created and no longer holds was evicted: by its own later flows
        or by another pod's. Walking a full table costs ~17 ms (16 384 flows), so
        the census is taken at most every FLOW_CENSUS_SECONDS (both numbers of one
        census together, so evicted never goes down)."""
        now = time.monotonic()
        if self._census is None or now - self._census[0] >= self.flow_census_seconds:
            created = {k: v[0] for k, v in self._counters("flows_created", maps.CREATED).items()}
            held = maps.flows_held(self._entries("flows", maps.FLOWS, 1))
            self._census = (now, {k: (n, max(0, n - held.get(k, 0))) for k, n in created.items()})
        return self._census[1]

    def map_refused(self) -> dict[str, int]:
        """Map name -> updates refused because the map was full, since load."""
        out = dict.fromkeys(maps.REFUSED_MAPS, 0)
        for fd in self._refused_fds:
            for (index,), (count,) in maps.decode_counters(maps.read_entries(fd, maps.REFUSED, self.ncpus),
                                                           maps.REFUSED, self.ncpus).items():
                if index < len(maps.REFUSED_MAPS):
                    out[maps.REFUSED_MAPS[index]] += count
        with self._lock:
            out.update(self.refused)
        return out

    def top_asymmetric_flows(self, n: int) -> list[dict]:
        """The `n` (at most MAX_TOP_FLOWS) flows with most asymmetric packets."""
        n = max(0, min(n, MAX_TOP_FLOWS))
        entries = self._entries("flows", maps.FLOWS, 1)
        top = maps.top_asymmetric_flows(entries, n)
        now_unix, now_mono = time.time(), time.monotonic_ns()
        return [flow.as_dict(now_unix, now_mono) for flow in top]
