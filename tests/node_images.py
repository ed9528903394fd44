"""Images for the real node without any registry: one-layer OCI archives written
here (the sandbox `pause`, a busybox-static workload image) and planewatch's own
image built from deploy/Containerfile with buildah on a local mmdebstrap base.
All are loaded with `ctr images import`; pods use imagePullPolicy: Never."""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from tests.kubeapi import cache_dir
from tests.node_config import SANDBOX_IMAGE

BUSYBOX_IMAGE = "localhost/planewatch-test/busybox:1.35"
PLANEWATCH_IMAGE = "localhost/planewatch-test/planewatch:node"
DEBIAN_BASE = "localhost/debian:bookworm-slim"
REPO = Path(__file__).resolve().parent.parent
CONTAINERFILE = REPO / "deploy" / "Containerfile"


def image_inputs() -> list[str]:
    """What deploy/Containerfile COPYs from the context (read from it, so a directory
    added to the image is never missing here): a change to any of them is a new image."""
    out = ["deploy/Containerfile"]
    for line in CONTAINERFILE.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            out += [w.rstrip("/") for w in words[1:-1] if not w.startswith("--")]
    return out


def _blob(blobs: dict[str, bytes], data: bytes, media: str) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"mediaType": media, "digest": digest, "size": len(data)}


def oci_archive(name: str, files: dict[str, tuple[bytes | str, int]], config: dict) -> bytes:
    """An OCI image layout tar with one layer. files: path -> (content, mode);
    content as str is a symlink target."""
    layer_tar = io.BytesIO()
    with tarfile.open(fileobj=layer_tar, mode="w") as tar:
        dirs = sorted({str(Path(p).parent) for p in files} - {"."})
        for dpath in dirs:
            for i in range(1, len(Path(dpath).parts) + 1):
                sub = str(Path(*Path(dpath).parts[:i]))
                if sub not in tar.getnames():
                    info = tarfile.TarInfo(sub)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
        for path, (content, mode) in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.mode = mode
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    raw = layer_tar.getvalue()
    blobs: dict[str, bytes] = {}
    layer = _blob(blobs, gzip.compress(raw, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip")
    conf = _blob(blobs, json.dumps({
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
    }).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = _blob(blobs, json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": conf, "layers": [layer]}).encode(), "application/vnd.oci.image.manifest.v1+json")
    manifest["annotations"] = {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        def add(path, data):
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add("index.json", json.dumps({"schemaVersion": 2, "manifests": [manifest]}).encode())
        for digest, data in blobs.items():
            add("blobs/sha256/" + digest.split(":")[1], data)
    return out.getvalue()


def import_archive(node, data_or_path, base_name: str = "") -> None:
    """ctr import. An OCI ref.name annotation is only a tag by the spec: base_name
    gives the repository (buildah's archives carry no containerd name annotation)."""
    extra = ["--base-name", base_name] if base_name else []
    if isinstance(data_or_path, (bytes, bytearray)):
        node.ctr("images", "import", *extra, "-", input=data_or_path)
    else:
        node.ctr("images", "import", *extra, str(data_or_path))


def import_base_images(node) -> None:
    pause = Path(cache_dir()) / "bin" / "pause"
    import_archive(node, oci_archive(SANDBOX_IMAGE, {"pause": (pause.read_bytes(), 0o755)},
                                     {"Entrypoint": ["/pause"]}))
    busybox = Path("/bin/busybox").read_bytes()
    files: dict[str, tuple[bytes | str, int]] = {"bin/busybox": (busybox, 0o755),
                                                 "tmp/.keep": (b"", 0o644)}
    applets = subprocess.run(["/bin/busybox", "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        if applet != "bin/busybox":
            files.setdefault(applet, ("/bin/busybox", 0o777))
    import_archive(node, oci_archive(BUSYBOX_IMAGE, files, {"Cmd": ["sh"], "Env": [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}))


# ---------------------------------------------------------------- planewatch's image

def inputs_digest() -> str:
    """Hash of every file the Containerfile build reads (git-tracked ones)."""
    out = subprocess.run(["git", "ls-files", "-s", "--", *image_inputs()], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    h = hashlib.sha256()
    for line in sorted(out.splitlines()):
        path = line.split("\t", 1)[1]
        h.update(path.encode() + b"\0")
        p = REPO / path
        h.update(p.read_bytes() if p.is_file() else b"")
    return h.hexdigest()[:16]


def planewatch_image() -> tuple[Path, dict[str, float]]:
    """An OCI archive of deploy/Containerfile's image for the current tree, built once
    per content (cached in ~/.cache/planewatch/images), and the seconds each step took."""
    images = cache_dir().parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    archive = images / f"planewatch-{inputs_digest()}.oci.tar"
    timings: dict[str, float] = {}
    with open(images / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # one build at a time; a waiter finds it done
        if not archive.exists():
            _build(images, archive, timings)
            # The three newest trees' images stay (~120 MB each), older ones go.
            built = sorted(images.glob("planewatch-*.oci.tar"), key=lambda p: p.stat().st_mtime)
            for old in built[:-3]:
                old.unlink()
    return archive, timings


# bookworm's buildah (1.28) puts its RUN steps at nproc 32768 before applying --ulimit,
# so a larger value there is a raise too (measured: "setting RLIMIT_NPROC to 96365
# (was 32768): operation not permitted").
BUILD_NPROC_CEILING = 32768


def _build_ulimits() -> list[str]:
    """--ulimit values no buildah needs CAP_SYS_RESOURCE to set. trixie's buildah (1.39)
    puts root's RUN steps at nproc and nofile 1048576 unless told otherwise, which fails
    with EPERM wherever the hard limits are lower and CAP_SYS_RESOURCE is withheld (this
    project's VMs, many CI containers); bookworm's lowers nproc to 32768 first. So: what
    this process has, never above 32768 processes (more than any build step forks)."""
    out = []
    for name, which in (("nproc", resource.RLIMIT_NPROC), ("nofile", resource.RLIMIT_NOFILE)):
        soft, hard = resource.getrlimit(which)
        if name == "nproc":
            hard = BUILD_NPROC_CEILING if hard == resource.RLIM_INFINITY else \
                min(hard, BUILD_NPROC_CEILING)
        if hard != resource.RLIM_INFINITY:
            soft = hard if soft == resource.RLIM_INFINITY else min(soft, hard)
            out += ["--ulimit", f"{name}={soft}:{hard}"]
    return out


def _build(images: Path, archive: Path, timings: dict[str, float]) -> None:
    storage = images / "buildah"
    b = ["buildah", "--storage-driver", "vfs", "--root", str(storage / "root"),
         "--runroot", str(storage / "run")]
    log = open(images / "build.log", "a")

    def run(*a, **kw):
        start = (images / "build.log").stat().st_size
        if subprocess.run(a, stdout=log, stderr=subprocess.STDOUT, **kw).returncode != 0:
            out = (images / "build.log").read_bytes()[start:].decode(errors="replace")
            raise RuntimeError(f"{' '.join(a)[:400]} failed; the end of its output:\n"
                               + "\n".join(out.splitlines()[-15:]))
    print(f"planewatch: building the image from deploy/Containerfile with buildah (minutes, "
          f"once per source change; log {images}/build.log)", file=sys.stderr, flush=True)
    if subprocess.run([*b, "inspect", "--type", "image", DEBIAN_BASE],
                      capture_output=True).returncode != 0:
        t = time.monotonic()
        base = images / "debian-bookworm-minbase.tar"
        # The base the Containerfile's FROM names, since no registry is reachable.
        # In its own mount namespace: mmdebstrap >= 1.4 (trixie's 1.5) runs
        # `mount --make-rprivate /` in root mode, in the caller's namespace, which would
        # turn every mount of the host private (the node's /run/netns too: containerd then
        # refuses the DaemonSet's HostToContainer mount). "unchanged": a chroot's root
        # need not be a mount point (mmdebstrap's own advice for unshare).
        run("unshare", "--mount", "--propagation", "unchanged", "--",
            "mmdebstrap", "--variant=minbase", "--mode=root", "bookworm", str(base))
        got = subprocess.run([*b, "from", "scratch"], capture_output=True, text=True)
        if got.returncode != 0:
            raise RuntimeError(f"buildah from scratch: exit {got.returncode}: {got.stderr.strip()}")
        cid = got.stdout.strip()
        run(*b, "add", cid, str(base), "/")
        run(*b, "config", "--cmd", "bash", "--env",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", cid)
        run(*b, "commit", "--rm", cid, DEBIAN_BASE)
        base.unlink()
        timings["debian-base"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    tag = PLANEWATCH_IMAGE
    extra = []
    # A build machine behind a TLS-inspecting proxy: its CA where update-ca-certificates
    # (ca-certificates' postinst) adds it to the stage's bundle (docs/deploy.md).
    for crt in sorted(Path("/usr/local/share/ca-certificates").glob("*.crt")):
        extra += ["--volume", f"{crt}:/usr/local/share/ca-certificates/{crt.name}:ro"]
    # A bundle pip was told to trust (PIP_CERT) that is not the system's own (which the
    # lines above already cover): the wheel stage's pip needs it as much as ours did.
    pip_cert = os.environ.get("PIP_CERT", "")
    if pip_cert and Path(pip_cert).is_file() and \
            Path(pip_cert).resolve() != Path("/etc/ssl/certs/ca-certificates.crt").resolve():
        extra += ["--volume", f"{pip_cert}:/usr/local/share/ca-certificates/pip-cert.crt:ro"]
    run(*b, "bud", "--isolation", "chroot", "--network", "host", "--layers=false",
        *_build_ulimits(), "--build-arg", f"DEBIAN={DEBIAN_BASE}", *extra,
        "-f", "deploy/Containerfile",
        "-t", tag, ".", cwd=REPO)
    timings["buildah-bud"] = round(time.monotonic() - t, 1)
    tmp = archive.with_suffix(".tmp")
    run(*b, "push", tag, f"oci-archive:{tmp}:{tag}")
    tmp.rename(archive)
    # vfs keeps a full copy per layer: drop the image (the base stays for the next build).
    run(*b, "rmi", "--force", tag)
    subprocess.run([*b, "rmi", "--prune"], stdout=log, stderr=subprocess.STDOUT)
