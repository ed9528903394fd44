"""Assemble the root filesystem of planewatch's image (deploy/Containerfile, stage
`rootfs`), which the final stage copies into an empty image (`FROM scratch`).

    python3 deploy/rootfs.py /rootfs

Run on the Debian the image is built from, after the venv is in /opt/planewatch and
python3, libbpf1 and ca-certificates are installed. What it copies, and only that:

- the interpreter, once, as /opt/planewatch/bin/planewatch-python (the Containerfile
  gives it file capabilities); the venv's python, python3, python3.11 point to it;
- the venv (site-packages with the BPF objects, the `planewatch` script);
- the standard library without what no planewatch command can reach (EXCLUDED);
- the shared libraries by ldd closure of the interpreter, of the extension modules
  kept and of libbpf.so.1 (loaded by ctypes by soname: ebpf/libbpf.py), plus the
  libraries glibc itself dlopens (DLOPENED_BY_GLIBC);
- /etc/passwd and /etc/group (uid/gid 65534 and 0), nsswitch.conf, the C.UTF-8
  locale, the CA bundle of the distribution's enabled certificates, an empty /tmp.

No shell, no package manager, no ldconfig: the dynamic loader searches its default
directories (Debian's include /usr/lib/x86_64-linux-gnu), so no ld.so.cache either.
Every path is copied with the symlinks met on the way (usr-merge's /lib, /lib64), and
no file keeps a setuid or setgid bit.
"""
from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import sys
import sysconfig
from fnmatch import fnmatch
from pathlib import Path

VENV = Path("/opt/planewatch")
INTERPRETER = "planewatch-python"

# Parts of the standard library that nothing in planewatch imports and that either
# need a library or program the image does not have (Tk, curses, sqlite, readline,
# NIS/RPC, gdbm) or serve development only (tests, IDLE, 2to3, pip's bootstrap,
# distutils, venv, pydoc's topics). Names relative to the stdlib directory; a name
# ending in "/" is a package, "*" matches within one name.
EXCLUDED = (
    "test/", "idlelib/", "tkinter/", "turtledemo/", "turtle.py", "ensurepip/", "lib2to3/",
    "pydoc_data/", "distutils/", "venv/", "sqlite3/", "dbm/", "curses/", "config-*/",
    # Debian's hook for apport, which is not installed; and pip's marker for apt.
    "sitecustomize.py", "EXTERNALLY-MANAGED",
    "lib-dynload/_test*", "lib-dynload/_xxtest*", "lib-dynload/xxlimited*",
    "lib-dynload/_ctypes_test.*", "lib-dynload/_sqlite3.*", "lib-dynload/_dbm.*",
    "lib-dynload/_gdbm.*", "lib-dynload/_curses*", "lib-dynload/readline.*",
    "lib-dynload/nis.*", "lib-dynload/ossaudiodev.*", "lib-dynload/_tkinter.*",
)

# Loaded by glibc at run time, so no ldd lists them: libgcc_s for unwinding when a
# thread exits (pthread_exit, e.g. a daemon thread at interpreter shutdown).
DLOPENED_BY_GLIBC = ("libgcc_s.so.1",)
LIBBPF = "libbpf.so.1"

PASSWD = ("root:x:0:0:root:/root:/usr/sbin/nologin\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
GROUP = "root:x:0:\nnogroup:x:65534:\n"
NSSWITCH = "passwd: files\ngroup: files\nhosts: files dns\n"


class Root:
    """The tree being assembled: every copy into it goes through `install`."""

    def __init__(self, dest: Path):
        self.dest = dest

    def at(self, path: str | Path) -> Path:
        return self.dest / str(path).lstrip("/")

    def parents(self, path: str) -> None:
        """The parent directories of `path`, with their modes and their symlinks."""
        parent = os.path.dirname(path)
        if parent != "/" and not os.path.lexists(self.at(parent)):
            self.install(parent, recursive=False)

    def install(self, path: str, recursive: bool = True, skip=lambda path: False) -> None:
        """Copy `path` from this system, the way it resolves here: each symlink met
        (on the way or at the end) is copied as a symlink and its target too. Below a
        directory, paths for which `skip` is true are left out."""
        path = os.path.normpath(path)
        head = "/"
        parts = path.strip("/").split("/")
        for i, part in enumerate(parts):
            here = os.path.join(head, part)
            if os.path.islink(here):
                target = os.readlink(here)
                if not os.path.lexists(self.at(here)):
                    self.parents(here)
                    os.symlink(target, self.at(here))
                resolved = os.path.normpath(os.path.join(head, target))
                return self.install(os.path.join(resolved, *parts[i + 1:]), recursive, skip)
            head = here
        if os.path.lexists(self.at(path)) and not os.path.isdir(path):
            return
        self.parents(path)
        if os.path.isdir(path):
            self.at(path).mkdir(exist_ok=True)
            _copy_mode(path, self.at(path))
            if recursive:
                for name in sorted(os.listdir(path)):
                    if not skip(os.path.join(path, name)):
                        self.install(os.path.join(path, name), skip=skip)
        else:
            shutil.copyfile(path, self.at(path))
            _copy_mode(path, self.at(path))

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        self.parents(path)
        self.at(path).write_text(text)
        self.at(path).chmod(mode)


def _copy_mode(src: str, dst: Path) -> None:
    os.chmod(dst, os.stat(src).st_mode & 0o1777)    # no setuid/setgid, sticky kept


def excluded(relative: str, is_dir: bool) -> bool:
    return any(fnmatch(relative, pattern.removesuffix("/")) for pattern in EXCLUDED
               if pattern.endswith("/") == is_dir)


def left_out(relative: str) -> bool:
    """Whether the stdlib file at `relative` (e.g. "sqlite3/__init__.py") is not in
    the image: itself or one of its directories is EXCLUDED."""
    parts = relative.split("/")
    return excluded(relative, False) or any(excluded("/".join(parts[:i]), True)
                                            for i in range(1, len(parts)))


def stdlib_files(stdlib: Path) -> list[str]:
    """Every file and symlink of the standard library that is not EXCLUDED (with the
    bytecode of those that are left out removed along with them)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        rel = os.path.relpath(dirpath, stdlib)
        rel = "" if rel == "." else rel + "/"
        dirnames[:] = sorted(d for d in dirnames if not excluded(rel + d, True))
        for name in sorted(filenames):
            if rel.endswith("__pycache__/"):
                source = rel.removesuffix("__pycache__/") + name.split(".", 1)[0] + ".py"
                if excluded(source, False) or not (stdlib / source).exists():
                    continue
            elif excluded(rel + name, False):
                continue
            out.append(str(stdlib / rel / name))
    return out


def elf_files(paths: list[str]) -> list[str]:
    return [p for p in paths if os.path.isfile(p) and not os.path.islink(p)
            and open(p, "rb").read(4) == b"\x7fELF"]


def needed_libraries(binaries: list[str]) -> set[str]:
    """The shared libraries (and the dynamic loader) `binaries` load, per ldd."""
    out: set[str] = set()
    for binary in binaries:
        listing = subprocess.run(["ldd", binary], capture_output=True, text=True)
        if listing.returncode != 0:
            if "not a dynamic executable" in listing.stdout + listing.stderr:
                continue
            sys.exit(f"ldd {binary}: {listing.stderr.strip()}")
        for line in listing.stdout.splitlines():
            if "not found" in line:
                sys.exit(f"{binary}: {line.strip()}")
            match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if match:
                out.add(match.group(1))
    return out


def find_library(soname: str) -> str:
    """Where the dynamic loader finds `soname`, from ldconfig's cache here."""
    cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    match = re.search(rf"^\s*{re.escape(soname)} \(([^)]*)\) => (\S+)$", cache, re.M)
    if not match:
        sys.exit(f"{soname} is not installed")
    return match.group(2)


def ca_bundle() -> str:
    """The distribution's enabled CA certificates (/etc/ca-certificates.conf), not the
    build machine's local ones: a proxy CA mounted for the build stays out."""
    out = []
    for line in Path("/etc/ca-certificates.conf").read_text().splitlines():
        if line and not line.startswith(("#", "!")):
            out.append(Path("/usr/share/ca-certificates", line).read_text().strip() + "\n")
    if not out:
        sys.exit("no CA certificates enabled in /etc/ca-certificates.conf")
    return "".join(out)


def assemble(dest: Path) -> None:
    root = Root(dest)
    dest.mkdir(parents=True, exist_ok=True)
    python = os.path.realpath(sys.executable)
    # The venv without its links to the system's interpreter (they would bring a
    # second copy) nor the activation scripts (no shell), then the one interpreter.
    bindir = root.at(VENV / "bin")
    root.install(str(VENV), skip=lambda p: os.path.dirname(p) == str(VENV / "bin") and (
        os.path.realpath(p) == python or os.path.basename(p).lower().startswith("activate")))
    shutil.copyfile(python, bindir / INTERPRETER)
    _copy_mode(python, bindir / INTERPRETER)
    for name in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"):
        (bindir / name).unlink(missing_ok=True)
        (bindir / name).symlink_to(INTERPRETER)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(stdlib)
    for path in files:
        root.install(path)

    libbpf = find_library(LIBBPF)
    binaries = [python, libbpf, *elf_files(files),
                *elf_files([str(p) for p in VENV.rglob("*.so")])]
    for library in sorted(needed_libraries(binaries) | {libbpf}
                          | {find_library(name) for name in DLOPENED_BY_GLIBC}):
        root.install(library)

    root.write("/etc/passwd", PASSWD)
    root.write("/etc/group", GROUP)
    root.write("/etc/nsswitch.conf", NSSWITCH)
    locale = Path("/usr/lib/locale/C.utf8")
    if locale.is_dir():
        root.install(str(locale))
    # Where this OpenSSL looks by default (ssl.create_default_context without a CA
    # file: a kubeconfig whose server has a publicly trusted certificate).
    cafile = ssl.get_default_verify_paths().openssl_cafile
    root.write("/etc/ssl/certs/ca-certificates.crt", ca_bundle())
    if cafile != "/etc/ssl/certs/ca-certificates.crt":
        root.parents(cafile)
        root.at(cafile).symlink_to("/etc/ssl/certs/ca-certificates.crt")
    root.at("/tmp").mkdir(exist_ok=True)
    root.at("/tmp").chmod(0o1777)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    assemble(Path(sys.argv[1]))
