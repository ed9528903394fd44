"""RDMA/InfiniBand port counters: the mlx5/ib_core sysfs layout in the fixture tree, to /metrics."""
from __future__ import annotations

import errno
import os
import shutil
import threading
import time

import pytest

from collector.model import DeviceInfo
from collector.registry import Config, Paths, Snapshot
from collector.sources import rdma
from collector.sysfs_safe import Sysfs
from lab import rdma_fixture, sriov_fixture
from tests.test_sriov import FIXTURE, pod_view, scrape, series
from tests.test_sriov_hostile import failing_read, labelsets

VF = "0000:5e:00.2"
LABELS = dict(namespace="hpc", network="hpc/ib-storage", interface="net1", plane="storage")


@pytest.fixture(scope="module")
def ib(tmp_path_factory):
    tree = sriov_fixture.write_tree(str(tmp_path_factory.mktemp("ib") / "sysfs"), sriov_fixture.TEST_LAYOUT)
    return next(vf["rdma"] for vf in tree["vfs"] if vf["pci_address"] == VF)


@pytest.fixture
def sysfs_copy(tmp_path):
    dst = tmp_path / "sysfs"
    shutil.copytree(FIXTURE, dst, symlinks=True)
    return str(dst)


def pod(name: str, rdma_device: str = "", address: str = "", pf: str = ""):
    view = pod_view("hpc", name, ("hpc/ib-storage", "net1", DeviceInfo(
        type="pci", version="1.1.0", pci_address=address, pf_pci_address=pf, rdma_device=rdma_device), True))
    att = view.interfaces[0].attachment
    att = att.__class__(**{**att.__dict__, "plane": "storage"})
    return view.__class__(view.pod, interfaces=(view.interfaces[0].__class__(att, view.interfaces[0].link),))


def source(root: str, fs: Sysfs | None = None) -> rdma.RdmaSource:
    return rdma.RdmaSource(Config(paths=Paths(sysfs=root)), sysfs=fs)


def test_fixture_is_laid_out_as_ib_core_does():
    dev = os.path.join(FIXTURE, "class/infiniband/mlx5_2")
    assert os.path.islink(dev)
    assert os.path.realpath(dev) == os.path.realpath(os.path.join(FIXTURE, "bus/pci/devices", VF, "infiniband/mlx5_2"))
    assert os.path.basename(os.readlink(os.path.join(dev, "device"))) == VF
    port = os.path.join(dev, "ports/1")
    assert open(os.path.join(port, "state")).read() == "4: ACTIVE\n"
    assert set(os.listdir(os.path.join(port, "counters"))) == set(rdma_fixture.PMA_COUNTERS)
    assert set(rdma.PORT_COUNTERS) == set(rdma_fixture.PMA_COUNTERS)     # every PMA counter has a metric


@pytest.mark.parametrize("claim", ["rdma-device and pci-address", "pci-address only", "rdma-device only"])
def test_every_port_value_reaches_metrics(ib, claim):
    kwargs = {"rdma-device and pci-address": dict(rdma_device="mlx5_2", address=VF),
              "pci-address only": dict(address=VF),      # the VF's own infiniband/ directory
              "rdma-device only": dict(rdma_device="mlx5_2")}[claim]
    scraped = scrape(source(FIXTURE), Snapshot((pod("trainer", **kwargs),)))
    want = dict(LABELS, pod="trainer", port="1")
    assert labelsets(scraped, "planewatch_rdma_port_info", pod="trainer") == [
        dict(want, device="mlx5_2", pci_address=VF, link_layer="InfiniBand")]
    port = ib["ports"][1]
    for name, value in port["counters"].items():
        metric, mult, _ = rdma.PORT_COUNTERS[name]
        assert series(scraped, f"planewatch_rdma_port_{metric}_total", **want) == [value * mult], name
    # the data counters are PMA 4-octet units: bytes on /metrics
    assert series(scraped, "planewatch_rdma_port_receive_bytes_total", **want) == [4 * port["counters"]["port_rcv_data"]]
    for name, value in port["hw_counters"].items():
        assert series(scraped, "planewatch_rdma_port_hw_events_total", stat=name, **want) == [value]
    assert not series(scraped, "planewatch_rdma_port_hw_events_total", stat="lifespan")
    assert series(scraped, "planewatch_rdma_port_state_id", **want) == [4]
    assert series(scraped, "planewatch_rdma_port_physical_state_id", **want) == [5]
    assert series(scraped, "planewatch_rdma_port_rate_bytes_per_second", **want) == [100e9 / 8]


@pytest.mark.parametrize("text, state, rate", [
    ("4: ACTIVE", 4, None), ("1: DOWN", 1, None), ("", None, None), ("ACTIVE", None, None),
    ("100 Gb/sec (4X EDR)", None, 12.5e9), ("2.5 Gb/sec (1X SDR)", None, 2.5e9 / 8),
    ("400 Gb/sec (4X NDR)", None, 50e9), ("53.125 Gb/sec (1X HDR)", None, 53.125e9 / 8),
])
def test_state_and_rate_text(text, state, rate):
    assert rdma.parse_state(text) == state
    assert rdma.parse_rate(text) == rate


def test_plain_pci_attachment_without_rdma_has_no_series():
    assert scrape(source(FIXTURE), Snapshot((pod("eth", address="0000:3b:02.0"),))) == {}


def test_claims_that_are_not_the_attachments_are_refused():
    snap = Snapshot((pod("honest", rdma_device="mlx5_2", address=VF),
                     pod("thief", rdma_device="mlx5_2", address="0000:3b:02.0"),     # someone else's device
                     pod("dots", rdma_device="../../../../dev/zero"),
                     pod("badpci", rdma_device="mlx5_2", address="../0000:5e:00.2"),
                     pod("ghost", rdma_device="mlx5_99")))                             # not there: no series
    scraped = scrape(source(FIXTURE), snap)
    refused = {(d["pod"], d["field"], d["reason"]) for d in labelsets(scraped, "planewatch_rdma_attachment_refused")}
    assert refused == {("thief", "rdma-device", "not_the_attachments_device"),
                       ("dots", "rdma-device", "invalid_format"),
                       ("badpci", "pci-address", "invalid_format")}
    assert {d["pod"] for d in labelsets(scraped, "planewatch_rdma_port_info")} == {"honest"}


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EOPNOTSUPP, errno.EIO])
def test_a_failing_counter_costs_that_counter(ib, code, sysfs_copy):
    port_dir = os.path.realpath(os.path.join(sysfs_copy, "class/infiniband/mlx5_2/ports/1"))
    fs = Sysfs(sysfs_copy, read_fn=failing_read({os.path.join(port_dir, "counters/port_xmit_wait"): code,
                                                 os.path.join(port_dir, "hw_counters/out_of_sequence"): code}))
    src = source(sysfs_copy, fs)
    snap = Snapshot((pod("p", address=VF),))
    for _ in range(2):
        scraped = scrape(src, snap)
    name = "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode[code]
    errors = {(d["file"], d["reason"]): series(scraped, "planewatch_rdma_read_errors_total", **d)[0]
              for d in labelsets(scraped, "planewatch_rdma_read_errors_total")}
    assert errors == {("counters/port_xmit_wait", name): 2, ("hw_counters/out_of_sequence", name): 2}
    assert not series(scraped, "planewatch_rdma_port_transmit_wait_ticks_total", pod="p")
    assert not series(scraped, "planewatch_rdma_port_hw_events_total", stat="out_of_sequence")
    assert series(scraped, "planewatch_rdma_port_transmit_bytes_total", pod="p") == [
        4 * ib["ports"][1]["counters"]["port_xmit_data"]]


def test_fifo_and_symlink_out_of_the_tree(root, sysfs_copy, tmp_path, ib):
    port = os.path.join(sysfs_copy, "class/infiniband/mlx5_2/ports/1")
    os.remove(os.path.join(port, "counters/link_downed"))
    os.mkfifo(os.path.join(port, "counters/link_downed"))
    os.remove(os.path.join(port, "rate"))
    os.symlink("/dev/zero", os.path.join(port, "rate"))
    (tmp_path / "evil").mkdir()
    os.symlink(str(tmp_path / "evil"), os.path.join(sysfs_copy, "class/infiniband/evil0"))
    snap = Snapshot((pod("p", address=VF), pod("e", rdma_device="evil0")))
    out = {}
    t = threading.Thread(target=lambda: out.update(s=scrape(source(sysfs_copy), snap), t=time.perf_counter()),
                         daemon=True)
    start = time.perf_counter()
    t.start()
    t.join(10)
    assert not t.is_alive(), "a read blocked"
    scraped = out["s"]
    assert out["t"] - start < 1.0
    reasons = {d["file"]: d["reason"] for d in labelsets(scraped, "planewatch_rdma_read_errors_total")}
    assert reasons == {"counters/link_downed": "not_regular_file", "rate": "outside_device_tree"}
    assert labelsets(scraped, "planewatch_rdma_attachment_refused", pod="e")[0]["reason"] == "outside_device_tree"
    assert series(scraped, "planewatch_rdma_port_symbol_errors_total", pod="p") == [
        ib["ports"][1]["counters"]["symbol_error"]]
