"""Read enum values from a kernel BTF blob (/sys/kernel/btf/vmlinux).

The `skb_drop_reason` enum changes with every kernel release (values are
renumbered, reasons added), so drop reason names come from the running
kernel's BTF rather than a table. Parsing is a pure function over bytes;
reading the file is apart (`drop_reasons`). Format: Documentation/bpf/btf.rst.
"""
from __future__ import annotations

import struct

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F
DROP_REASON_ENUM = "skb_drop_reason"
DROP_REASON_PREFIX = "SKB_DROP_REASON_"

KIND_INT, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 3, 4, 5, 6
KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_DECL_TAG, KIND_ENUM64 = 13, 14, 15, 17, 19

# bytes that follow the 12-byte type header: fixed, and per member (vlen)
_TRAILER = {KIND_INT: (4, 0), KIND_ARRAY: (12, 0), KIND_STRUCT: (0, 12), KIND_UNION: (0, 12),
            KIND_ENUM: (0, 8), KIND_FUNC_PROTO: (0, 8), KIND_VAR: (4, 0), KIND_DATASEC: (0, 12),
            KIND_DECL_TAG: (4, 0), KIND_ENUM64: (0, 12)}
MAX_KIND = 19


class BTFError(ValueError):
    pass


def _header(blob: bytes) -> tuple[str, int, int, int, int]:
    """(byte order, types start, types end, strings start, strings end)."""
    for order in ("<", ">"):
        magic, = struct.unpack_from(order + "H", blob, 0)
        if magic == BTF_MAGIC:
            break
    else:
        raise BTFError("not a BTF blob (bad magic)")
    _, _, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(order + "HBBIIIII", blob, 0)
    types = hdr_len + type_off
    strings = hdr_len + str_off
    if types + type_len > len(blob) or strings + str_len > len(blob):
        raise BTFError("truncated BTF blob")
    return order, types, types + type_len, strings, strings + str_len


def _string(blob: bytes, strings: int, offset: int) -> str:
    end = blob.index(b"\0", strings + offset)
    return blob[strings + offset:end].decode()


def _string_offsets(blob: bytes, strings: int, end: int, name: str) -> set[int]:
    """Offsets of `name` in the string section, so the type walk compares ints
    (decoding every type's name made the walk 4x slower)."""
    needle, found, at = b"\0" + name.encode() + b"\0", set(), strings - 1
    if blob[strings:strings + len(needle) - 1] == needle[1:]:
        found.add(0)
    while (at := blob.find(needle, at + 1, end)) >= 0:
        found.add(at + 1 - strings)
    return found


def enum_values(blob: bytes, name: str) -> dict[int, str]:
    """value -> enumerator name of the first enum (or enum64) called `name`."""
    order, pos, end, strings, strings_end = _header(blob)
    wanted = _string_offsets(blob, strings, strings_end, name)
    while pos < end:
        name_off, info, size_or_type = struct.unpack_from(order + "III", blob, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if kind > MAX_KIND:
            raise BTFError(f"unknown BTF kind {kind}")
        fixed, per_member = _TRAILER.get(kind, (0, 0))
        members = pos + 12 + fixed
        if kind in (KIND_ENUM, KIND_ENUM64) and name_off in wanted:
            signed = bool(info >> 31)   # kind_flag: the enum's values are signed
            return _enumerators(blob, order, strings, members, vlen, kind, signed)
        pos = members + vlen * per_member
    raise BTFError(f"enum {name} not in BTF")


def _enumerators(blob, order, strings, pos, vlen, kind, signed) -> dict[int, str]:
    values: dict[int, str] = {}
    for i in range(vlen):
        if kind == KIND_ENUM:
            name_off, value = struct.unpack_from(order + ("Ii" if signed else "II"), blob, pos + 8 * i)
        else:
            name_off, lo, hi = struct.unpack_from(order + "III", blob, pos + 12 * i)
            value = (hi << 32) | lo
        values.setdefault(value, _string(blob, strings, name_off))
    return values


def strip_prefix(names: dict[int, str], prefix: str = DROP_REASON_PREFIX) -> dict[int, str]:
    return {v: n[len(prefix):] if n.startswith(prefix) else n for v, n in names.items()}


def drop_reasons(path: str = VMLINUX_BTF) -> dict[int, str]:
    """skb_drop_reason value -> name without SKB_DROP_REASON_ (e.g. NO_SOCKET)."""
    with open(path, "rb") as f:
        blob = f.read()
    return strip_prefix(enum_values(blob, DROP_REASON_ENUM))
