"""tests/ports.py: ports for the servers tests start, outside the range outgoing
connections take their source ports from."""
from __future__ import annotations

import socket

from tests.ports import LOW, ephemeral_start, free_port


def test_free_ports_are_below_the_ephemeral_range_and_bindable():
    start = ephemeral_start()
    ports = {free_port() for _ in range(20)}
    assert all(LOW <= p < start for p in ports) if start - LOW >= 1000 else ports
    assert len(ports) > 1                   # not one port handed out again and again
    for port in list(ports)[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_not_handed_out(monkeypatch):
    import random
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        picks = iter([taken, taken, LOW + 7])
        monkeypatch.setattr(random, "randrange", lambda a, b: next(picks))
        monkeypatch.setattr("tests.ports.LOW", min(LOW, taken - 1))
        monkeypatch.setattr("tests.ports.ephemeral_start", lambda: max(taken + 2000, LOW + 2000))
        assert free_port() == LOW + 7
