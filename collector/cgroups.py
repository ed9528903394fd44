"""Pod UID → process → network namespace, through /proc/<pid>/cgroup.

For runtimes that do not pin namespaces under /run/netns. The kubelet names a
pod's cgroup after its UID, with dashes in the cgroupfs driver and underscores
in the systemd driver:

  v1 cgroupfs: 11:memory:/kubepods/burstable/pod0b9e...-...-.../<container>
  v1 systemd:  4:pids:/kubepods.slice/kubepods-besteffort.slice/
                 kubepods-besteffort-pod0b9e..._..._....slice/cri-containerd-<id>.scope
  v2 systemd:  0::/kubepods.slice/kubepods-burstable.slice/
                 kubepods-burstable-pod<uid_with_underscores>.slice/crio-<id>.scope
  v2 cgroupfs: 0::/kubepods/pod<uid>/<container>

Inside a private cgroup namespace (the collector's own container, cgroupfs
driver), other pods' paths read relative to ours: 0::/../../pod<uid>/<container>,
with no "kubepods" left in them; those are accepted too.

Parsing is a pure function; the scan only reads files under the procfs root.
"""
from __future__ import annotations

import logging
import os
import re

log = logging.getLogger(__name__)

# "pod" + a UID (8-4-4-4-12 hex, dashes or underscores), as a path element or
# inside a systemd slice name.
_POD_UID = re.compile(
    r"(?:^|[/-])pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?(?:/|$)")


def pod_uid_from_cgroup(text: str) -> str:
    """The pod UID a /proc/<pid>/cgroup file names, "" when it is no pod's."""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not ("kubepods" in parts[2] or parts[2].startswith("/..")):
            continue
        match = _POD_UID.search(parts[2])
        if match:
            return match.group(1).replace("_", "-")
    return ""


def scan_pod_netns(procfs: str, wanted: set[str]) -> dict[str, str]:
    """Map each wanted pod UID to a `<procfs>/<pid>/ns/net` path of one of its processes.

    The first process found wins: every container of a pod shares its netns.
    Processes that exit during the scan are skipped.
    """
    found: dict[str, str] = {}
    if not wanted:
        return found
    try:
        entries = os.scandir(procfs)
    except OSError as err:
        log.debug("cannot list %s: %s", procfs, err)
        return found
    with entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(os.path.join(entry.path, "cgroup"), encoding="utf-8", errors="replace") as f:
                    uid = pod_uid_from_cgroup(f.read())
            except OSError:
                continue
            if uid in wanted and uid not in found:
                found[uid] = os.path.join(entry.path, "ns", "net")
                if len(found) == len(wanted):
                    break
    return found


def scan_pod_processes(procfs: str) -> tuple[dict[str, str], dict[int, set[str]]]:
    """(pod UID -> `<procfs>/<pid>/ns/net` of one of its processes,
        netns inode -> the pod UIDs whose processes live in it).

    The second map is what a tenant cannot forge: the kubelet puts a pod's
    processes in the cgroup named after its UID, so a namespace holding them is
    that pod's, whatever any annotation claims (collector/netns.py). Costs one
    read per process and one stat per pod process; processes that exit meanwhile
    are skipped.
    """
    paths: dict[str, str] = {}
    owners: dict[int, set[str]] = {}
    try:
        entries = os.scandir(procfs)
    except OSError as err:
        log.debug("cannot list %s: %s", procfs, err)
        return paths, owners
    with entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(os.path.join(entry.path, "cgroup"), encoding="utf-8", errors="replace") as f:
                    uid = pod_uid_from_cgroup(f.read())
                if not uid:
                    continue
                path = os.path.join(entry.path, "ns", "net")
                inode = os.stat(path).st_ino
            except OSError:
                continue
            paths.setdefault(uid, path)
            owners.setdefault(inode, set()).add(uid)
    return paths, owners
