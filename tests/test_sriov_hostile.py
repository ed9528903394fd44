"""SR-IOV sysfs reads under failure and attack: each costs one counter or one VF.

Two kinds of failure, both performed for real:
- drivers' show() failing with an errno. Through the `Sysfs` read seam for every
  errno class, and (as root, in a private mount namespace) with real kernel
  attributes bind-mounted over fixture files, so the errno comes from a real
  sysfs show(): EINVAL (`lo/speed`), EIO (runtime-PM `autosuspend_delay_ms`
  without runtime PM), EACCES (a write-only attribute), EOPNOTSUPP (a netdev
  without ndo_get_phys_port_name).
- a tenant's annotation aimed at what hangs or floods a reader: `../` values,
  a FIFO, a character device, a symlink out of the tree, a huge file.
"""
from __future__ import annotations

import ctypes
import errno
import glob
import os
import subprocess
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector import sriov_readers as readers
from collector.registry import Config, Paths, Snapshot
from collector.sources import sriov
from collector.sysfs_safe import Sysfs, pci_address
from exporters.exposition import render
from lab import sriov_fixture
from tests.test_sriov import FakeTransport, one_pod_per_vf, pci, pod_view
from tests.vf_metric_names import VF_METRIC, with_expected_metrics

INTEL_PF, MLX_PF = "0000:3b:00.0", "0000:5e:00.0"


@pytest.fixture
def tree(tmp_path):
    return with_expected_metrics(sriov_fixture.write_tree(str(tmp_path / "sys"), sriov_fixture.TEST_LAYOUT))


def stats_file(root: str, pf: str, index: int, name: str = "") -> str:
    path = sriov.stats_path(root, pf, index)
    return os.path.join(path, name) if name else path


def scrape_text(root: str, snapshot: Snapshot, fs: Sysfs | None = None, timeout: float = 10.0) -> tuple[str, float]:
    """Render one collect in a thread: a reader that blocks fails the test instead of hanging it."""
    source = sriov.SriovSource(Config(paths=Paths(sysfs=root)), netlink=readers.NetlinkVfStats(FakeTransport({})),
                               sysfs=fs)
    out: dict = {}

    def run():
        start = time.perf_counter()
        out["text"] = render(source.collect(snapshot)).decode()
        out["elapsed"] = time.perf_counter() - start
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), f"collect still running after {timeout}s: a read blocked"
    return out["text"], out["elapsed"]


def parse(text: str) -> dict[str, dict[tuple, float]]:
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def values(scraped, metric, **labels) -> list[float]:
    want = set(labels.items())
    return [v for k, v in scraped.get(metric, {}).items() if want <= set(k)]


def labelsets(scraped, metric, **labels) -> list[dict]:
    want = set(labels.items())
    return [dict(k) for k in scraped.get(metric, {}) if want <= set(k)]


def assert_intact(scraped, tree, pods: dict[int, str]) -> None:
    """Every counter of these VFs (index in the layout -> pod) equals the fixture."""
    for i, pod in pods.items():
        vf = tree["vfs"][i]
        for metric, value in vf["metrics"].items():
            assert values(scraped, metric, pod=pod) == [value], (pod, metric)

# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("text, want", [
    ("0000:3b:02.0", "0000:3b:02.0"),
    ("0000:3B:02.7", "0000:3b:02.7"),           # sysfs names are lower case
    (" 0000:18:0a.2 ", "0000:18:0a.2"),
    ("10000:01:1f.0", "10000:01:1f.0"),         # VMD domains have 5 hex digits
    ("0000:02:01:6", None),                     # the device-info spec's own typo
    ("0000:3b:20.0", None),                     # device is 5 bits
    ("0000:3b:02.8", None),                     # function is 3 bits
    ("3b:02.0", None),
    ("../../../../dev/zero", None),
    ("0000:3b:02.0/../../../../../proc/1/root", None),
    ("0000:3b:02.0\0", None),
    ("", None), (None, None), (42, None), ("0" * 4096, None),
])
def test_pci_address_format(text, want):
    assert pci_address(text) == want

# ---------------------------------------------------------------- errno, through the seam


def failing_read(targets: dict[str, int]):
    """os.read that fails like a driver's show() for the files in `targets`."""
    def read(fd, n):
        path = os.readlink(f"/proc/self/fd/{fd}")
        code = targets.get(path)
        if code is not None:
            raise OSError(code, os.strerror(code))
        return os.read(fd, n)
    return read


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EOPNOTSUPP, errno.EIO, errno.EAGAIN, errno.ENODEV,
                                  errno.EACCES, errno.EBUSY])
def test_a_failing_read_costs_one_counter_or_one_vf(tree, code):
    root = tree["sysfs"]
    intel = os.path.realpath(stats_file(root, INTEL_PF, 0, "rx_bytes"))
    mlx = os.path.realpath(stats_file(root, MLX_PF, 0))
    fs = Sysfs(root, read_fn=failing_read({intel: code, mlx: code}))
    snap = one_pod_per_vf(tree["vfs"])
    name = "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode[code]
    text, _ = scrape_text(root, snap, fs)
    scraped = parse(text)
    # Intel VF 0 (pod p0): only rx_bytes is gone
    p0 = tree["vfs"][0]["metrics"]
    assert not values(scraped, "planewatch_vf_receive_bytes_total", pod="p0")
    for metric, value in p0.items():
        if metric != "planewatch_vf_receive_bytes_total":
            assert values(scraped, metric, pod="p0") == [value], metric
    # Mellanox VF 0 (pod p3): one file, so its counters are gone; it is still listed
    assert not any(values(scraped, m, pod="p3") for m in tree["vfs"][3]["metrics"])
    assert labelsets(scraped, "planewatch_vf_info", pod="p3")
    # the neighbours lose nothing
    assert_intact(scraped, tree, {1: "p1", 2: "p2", 4: "p4"})
    errors = {(d["pod"], d["pf"], d["vf"], d["file"], d["reason"]): values(scraped, "planewatch_vf_read_errors_total", **d)[0]
              for d in labelsets(scraped, "planewatch_vf_read_errors_total")}
    assert errors == {("p0", "ens1f0", "0", "stats/rx_bytes", name): 1,
                      ("p3", "ens2f0np0", "0", "stats", name): 1}


def test_errors_count_per_scrape_and_go_with_the_pod(tree):
    root = tree["sysfs"]
    intel = os.path.realpath(stats_file(root, INTEL_PF, 2, "tx_spoofed"))
    fs = Sysfs(root, read_fn=failing_read({intel: errno.EINVAL}))
    source = sriov.SriovSource(Config(paths=Paths(sysfs=root)), netlink=readers.NetlinkVfStats(FakeTransport({})),
                               sysfs=fs)
    snap = one_pod_per_vf(tree["vfs"])
    for _ in range(3):
        scraped = parse(render(source.collect(snap)).decode())
    assert values(scraped, "planewatch_vf_read_errors_total", pod="p2", file="stats/tx_spoofed",
                  reason="EINVAL") == [3]
    # a VF being reset: the handle stays cached, the counter comes back with the file
    fs._read = os.read
    scraped = parse(render(source.collect(snap)).decode())
    assert values(scraped, "planewatch_vf_transmit_spoofed_packets_total", pod="p2") == [
        tree["vfs"][2]["metrics"]["planewatch_vf_transmit_spoofed_packets_total"]]
    assert values(scraped, "planewatch_vf_read_errors_total", pod="p2") == [3]
    # the pod left: its error series goes with it
    scraped = parse(render(source.collect(one_pod_per_vf(tree["vfs"][:2]))).decode())
    assert not values(scraped, "planewatch_vf_read_errors_total", pod="p2")

# ---------------------------------------------------------------- errno, from real sysfs show()


def _first_failing(pattern: str, code: int) -> str:
    for path in sorted(glob.glob(pattern)):
        try:
            with open(path, "rb") as f:
                f.read(64)
        except OSError as err:
            if err.errno == code:
                return path
    return ""


REAL_ERRNO_SOURCES = {
    errno.EINVAL: "/sys/class/net/*/speed",
    errno.EIO: "/sys/class/net/*/power/autosuspend_delay_ms",
    errno.EOPNOTSUPP: "/sys/class/net/*/phys_port_name",
    errno.EACCES: "/sys/bus/*/rescan",        # write-only: kernfs refuses a read open even to root
}


def _in_private_mount_ns(binds: list[tuple[str, str]], fn) -> str:
    """Run fn() on a thread of its own that first moves to a mount namespace of its
    own holding `binds`; its output string. unshare(CLONE_NEWNS) is per thread (it
    unshares the thread's fs too, which a multi-threaded process may do), and what
    that thread starts (fn's worker thread, `mount`) inherits it; the rest of the
    process never sees the binds, and they go with the thread. Not a fork: forking
    a process with threads (pytest's, aiohttp's) may deadlock the child."""
    out: list[str] = []

    def run():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(0x00020000) != 0:   # CLONE_NEWNS
                raise OSError(ctypes.get_errno(), "unshare")
            subprocess.run(["mount", "--make-rprivate", "/"], check=True)
            for src, dst in binds:
                subprocess.run(["mount", "--bind", src, dst], check=True)
            out.append(fn())
        except BaseException as err:           # noqa: BLE001 - reported to the caller
            out.append(f"CHILD-ERROR {err!r}")
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the collect in a private mount namespace did not end in 60 s"
    return out[0]


def test_real_kernel_errnos_cost_one_counter_each(root, tree):
    sysroot = tree["sysfs"]
    targets = {  # errno -> (fixture file it replaces, pod, file label)
        errno.EINVAL: (stats_file(sysroot, INTEL_PF, 0, "rx_bytes"), "p0", "stats/rx_bytes"),
        errno.EIO: (stats_file(sysroot, INTEL_PF, 2, "tx_packets"), "p2", "stats/tx_packets"),
        errno.EOPNOTSUPP: (stats_file(sysroot, INTEL_PF, 0, "tx_errors"), "p0", "stats/tx_errors"),
        errno.EACCES: (stats_file(sysroot, MLX_PF, 0), "p3", "stats"),
    }
    binds, want = [], {}
    for code, (dst, pod, file) in targets.items():
        src = _first_failing(REAL_ERRNO_SOURCES[code], code)
        if not src:
            print(f"no sysfs attribute here fails with {errno.errorcode[code]}: that class is not exercised")
            continue
        binds.append((src, os.path.realpath(dst)))
        want[(pod, file)] = "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode[code]
    assert len(want) >= 3, "fewer than 3 real errno sources on this kernel"
    snap = one_pod_per_vf(tree["vfs"])
    text = _in_private_mount_ns(binds, lambda: scrape_text(sysroot, snap)[0])
    assert not text.startswith("CHILD-ERROR"), text
    scraped = parse(text)
    got = {(d["pod"], d["file"]): d["reason"] for d in labelsets(scraped, "planewatch_vf_read_errors_total")}
    assert got == want
    for (pod, file), _ in want.items():
        if file.startswith("stats/"):
            metric = VF_METRIC[file[6:]]
            assert not values(scraped, metric, pod=pod)
    assert_intact(scraped, tree, {1: "p1", 4: "p4"})
    # what was not bind-mounted still reads: p0's other counters
    assert values(scraped, "planewatch_vf_transmit_bytes_total", pod="p0") == [
        tree["vfs"][0]["metrics"]["planewatch_vf_transmit_bytes_total"]]
    # the binds were private to the child
    with open(targets[errno.EINVAL][0]) as f:
        assert f.read().strip().isdigit()

# ---------------------------------------------------------------- attacks


def attacker(pod: str, address: str, pf: str = "", iface: str = "net1"):
    return pod_view("evil", pod, ("evil/sriov", iface, pci(address, pf), True))


def test_traversal_values_are_refused_before_any_path_is_built(tree, monkeypatch):
    root = tree["sysfs"]
    # VF 1 is left to the "hint" pod: a VF two pods claim is nobody's (collector/claims.py)
    honest = one_pod_per_vf(tree["vfs"], skip={tree["vfs"][1]["pci_address"]}).pods
    hostile = ("../../../../../dev/zero", "0000:3b:02.0/../../../../../../proc/1/root/etc",
               "..", "0000:3b:02.0 0000:3b:02.1", "/sys/bus/pci/devices/0000:3b:02.0")
    evil = tuple(attacker(f"e{i}", value) for i, value in enumerate(hostile))
    evil += (attacker("hint", tree["vfs"][1]["pci_address"], pf="../../../../dev/zero"),)
    text, _ = scrape_text(root, Snapshot(honest + evil))     # answered: no read blocked
    scraped = parse(text)
    for i in range(len(hostile)):
        assert labelsets(scraped, "planewatch_vf_attachment_refused", pod=f"e{i}") == [dict(
            namespace="evil", pod=f"e{i}", network="evil/sriov", interface="net1", plane="data",
            field="pci-address", reason="invalid_format")]
        assert not labelsets(scraped, "planewatch_vf_info", pod=f"e{i}")
    # a bad pf-pci-address is refused; the VF itself is still placed by its physfn link
    assert labelsets(scraped, "planewatch_vf_attachment_refused", pod="hint")[0]["field"] == "pf-pci-address"
    assert labelsets(scraped, "planewatch_vf_info", pod="hint")[0]["pf"] == "ens1f0"
    assert_intact(scraped, tree, {i: f"p{i}" for i in range(5) if i != 1})   # the sysfs VFs (netlink fake is empty)


def test_fifo_char_device_huge_file_and_symlink_out(root, tree, tmp_path):
    sysroot = tree["sysfs"]
    outside = tmp_path / "outside"
    outside.mkdir()
    # FIFO in place of one Intel counter: open(O_RDONLY) without O_NONBLOCK never returns
    fifo = stats_file(sysroot, INTEL_PF, 0, "rx_packets")
    os.remove(fifo)
    os.mkfifo(fifo)
    # /dev/zero's own device numbers in place of the Mellanox stats file: a read never ends
    chardev = stats_file(sysroot, MLX_PF, 0)
    os.remove(chardev)
    os.mknod(chardev, 0o444 | 0o020000, os.makedev(1, 5))
    # a 1 GiB (sparse) counter file: read whole, it is a MemoryError
    huge = stats_file(sysroot, INTEL_PF, 2, "tx_bytes")
    with open(huge, "r+b") as f:
        f.truncate(1 << 30)
    # a counter that is a symlink out of the device tree, to /dev/zero
    out_link = stats_file(sysroot, INTEL_PF, 1, "rx_dropped")
    os.remove(out_link)
    os.symlink("/dev/zero", out_link)
    # a "device" whose bus/pci/devices link leads out of the tree, into files the tenant wrote
    (outside / "physfn").symlink_to(os.path.realpath(sriov.pci_dir(sysroot, INTEL_PF)))
    os.symlink(str(outside), os.path.join(sysroot, "bus/pci/devices/0000:3b:0f.0"))
    snap = Snapshot(one_pod_per_vf(tree["vfs"]).pods + (attacker("out", "0000:3b:0f.0"),))
    text, elapsed = scrape_text(sysroot, snap)
    scraped = parse(text)
    got = {(d["pod"], d["file"]): d["reason"] for d in labelsets(scraped, "planewatch_vf_read_errors_total")}
    assert got == {("p0", "stats/rx_packets"): "not_regular_file", ("p3", "stats"): "not_regular_file",
                   ("p2", "stats/tx_bytes"): "too_large", ("p1", "stats/rx_dropped"): "outside_device_tree"}
    assert labelsets(scraped, "planewatch_vf_attachment_refused", pod="out")[0]["reason"] == "outside_device_tree"
    assert not labelsets(scraped, "planewatch_vf_info", pod="out")
    # everyone keeps what did not fail
    assert values(scraped, "planewatch_vf_receive_bytes_total", pod="p0") == [
        tree["vfs"][0]["metrics"]["planewatch_vf_receive_bytes_total"]]
    assert values(scraped, "planewatch_vf_receive_bytes_total", pod="p2") == [
        tree["vfs"][2]["metrics"]["planewatch_vf_receive_bytes_total"]]
    assert_intact(scraped, tree, {4: "p4"})
    print(f"\nscrape with FIFO, char device, 1 GiB file and symlinks out: {elapsed * 1e3:.1f} ms")

# ---------------------------------------------------------------- the same attacks over HTTP


def _pod_doc(name: str, namespace: str, index: int, device_info: dict) -> dict:
    import json
    status = [{"name": "k8s-pod-network", "ips": [f"10.98.0.{index}"], "mac": f"0e:98:00:00:00:{index:02x}",
               "default": True, "dns": {}},
              {"name": f"{namespace}/sriov-a", "interface": "net1", "dns": {}, "device-info": device_info}]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": f"6a1c1d9e-0000-4000-8000-{index:012d}",
                         "annotations": {"k8s.v1.cni.cncf.io/network-status": json.dumps(status)}},
            "spec": {"nodeName": "hostile-node"}, "status": {"phase": "Running"}}


def test_metrics_over_http_stays_prompt_under_every_attack(root, tree, tmp_path):
    """The shipped server, its sysfs root full of traps and tenants pointing at them."""
    import yaml

    from tests.conftest import Collector
    sysroot = tree["sysfs"]
    fifo = stats_file(sysroot, INTEL_PF, 0, "rx_packets")
    os.remove(fifo)
    os.mkfifo(fifo)
    chardev = stats_file(sysroot, MLX_PF, 0)
    os.remove(chardev)
    os.mknod(chardev, 0o444 | 0o020000, os.makedev(1, 5))
    with open(stats_file(sysroot, INTEL_PF, 2, "tx_bytes"), "r+b") as f:
        f.truncate(1 << 30)
    docs = [_pod_doc(f"honest-{i}", "tenant", i, {"type": "pci", "version": "1.1.0",
                                                   "pci": {"pci-address": vf["pci_address"]}})
            for i, vf in enumerate(tree["vfs"][:5])]
    hostile = ["../../../../../../dev/zero", "0000:3b:02.0/../../../../../../proc/1/root/etc/shadow",
               "../../../../../../proc/self/root/tmp/fifo"]
    docs += [_pod_doc(f"evil-{i}", "evil", 50 + i, {"type": "pci", "version": "1.1.0",
                                                     "pci": {"pci-address": value, "rdma-device": value}})
             for i, value in enumerate(hostile)]
    pods = tmp_path / "pods.yaml"
    pods.write_text(yaml.safe_dump_all(docs))
    c = Collector("--pods-file", str(pods), "--node-name", "hostile-node", "--path.sysfs", sysroot,
                  "--no-collector.ebpf")
    try:
        c.wait_ready()
        start = time.perf_counter()
        text = c.metrics()
        elapsed = time.perf_counter() - start
        assert c.get("/healthz", timeout=5)[0] == 200
    finally:
        c.stop()
    print(f"\n/metrics with traps under sysfs and 3 hostile pods: {elapsed * 1e3:.0f} ms")
    scraped = parse(text)
    got = {(d["pod"], d["file"]): d["reason"] for d in labelsets(scraped, "planewatch_vf_read_errors_total")}
    assert got == {("honest-0", "stats/rx_packets"): "not_regular_file", ("honest-3", "stats"): "not_regular_file",
                   ("honest-2", "stats/tx_bytes"): "too_large"}
    for i in range(len(hostile)):
        assert labelsets(scraped, "planewatch_vf_attachment_refused", pod=f"evil-{i}")[0]["reason"] == "invalid_format"
        assert labelsets(scraped, "planewatch_rdma_attachment_refused", pod=f"evil-{i}")
    assert values(scraped, "planewatch_vf_receive_bytes_total", pod="honest-0") == [
        tree["vfs"][0]["metrics"]["planewatch_vf_receive_bytes_total"]]
    for i in (1, 4):
        for metric, value in tree["vfs"][i]["metrics"].items():
            assert values(scraped, metric, pod=f"honest-{i}") == [value], (i, metric)
    success = {d["collector"]: v for d, v in ((dict(k), v) for k, v in
                                               scraped["planewatch_scrape_collector_success"].items())}
    assert success["sriov"] == 1 and success["rdma"] == 1
