"""The one way planewatch reads sysfs: bounded, non-blocking, inside the device tree.

Which sysfs files a scrape reads is partly decided by tenants: `pci-address`,
`pf-pci-address` and `rdma-device` come from a pod's network-status
annotation. Joined into a path unchecked, `../` walks anywhere the collector
can see: a FIFO (an open that never returns: /metrics hangs), a character
device such as /dev/zero (a read that never ends), or the tenant's own files
through `<procfs>/<pid>/root`. So every sysfs reader goes through `Sysfs`:

- names taken from annotations are checked against the kernel's own format
  first (`pci_address`, `ib_device`): what fails is refused, never joined;
- every path is resolved (symlinks and all) and must stay under
  `<sysfs root>/devices/`, where the kernel keeps every device attribute
  (`bus/pci/devices/*`, `class/net/*`, `class/infiniband/*` are links into it);
- only regular files are opened (checked before the open, so a device node
  whose open has effects is never opened, and again with fstat after it),
  with O_NONBLOCK | O_NOFOLLOW;
- a read is bounded: sysfs `show()` never returns more than a page, so a file
  longer than `MAX_READ` is refused rather than read.

"Not there" (ENOENT, ENOTDIR) is `None`, as everywhere in planewatch. Any
other failure raises `SysfsError` whose `reason` is the errno name (EINVAL,
EOPNOTSUPP, EIO ... as drivers' show() return them) or the policy that refused
the path (`outside_device_tree`, `not_regular_file`, `too_large`), so callers
can count it on a series that says why.

`open_fn` / `read_fn` are the I/O seam: tests pass functions that fail like a
driver does (sysfs show() errors surface at read(), not at open()).
"""
from __future__ import annotations

import errno
import os
import re
import stat

MAX_READ = 4096         # PAGE_SIZE: the most a sysfs show() can return
MAX_LISTING = 4096      # entries of one sysfs directory we are willing to look at

# pci_name(): "%04x:%02x:%02x.%d"; domains above 0xffff exist (Intel VMD).
_PCI_ADDRESS = re.compile(r"[0-9a-f]{4,8}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]")
# IB_DEVICE_NAME_MAX is 64 with the NUL; names are driver-made (mlx5_4, irdma0, rxe0).
_IB_DEVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}")
_COMPONENT = re.compile(r"[^/\0]{1,255}")

OUTSIDE, NOT_REGULAR, TOO_LARGE, BAD_NAME = "outside_device_tree", "not_regular_file", "too_large", "invalid_name"


class SysfsError(Exception):
    """A sysfs read that failed or was refused; `reason` says which, for a label."""

    def __init__(self, reason: str, path: str = ""):
        super().__init__(f"{path}: {reason}" if path else reason)
        self.reason = reason
        self.path = path


def errno_name(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code == errno.EOPNOTSUPP:        # ENOTSUP is the same number on Linux; name it as drivers do
        return "EOPNOTSUPP"
    return errno.errorcode.get(code, f"errno_{code}")


def pci_address(text) -> str | None:
    """The PCI address as sysfs names it, or None when `text` is not one."""
    if not isinstance(text, str) or len(text) > 16:
        return None
    text = text.strip().lower()
    return text if _PCI_ADDRESS.fullmatch(text) else None


def ib_device(text) -> str | None:
    if not isinstance(text, str) or not _IB_DEVICE.fullmatch(text):
        return None
    return text


class Sysfs:
    """A sysfs root (`--path.sysfs`) read under the rules above."""

    def __init__(self, root: str, open_fn=os.open, read_fn=os.read, max_read: int = MAX_READ):
        self.root = root
        self._root = os.path.realpath(root).rstrip(os.sep) + os.sep
        self._tree = self._root + "devices" + os.sep
        self._open = open_fn
        self._read = read_fn
        self.max_read = max_read

    def path(self, *parts: str) -> str:
        """root/parts..., each part one name: no '/', no '.' or '..'."""
        for part in parts:
            if not isinstance(part, str) or not _COMPONENT.fullmatch(part) or part in (".", ".."):
                raise SysfsError(BAD_NAME, repr(part)[:80])
        return os.path.join(self.root, *parts)

    def resolve(self, path: str, whole_root: bool = False) -> str:
        """The real path, refused unless inside the device tree (or, for
        listings and link names, anywhere under the root: `bus/pci/devices`
        itself is an index outside `devices/`)."""
        real = os.path.realpath(path)
        if not (real + os.sep).startswith(self._root if whole_root else self._tree):
            raise SysfsError(OUTSIDE, path)
        return real

    def inside(self, path: str) -> bool:
        try:
            self.resolve(path)
            return True
        except SysfsError:
            return False

    def read(self, path: str, limit: int | None = None) -> bytes | None:
        """The file's bytes; None when absent; SysfsError when failed or refused."""
        real = self.resolve(path)
        return self._read_real(real, path, limit, follow_link=False)

    def read_at(self, real_dir: str, name: str, limit: int | None = None) -> bytes | None:
        """`read(real_dir/name)` for many files of one directory that `resolve` already
        checked: one realpath per directory instead of one per file. A name that
        is itself a symlink takes the full path (resolved and checked)."""
        if not (real_dir + os.sep).startswith(self._tree):
            raise SysfsError(OUTSIDE, real_dir)
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise SysfsError(BAD_NAME, repr(name)[:80])
        path = real_dir + os.sep + name
        return self._read_real(path, path, limit, follow_link=True)

    def _read_real(self, real: str, shown: str, limit: int | None, follow_link: bool) -> bytes | None:
        limit = self.max_read if limit is None else limit
        try:
            st = os.lstat(real)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            raise SysfsError(errno_name(err.errno), shown) from None
        if stat.S_ISLNK(st.st_mode) and follow_link:
            return self.read(real, limit)
        if not stat.S_ISREG(st.st_mode):
            raise SysfsError(NOT_REGULAR, shown)
        try:
            fd = self._open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            raise SysfsError(errno_name(err.errno), shown) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):      # swapped between lstat and open
                raise SysfsError(NOT_REGULAR, shown)
            data = self._read(fd, limit + 1)
        except OSError as err:
            raise SysfsError(errno_name(err.errno), shown) from None
        finally:
            os.close(fd)
        if len(data) > limit:
            raise SysfsError(TOO_LARGE, shown)
        return data

    def read_text(self, path: str) -> str | None:
        data = self.read(path)
        return None if data is None else data.decode("utf-8", "replace").strip()

    def read_text_or_empty(self, path: str) -> str:
        """For optional facts (numa_node, phys_port_name): any failure is ""."""
        try:
            return self.read_text(path) or ""
        except SysfsError:
            return ""

    def listdir(self, path: str) -> list[str] | None:
        """Names in a directory inside the tree; None when absent or refused."""
        try:
            real = self.resolve(path, whole_root=True)
        except SysfsError:
            return None
        try:
            with os.scandir(real) as it:
                names = []
                for entry in it:
                    names.append(entry.name)
                    if len(names) >= MAX_LISTING:
                        break
                return names
        except OSError:
            return None

    def link_name(self, path: str) -> str:
        """Basename of a symlink's target (never followed); "" when not a link."""
        try:
            self.resolve(os.path.dirname(path), whole_root=True)
            return os.path.basename(os.readlink(path))
        except (OSError, SysfsError):
            return ""

    def kind(self, path: str) -> str:
        """"dir", "file" (regular), "" (absent), or "other": there but not readable
        by the rules (outside the tree, a FIFO, a device node...)."""
        try:
            st = os.lstat(self.resolve(path))
        except (FileNotFoundError, NotADirectoryError):
            return ""
        except (OSError, SysfsError):
            return "other" if os.path.lexists(path) else ""
        if stat.S_ISDIR(st.st_mode):
            return "dir"
        return "file" if stat.S_ISREG(st.st_mode) else "other"


def as_sysfs(value) -> Sysfs:
    return value if isinstance(value, Sysfs) else Sysfs(value)
