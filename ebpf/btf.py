"""Enum values from the kernel's BTF (/sys/kernel/btf/vmlinux), through libbpf.

The `skb_drop_reason` enum changes with every kernel release (values are
renumbered, reasons added), so drop reason names come from the running
kernel's BTF rather than a table. libbpf parses and validates the BTF (it does
so anyway to relocate the CO-RE programs), so new BTF kinds need nothing here.
A failure costs only the names: the loader keeps the programs and reports drops
as UNKNOWN_<value> (ebpf/maps.py `drops_by_reason`).
"""
from __future__ import annotations

import ctypes

from ebpf import libbpf

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
DROP_REASON_ENUM = "skb_drop_reason"
DROP_REASON_PREFIX = "SKB_DROP_REASON_"

KIND_ENUM, KIND_ENUM64 = 6, 19
_KIND_FLAG = 1 << 31            # kind_flag: the enum's values are signed


class BTFError(ValueError):
    pass


class _Enum(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val", ctypes.c_uint32)]


class _Enum64(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("lo32", ctypes.c_uint32), ("hi32", ctypes.c_uint32)]


def _enumerators(btf: int, name: str) -> dict[int, str]:
    for kind, member in ((KIND_ENUM, _Enum), (KIND_ENUM64, _Enum64)):
        type_id = libbpf.btf_find(btf, name, kind)
        if type_id is None:
            continue
        head = libbpf.btf_type(btf, type_id).contents
        vlen, signed = head.info & 0xFFFF, bool(head.info & _KIND_FLAG)
        members = (member * vlen).from_address(ctypes.addressof(head) + ctypes.sizeof(head))
        values: dict[int, str] = {}
        for m in members:
            if kind == KIND_ENUM:
                value = m.val - (1 << 32) if signed and m.val >> 31 else m.val
            else:
                value = (m.hi32 << 32) | m.lo32
            values.setdefault(value, libbpf.btf_name(btf, m.name_off))
        return values
    raise BTFError(f"enum {name} not in BTF")


def _read(btf_of, source, name: str) -> dict[int, str]:
    try:
        btf = btf_of(source)
    except OSError as err:
        raise BTFError(str(err)) from None
    try:
        return _enumerators(btf, name)
    finally:
        libbpf.btf_free(btf)


def enum_values(blob: bytes, name: str) -> dict[int, str]:
    """value -> enumerator name of the enum (or enum64) called `name` in a raw BTF blob."""
    return _read(libbpf.btf_new, blob, name)


def strip_prefix(names: dict[int, str], prefix: str = DROP_REASON_PREFIX) -> dict[int, str]:
    return {v: n[len(prefix):] if n.startswith(prefix) else n for v, n in names.items()}


def drop_reasons(path: str = VMLINUX_BTF) -> dict[int, str]:
    """skb_drop_reason value -> name without SKB_DROP_REASON_ (e.g. NO_SOCKET)."""
    return strip_prefix(_read(libbpf.btf_parse, path, DROP_REASON_ENUM))
