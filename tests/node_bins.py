"""The binaries of the real node (tests/node.py): Kubernetes v1.20.2 daemons built
once from Debian bookworm's `kubernetes` source into the same cache as
tests/kubeapi.py, and the runtime pieces Debian ships (containerd, runc, CNI plugins)."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.kubeapi import BUILD_SCRIPT, BUILD_TIMEOUT_SECONDS, build_impossible_reason, cache_dir

KUBE = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "pause")
CNI_DIR = Path("/usr/lib/cni")
# Debian packages the node needs (the Makefile's APT_PACKAGES lists them too).
SYSTEM = {"containerd": "containerd", "ctr": "containerd", "runc": "runc", "socat": "socat",
          "iptables": "iptables", "conntrack": "conntrack", "buildah": "buildah",
          "mmdebstrap": "mmdebstrap", "busybox": "busybox-static"}
CNI_PLUGINS = ("bridge", "macvlan", "host-local", "loopback")


def is_static(path: Path) -> bool:
    """An ELF executable with no program interpreter (ld.so): runs in an empty image."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return data[:4] == b"\x7fELF" and b"/ld-linux" not in data and b"ld-musl" not in data


def missing_system_tools() -> list[str]:
    """Debian packages whose commands are absent (busybox must be the static one)."""
    missing = {pkg for cmd, pkg in SYSTEM.items() if not shutil.which(cmd)}
    if not is_static(Path("/bin/busybox")):
        missing.add("busybox-static")
    if any(not os.access(CNI_DIR / p, os.X_OK) for p in CNI_PLUGINS):
        missing.add("containernetworking-plugins")
    return sorted(missing)


def node_unavailable() -> str | None:
    """None when a node can be brought up here, else why not."""
    if os.geteuid() != 0:
        return "a real node needs root"
    if missing := missing_system_tools():
        return "Debian packages missing (make apt installs them): " + " ".join(missing)
    if all(os.access(cache_dir() / "bin" / b, os.X_OK) for b in (*KUBE, "etcd")):
        return None
    if reason := build_impossible_reason():
        return f"node binaries absent from {cache_dir()}/bin and {reason}"
    return None


def kube_binaries() -> dict[str, str]:
    """name -> path of every Kubernetes binary and etcd, building what is missing (once,
    under the same lock as tests/kubeapi.py, so concurrent runs wait for one build)."""
    out = cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = {b: out / "bin" / b for b in (*KUBE, "etcd")}
    if not all(os.access(p, os.X_OK) for p in paths.values()):
        if reason := build_impossible_reason():
            raise RuntimeError(f"node binaries missing in {out}/bin and {reason}")
        with open(out / "build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not all(os.access(p, os.X_OK) for p in paths.values()):
                _build(out)
    absent = [b for b, p in paths.items() if not os.access(p, os.X_OK)]
    if absent:
        raise RuntimeError(f"build finished but {out}/bin lacks {' '.join(absent)}")
    return {b: str(p) for b, p in paths.items()}


def _build(out: Path) -> None:
    log = out / "build-node.log"
    print(f"planewatch: building {' '.join(KUBE)} v1.20.2 into {out}/bin (minutes, once; "
          f"log {log})", file=sys.stderr, flush=True)
    with open(log, "w") as sink:
        proc = subprocess.Popen([str(BUILD_SCRIPT), str(out), *KUBE], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sink.write(line)
            sink.flush()
            if line.startswith("[build-kube-apiserver"):
                print(line.rstrip(), file=sys.stderr, flush=True)
        if proc.wait(timeout=BUILD_TIMEOUT_SECONDS) != 0:
            raise RuntimeError(f"node binaries build failed (exit {proc.returncode}), see {log}")


if __name__ == "__main__":
    # `make test` runs this first: one build of every binary from one Go build cache,
    # rather than kube-apiserver for tests/kubeapi.py and the rest again from cold.
    if (reason := build_impossible_reason()) and not all(
            os.access(cache_dir() / "bin" / b, os.X_OK) for b in (*KUBE, "etcd")):
        print(f"planewatch: not building the node's binaries: {reason}", file=sys.stderr)
        sys.exit(0)
    for name, path in kube_binaries().items():
        print(name, path)
