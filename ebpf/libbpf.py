"""A minimal ctypes binding over libbpf.so.1: only what the loader and bench use.

Why ctypes and not bcc: bcc needs kernel headers and an in-process LLVM
at run time; CO-RE objects built once (ebpf/Makefile) and loaded through libbpf
need neither (the load time is logged: "BPF programs loaded in N ms").
libbpf 1.x returns NULL/-errno and sets errno; every wrapper here turns that
into OSError so callers see one kind of failure.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

log = logging.getLogger(__name__)

LIBBPF_NAMES = ("libbpf.so.1", "libbpf.so")

BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_F_BEFORE = 1 << 3       # TCX: run first, so earlier programs cannot hide packets from us

LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2

_obj_p = ctypes.c_void_p
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class LinkCreateOpts(ctypes.Structure):
    """The head of `struct bpf_link_create_opts`: sz + flags is all we set.
    A short `sz` is valid for every libbpf 1.x (fields past it read as 0)."""

    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class BtfType(ctypes.Structure):
    """`struct btf_type` (uapi linux/btf.h); its members follow it in memory."""

    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size", ctypes.c_uint32)]


class TestRunOpts(ctypes.Structure):
    """`struct bpf_test_run_opts` (libbpf 1.1 layout)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32), ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


def _signatures(lib: ctypes.CDLL) -> None:
    sig = {
        "bpf_object__open_file": (_obj_p, [ctypes.c_char_p, ctypes.c_void_p]),
        "bpf_object__load": (ctypes.c_int, [_obj_p]),
        "bpf_object__close": (None, [_obj_p]),
        "bpf_object__find_program_by_name": (_obj_p, [_obj_p, ctypes.c_char_p]),
        "bpf_object__find_map_by_name": (_obj_p, [_obj_p, ctypes.c_char_p]),
        "bpf_program__fd": (ctypes.c_int, [_obj_p]),
        "bpf_program__set_autoload": (ctypes.c_int, [_obj_p, ctypes.c_bool]),
        "bpf_program__attach": (_obj_p, [_obj_p]),
        "bpf_link__destroy": (ctypes.c_int, [_obj_p]),
        "bpf_link__fd": (ctypes.c_int, [_obj_p]),
        "bpf_map__fd": (ctypes.c_int, [_obj_p]),
        "bpf_map__set_max_entries": (ctypes.c_int, [_obj_p, ctypes.c_uint32]),
        "bpf_map_get_next_key": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
        "bpf_map_lookup_elem": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
        "bpf_map_update_elem": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]),
        "bpf_map_delete_elem": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p]),
        "bpf_map_lookup_batch": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]),
        "bpf_link_create": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]),
        "bpf_prog_test_run_opts": (ctypes.c_int, [ctypes.c_int, ctypes.POINTER(TestRunOpts)]),
        "libbpf_num_possible_cpus": (ctypes.c_int, []),
        "bpf_enable_stats": (ctypes.c_int, [ctypes.c_int]),
        "libbpf_set_print": (ctypes.c_void_p, [_PRINT_FN]),
        "btf__new": (_obj_p, [ctypes.c_void_p, ctypes.c_uint32]),
        "btf__parse": (_obj_p, [ctypes.c_char_p, ctypes.c_void_p]),
        "btf__free": (None, [_obj_p]),
        "btf__find_by_name_kind": (ctypes.c_int, [_obj_p, ctypes.c_char_p, ctypes.c_uint32]),
        "btf__type_by_id": (ctypes.POINTER(BtfType), [_obj_p, ctypes.c_uint32]),
        "btf__name_by_offset": (ctypes.c_char_p, [_obj_p, ctypes.c_uint32]),
    }
    for name, (restype, argtypes) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def lib() -> ctypes.CDLL:
    """libbpf, loaded once. Raises OSError when it is not installed."""
    global _lib
    with _lib_lock:
        if _lib is None:
            last: OSError | None = None
            for name in LIBBPF_NAMES:
                try:
                    loaded = ctypes.CDLL(name, use_errno=True)
                    break
                except OSError as err:
                    last = err
            else:
                raise last or OSError("libbpf not found")
            _signatures(loaded)
            _install_printer(loaded)
            _lib = loaded
    return _lib


# --- libbpf's messages (verifier log included) go to logging, not stderr ------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_libc.vsnprintf.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p)
_captured = threading.local()


def _print(level: int, fmt: bytes, args: int) -> int:
    buf = ctypes.create_string_buffer(4096)
    _libc.vsnprintf(buf, len(buf), fmt, args)
    text = buf.value.decode(errors="replace").rstrip()
    sink = getattr(_captured, "lines", None)
    if sink is not None and level <= LIBBPF_INFO:
        sink.append(text)
    log.debug("libbpf: %s", text)
    return 0


_printer = _PRINT_FN(_print)    # kept referenced: libbpf holds the pointer


def _install_printer(loaded: ctypes.CDLL) -> None:
    loaded.libbpf_set_print(_printer)


class capture_messages:
    """Collect libbpf warnings emitted on this thread (e.g. the verifier's log)."""

    def __enter__(self) -> list[str]:
        _captured.lines = []
        return _captured.lines

    def __exit__(self, *exc) -> None:
        _captured.lines = None


# --- wrappers ----------------------------------------------------------------

def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = -ret
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _check_ptr(ptr: int | None, what: str) -> int:
    if not ptr:
        err = ctypes.get_errno() or 22
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ptr


def btf_parse(path: str) -> int:
    """A `struct btf *` of a raw or ELF BTF file; free it with btf_free."""
    return _check_ptr(lib().btf__parse(path.encode(), None), f"parse BTF {path}")


def btf_new(blob: bytes) -> int:
    """A `struct btf *` over a copy of a raw BTF blob; free it with btf_free."""
    return _check_ptr(lib().btf__new(blob, len(blob)), "parse BTF blob")


def btf_free(btf: int) -> None:
    lib().btf__free(btf)


def btf_find(btf: int, name: str, kind: int) -> int | None:
    """Type id of the type of that name and kind; None when there is none."""
    found = lib().btf__find_by_name_kind(btf, name.encode(), kind)
    return found if found > 0 else None


def btf_type(btf: int, type_id: int) -> ctypes._Pointer:
    return lib().btf__type_by_id(btf, type_id)


def btf_name(btf: int, offset: int) -> str:
    raw = lib().btf__name_by_offset(btf, offset)
    return raw.decode() if raw is not None else ""


def open_object(path: str) -> int:
    return _check_ptr(lib().bpf_object__open_file(path.encode(), None), f"open {path}")


def load_object(obj: int) -> None:
    _check(lib().bpf_object__load(obj), "bpf_object__load")


def close_object(obj: int) -> None:
    lib().bpf_object__close(obj)


def find_program(obj: int, name: str) -> int:
    return _check_ptr(lib().bpf_object__find_program_by_name(obj, name.encode()), f"program {name}")


def set_autoload(prog: int, on: bool) -> None:
    _check(lib().bpf_program__set_autoload(prog, on), "bpf_program__set_autoload")


def program_fd(prog: int) -> int:
    return _check(lib().bpf_program__fd(prog), "bpf_program__fd")


def attach_program(prog: int) -> int:
    """Attach by section name (tp_btf here); returns a `struct bpf_link *`."""
    return _check_ptr(lib().bpf_program__attach(prog), "bpf_program__attach")


def link_fd(link: int) -> int:
    return _check(lib().bpf_link__fd(link), "bpf_link__fd")


def destroy_link(link: int) -> None:
    lib().bpf_link__destroy(link)


def find_map(obj: int, name: str) -> int:
    return _check_ptr(lib().bpf_object__find_map_by_name(obj, name.encode()), f"map {name}")


def map_fd(bpf_map: int) -> int:
    return _check(lib().bpf_map__fd(bpf_map), "bpf_map__fd")


def set_max_entries(bpf_map: int, entries: int) -> None:
    _check(lib().bpf_map__set_max_entries(bpf_map, entries), "bpf_map__set_max_entries")


def link_create(prog_fd: int, ifindex: int, attach_type: int, flags: int = 0) -> int:
    """A TCX link on `ifindex` of the calling thread's netns; returns its fd."""
    opts = LinkCreateOpts(ctypes.sizeof(LinkCreateOpts), flags, 0)
    return _check(lib().bpf_link_create(prog_fd, ifindex, attach_type, ctypes.byref(opts)),
                  "bpf_link_create")


def next_key(fd: int, key: ctypes.Array | None, out: ctypes.Array) -> bool:
    """False at the end of the map."""
    ret = lib().bpf_map_get_next_key(fd, key, out)
    if ret == -2:       # ENOENT
        return False
    _check(ret, "bpf_map_get_next_key")
    return True


def lookup(fd: int, key: ctypes.Array, out: ctypes.Array) -> bool:
    """False when the key went away meanwhile (LRU eviction, concurrent delete)."""
    ret = lib().bpf_map_lookup_elem(fd, key, out)
    if ret == -2:
        return False
    _check(ret, "bpf_map_lookup_elem")
    return True


def lookup_batch(fd: int, cursor: ctypes.Array | None, next_cursor: ctypes.Array,
                 keys: ctypes.Array, values: ctypes.Array, capacity: int) -> tuple[int, bool]:
    """BPF_MAP_LOOKUP_BATCH: (entries copied, whether the walk is finished)."""
    count = ctypes.c_uint32(capacity)
    ret = lib().bpf_map_lookup_batch(fd, cursor, next_cursor, keys, values, ctypes.byref(count), None)
    if ret == -2:       # ENOENT: this was the last batch
        return count.value, True
    _check(ret, "bpf_map_lookup_batch")
    return count.value, False


def update(fd: int, key: bytes, value: bytes) -> None:
    _check(lib().bpf_map_update_elem(fd, key, value, 0), "bpf_map_update_elem")


def delete(fd: int, key: bytes) -> None:
    ret = lib().bpf_map_delete_elem(fd, key)
    if ret != -2:
        _check(ret, "bpf_map_delete_elem")


def fd_ids(fd: int) -> dict[str, int]:
    """The kernel ids behind a BPF fd (prog_id, link_id, map_id) from fdinfo,
    to tell our objects apart in `bpftool prog/link show`."""
    ids = {}
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("prog_id", "link_id", "map_id"):
                ids[name] = int(value)
    return ids


def num_possible_cpus() -> int:
    return _check(lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def test_run(prog_fd: int, packet: bytes, repeat: int, ifindex: int = 0) -> tuple[int, int]:
    """BPF_PROG_TEST_RUN: (return value, average ns per run). With `ifindex`
    (> 1, a device of the calling thread's netns) the skb comes from that
    device instead of loopback (the __sk_buff context's ifindex field)."""
    data = ctypes.create_string_buffer(packet, len(packet))
    opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts), data_in=ctypes.cast(data, ctypes.c_void_p),
                       data_size_in=len(packet), repeat=repeat)
    ctx = None
    if ifindex:
        ctx = ctypes.create_string_buffer(SKB_CTX_IFINDEX + 4)
        ctypes.c_uint32.from_buffer(ctx, SKB_CTX_IFINDEX).value = ifindex
        opts.ctx_in, opts.ctx_size_in = ctypes.cast(ctx, ctypes.c_void_p), len(ctx)
    _check(lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "bpf_prog_test_run_opts")
    return opts.retval, opts.duration


SKB_CTX_IFINDEX = 40        # offsetof(struct __sk_buff, ifindex), uapi: stable


BPF_STATS_RUN_TIME = 0


def enable_stats() -> int:
    """An fd that keeps the kernel's per-program run_cnt / run_time_ns counting
    until it is closed (what sysctl kernel.bpf_stats_enabled=1 does, but the
    sysctl is never written: the kernel refcounts the switch, so closing, or
    dying, leaves it as it was, and someone else's setting stays on)."""
    return _check(lib().bpf_enable_stats(BPF_STATS_RUN_TIME), "bpf_enable_stats")


def run_stats(prog_fd: int) -> tuple[int, int]:
    """(run_cnt, run_time_ns) of a program, from its fdinfo (counted only
    while stats are enabled)."""
    found = {}
    with open(f"/proc/self/fdinfo/{prog_fd}") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("run_cnt", "run_time_ns"):
                found[name] = int(value)
    return found.get("run_cnt", 0), found.get("run_time_ns", 0)
