"""A free TCP port on 127.0.0.1, for the servers tests and benches start. (The
port is free when asked; a server started right after takes it.)"""
from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
