"""Cost of the SR-IOV source's collect on a fixture sysfs tree (issue 14.9: the
figures tests/test_sriov.py and tests/test_sriov_hostile.py used to assert).

Builds a tree of two PFs with `--vfs` VFs in all (lab/sriov_fixture.py), one pod
per VF, and times:
- the first (cold) collect and the median of `--rounds` warm ones;
- the same tree with traps in three VFs' stats directories (a FIFO, a 1 GiB
  sparse file, a symlink out of sysfs): the reference is the clean tree's warm
  median, and the ratio says what the traps cost (they must be refused, not read).
Root-free: `.venv/bin/python bench/sriov_collect.py [--vfs 64] [--rounds 20]`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
import time

from collector import sriov
from collector.model import Attachment, DeviceInfo, InterfaceView, Link, Pod, PodView
from collector.registry import Config, Paths, Snapshot
from lab import sriov_fixture


def layout(vfs: int):
    half = vfs // 2
    iavf = tuple(sriov_fixture.VfSpec(f"0000:3b:{2 + i // 8:02x}.{i % 8}", "iavf", seed=i + 1) for i in range(half))
    mlx = tuple(sriov_fixture.VfSpec(f"0000:5e:{1 + i // 8:02x}.{i % 8}", "mlx5_core", seed=i + 500)
                for i in range(vfs - half))
    first, second = sriov_fixture.TEST_LAYOUT[:2]
    return (dataclasses.replace(first, vfs=iavf), dataclasses.replace(second, vfs=mlx))


def snapshot(vfs) -> Snapshot:
    pods = []
    for i, vf in enumerate(vfs):
        dpdk = vf["driver"] == "vfio-pci"
        att = Attachment("tenant", f"p{i}", f"uid-p{i}", "tenant/sriov-a", "" if dpdk else "net1",
                         device=DeviceInfo(type="pci", version="1.1.0", pci_address=vf["pci_address"]),
                         plane="data")
        view = InterfaceView(att, None if dpdk else Link(10, "net1"))
        pods.append(PodView(Pod("tenant", f"p{i}", f"uid-p{i}", attachments=(att,)), interfaces=(view,)))
    return Snapshot(tuple(pods))


def timed(source, snap, rounds: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    families = source.collect(snap)
    cold = time.perf_counter() - start
    warm = []
    for _ in range(rounds):
        start = time.perf_counter()
        source.collect(snap)
        warm.append(time.perf_counter() - start)
    return cold, statistics.median(warm), sum(len(f) for f in families)


def set_traps(sysfs: str, vfs, outside: str) -> int:
    """Replace one counter file of three VFs by a FIFO, a 1 GiB sparse file, a symlink out."""
    made = 0
    for vf, kind in zip(vfs[:3], ("fifo", "huge", "symlink")):
        path = os.path.join(sriov.stats_path(sysfs, vf["pf_pci_address"], vf["vf"]), "rx_packets")
        if not os.path.lexists(path):
            continue
        os.unlink(path)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "huge":
            with open(path, "wb") as f:
                f.truncate(1 << 30)
        else:
            os.symlink(outside, path)
        made += 1
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vfs", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pw-bench-sriov-")
    try:
        tree = sriov_fixture.write_tree(os.path.join(work, "sys"), layout(args.vfs))
        snap = snapshot(tree["vfs"])
        # host_netns "": the PFs are looked up in our own netns (none there: sysfs counters only)
        make = lambda: sriov.SriovSource(Config(paths=Paths(sysfs=tree["sysfs"]),  # noqa: E731
                                                options={"host_netns": ""}))
        cold, warm, series = timed(make(), snap, args.rounds)
        print(f"{len(tree['vfs'])} VFs, {series} series: cold collect {cold * 1e3:.2f} ms, "
              f"warm median {warm * 1e3:.2f} ms (cold/warm {cold / warm:.1f}x)")
        outside = os.path.join(work, "outside")
        with open(outside, "w") as f:
            f.write("12345\n")
        traps = set_traps(tree["sysfs"], tree["vfs"], outside)
        assert traps == 3, f"only {traps} traps set: the fixture layout changed"
        t_cold, t_warm, t_series = timed(make(), snap, args.rounds)
        print(f"with a FIFO, a 1 GiB file and a symlink out in three VFs: cold {t_cold * 1e3:.2f} ms, "
              f"warm median {t_warm * 1e3:.2f} ms ({t_warm / warm:.2f}x the clean tree), {t_series} series")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
