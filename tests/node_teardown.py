"""Stopping the real node (tests/node.py) and removing what it left on the host:
processes by recorded PID, mounts under its directory, the cni-* namespaces its
sandboxes used, its links and cgroups, the sysctls kubelet rewrote."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

# kubelet's setupKernelTunables (pkg/kubelet/cm) rewrites these (recipe trap 2).
SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
           "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")


def save_sysctls(base: Path) -> dict[str, str]:
    """The host's values before any node of ours ran. Sysctls are the machine's, shared
    by every mount namespace and chroot, so a node that starts while another runs (its
    kubelet has rewritten them) takes that node's record: base/sysctls.json here, or
    the one a running node of this harness keeps in another root (found through its
    kubelet's /proc/<pid>/root). The record is kept until the last node goes down."""
    shared = base / "sysctls.json"
    if shared.exists():
        return json.loads(shared.read_text())
    out = None
    for other_base in harness_kubelets().values():
        try:
            out = json.loads((other_base / "sysctls.json").read_text())
            break
        except (OSError, ValueError):
            continue
    out = out or _read_sysctls()
    base.mkdir(parents=True, exist_ok=True)
    shared.write_text(json.dumps(out))
    return out


def harness_kubelets(exclude: frozenset[int] = frozenset()) -> dict[int, Path]:
    """pid -> node base directory (reached through the process's own root) of every
    kubelet of this harness on the machine, whatever its mount namespace or chroot:
    /proc shows them all, and their --root-dir is BASE/NAME/kubelet."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv[0].endswith(b"/kubelet") or starttime(int(entry.name)) is None:
            continue
        for arg in argv:
            if arg.startswith(b"--root-dir="):
                root_dir = Path(arg.split(b"=", 1)[1].decode(errors="replace"))
                out[int(entry.name)] = entry / "root" / root_dir.parent.parent.relative_to("/")
    return out


def other_nodes(node) -> list[str]:
    """Nodes of this harness other than `node` still up on the machine: in the same
    base directory (their state.json) or in any other root (their kubelet)."""
    found = [str(p.parent) for p in node.dir.parent.glob("*/state.json") if p.parent != node.dir]
    ours = node.state.get("pids", {}).get("kubelet", {}).get("pid")
    found += [f"kubelet pid {pid} ({base})" for pid, base in
              harness_kubelets(frozenset({ours} if ours else ())).items()
              if f"{base}/{node.name}" != f"/proc/{pid}/root{node.dir}"]
    return found


def restore_if_last(node) -> None:
    """Put the sysctls kubelet rewrote back unless another node of ours still runs (the
    last one does it). Called before our kubelet stops, so that a node starting in the
    meantime still finds our record through it."""
    if not other_nodes(node):
        restore_sysctls(node.state.get("sysctls", {}))


def _read_sysctls() -> dict[str, str]:
    out = {}
    for key in SYSCTLS:
        try:
            out[key] = Path("/proc/sys", key).read_text().strip()
        except OSError:
            pass
    return out


def restore_sysctls(saved: dict[str, str]) -> None:
    for key, value in saved.items():
        path = Path("/proc/sys", key)
        if path.read_text().strip() != value:
            path.write_text(value + "\n")


def cgroup_roots() -> list[str]:
    """Mount points of every cgroup hierarchy (v1 controllers, named, unified)."""
    roots = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] in ("cgroup", "cgroup2"):
            roots.append(left.split()[4])
    return roots


def starttime(pid: int) -> int | None:
    """The process's start time (against PID reuse); None once it has exited, including
    as a zombie its parent has not reaped yet (the test process is the daemons' parent)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def kill_recorded(pids: dict, names: list[str], grace: float = 5.0) -> None:
    """SIGTERM each recorded daemon that is still the process we started (same start
    time), then SIGKILL what outlives the grace period (the node's state is thrown
    away: nothing to flush); its process group too (socat forks per connection)."""
    live = {}
    for name in names:
        rec = pids.get(name)
        if rec and starttime(rec["pid"]) == rec["start"]:
            # kube-apiserver waits ~60 s on open watches after SIGTERM; etcd keeps nothing we need.
            sig = signal.SIGKILL if name == "kube-apiserver" else signal.SIGTERM
            try:
                os.killpg(rec["pid"], sig)
            except ProcessLookupError:
                pass
            live[name] = rec
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        live = {n: r for n, r in live.items() if starttime(r["pid"]) == r["start"]}
        time.sleep(0.1)
    for rec in live.values():
        try:
            os.killpg(rec["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def _pids_in_cgroups(paths: list[Path]) -> set[int]:
    pids = set()
    for top in paths:
        for procs in top.rglob("cgroup.procs") if top.exists() else ():
            try:
                pids.update(int(p) for p in procs.read_text().split())
            except OSError:
                pass
    return pids


def _shims_of(sock: str) -> set[int]:
    """containerd-shim processes serving our containerd (their argv names its socket)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and b"containerd-shim" in argv[0] and sock.encode() in argv:
                out.add(int(entry.name))
    return out


def _mounts_under(prefixes: list[str]) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes):
            found.append(point)
    return sorted(set(found), key=len, reverse=True)


def teardown_host(node) -> None:
    state, d = node.state, str(node.dir)
    cg = [Path(root) / node.name for root in cgroup_roots()]
    # Whatever a container left running, and shims of our containerd.
    for _ in range(3):
        pids = _pids_in_cgroups(cg) | _shims_of(str(node.dir / "containerd.sock"))
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    # kubelet's volume tmpfs, containerd's rootfs overlays, our netns pins.
    netns = node.used_netns() if (node.dir / "cni").exists() else []
    for point in _mounts_under([d, *netns]):
        subprocess.run(["umount", "-l", point], capture_output=True)
    for ns in netns:
        try:
            os.unlink(ns)
        except OSError:
            pass
    for link in state.get("links", []):
        subprocess.run(["ip", "link", "del", link], capture_output=True)
    for top in cg:
        if top.exists():
            for sub in sorted((p for p in top.rglob("*") if p.is_dir()),
                              key=lambda p: len(p.parts), reverse=True):
                try:
                    sub.rmdir()
                except OSError:
                    pass
            try:
                top.rmdir()
            except OSError:
                pass
    if state.get("made_netns_mount") and not os.listdir("/run/netns"):
        subprocess.run(["umount", "/run/netns"], capture_output=True)
    restore_if_last(node)                # again: a killed run's leftover never got there
    if not [p for p in node.dir.parent.glob("*/state.json") if p.parent != node.dir]:
        (node.dir.parent / "sysctls.json").unlink(missing_ok=True)
    _remove_pod_logs(state.get("pod_uids", []))
    for path, existed in state.get("preexisting", {}).items():
        if not existed and os.path.isdir(path):
            _remove_empty_tree(Path(path))


def _remove_pod_logs(uids: list[str]) -> None:
    pods = Path("/var/log/pods")
    removed = []
    for uid in uids:
        for p in pods.glob(f"*_{uid}") if pods.exists() else ():
            removed.append(str(p))
            shutil.rmtree(p, ignore_errors=True)
    containers = Path("/var/log/containers")
    for link in containers.iterdir() if containers.exists() else ():
        if link.is_symlink() and any(os.readlink(link).startswith(r + "/") for r in removed):
            link.unlink()


def _remove_empty_tree(top: Path) -> None:
    for sub in sorted((p for p in top.rglob("*") if p.is_dir() and not p.is_symlink()),
                      key=lambda p: len(p.parts), reverse=True):
        try:
            sub.rmdir()
        except OSError:
            pass
    try:
        top.rmdir()
    except OSError:
        pass


def propagation() -> dict[str, str]:
    """mount point -> shared / slave / private (peer group numbers left out)."""
    out = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ")[0].split()
        tags = {t.split(":")[0] for t in fields[6:]}
        out[fields[4]] = ("shared" if "shared" in tags else "slave" if "master" in tags
                          else "private")
    return out


def snapshot(node) -> dict:
    """What residue() needs of a node, taken before down() forgets its state."""
    return {"name": node.name, "dir": str(node.dir), "links": list(node.state.get("links", [])),
            "netns": node.used_netns() if (node.dir / "cni").exists() else [],
            "pids": dict(node.state.get("pids", {})),
            "sysctls": dict(node.state.get("sysctls", {})),
            "preexisting": dict(node.state.get("preexisting", {})),
            "propagation": dict(node.state.get("propagation", {}))}


def residue(snap: dict, other_nodes: bool = False) -> list[str]:
    """Everything of the node still on the host after down(): its processes (recorded
    daemons, shims, anything in its cgroups or naming its directory), mounts under its
    directory or on its netns pins, the pins, its links, cgroup directories, the
    directory itself, and sysctls not back to the host's values (only checked when no
    other node runs: they are put back by the last one)."""
    left = []
    for name, rec in snap["pids"].items():
        if starttime(rec["pid"]) == rec["start"]:
            left.append(f"process {name} (pid {rec['pid']})")
    cg = [Path(root) / snap["name"] for root in cgroup_roots()]
    for pid in _pids_in_cgroups(cg) | _shims_of(snap["dir"] + "/containerd.sock"):
        left.append(f"process {pid} in the node's cgroups or a shim of its containerd")
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                argv = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if snap["dir"].encode() + b"/" in argv:
                cmd = argv.replace(b"\0", b" ").decode(errors="replace")[:120]
                left.append(f"process {entry.name}: {cmd}")
    left += [f"mount {m}" for m in _mounts_under([snap["dir"], *snap["netns"]])]
    # The node makes /run/netns shared (as `ip netns add` does); nothing else may change.
    now = propagation()
    left += [f"mount {m} is {now[m]}, was {kind}" for m, kind in snap["propagation"].items()
             if m in now and now[m] != kind and m != "/run/netns"]
    left += [f"netns pin {n}" for n in snap["netns"] if os.path.lexists(n)]
    links = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True).stdout
    names = {l["ifname"] for l in json.loads(links or "[]")}
    left += [f"link {l}" for l in snap["links"] if l in names]
    left += [f"cgroup {c}" for c in cg if c.exists()]
    if os.path.exists(snap["dir"]):
        left.append(f"directory {snap['dir']}")
    for path, existed in snap["preexisting"].items():
        if not existed and os.path.exists(path) and not any(Path(path).rglob("*")):
            left.append(f"empty directory {path} (absent before the node)")
    if not other_nodes:
        now = _read_sysctls()
        left += [f"sysctl {k} = {now.get(k)} (was {v})" for k, v in snap["sysctls"].items()
                 if now.get(k) != v]
    return left
