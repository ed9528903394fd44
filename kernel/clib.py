"""The project's own C libraries (kernel/*.c, built by kernel/Makefile), opened
with ctypes. Each is optional: without it, its Python twin runs."""
from __future__ import annotations

import ctypes
import os
from typing import Callable, Sequence


def open_library(path: str, switch: str, symbols: Sequence[str],
                 dll: Callable[[str], ctypes.CDLL] = ctypes.CDLL) -> tuple[ctypes.CDLL | None, str]:
    """(the library at `path`, "ok"), or (None, why not): the environment
    variable `switch` is set, it is not built, or it lacks one of `symbols` (a
    build older than its Python side)."""
    if os.environ.get(switch):
        return None, f"disabled by {switch}"
    try:
        lib = dll(path)
        for name in symbols:
            getattr(lib, name)
    except (OSError, AttributeError) as err:
        return None, f"not loaded: {err}"
    return lib, "ok"
