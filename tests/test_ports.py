"""tests/ports.py: ports for the servers tests start, outside the range outgoing
connections take their source ports from, each handed out once."""
from __future__ import annotations

import socket

import pytest

from tests import ports
from tests.ports import LOW, free_port


def test_free_ports_are_outside_the_ephemeral_range_and_bindable():
    first, last = ports.ephemeral_range()
    given = [free_port() for _ in range(20)]
    assert all(not first <= p <= last for p in given) if ports.pool() else given
    assert len(set(given)) == len(given)        # never one port twice
    for port in given[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("span, expect", [
    ((32768, 60999), range(LOW, 32768)),         # Debian's default: under it
    ((10000, 65000), range(1024, 10000)),        # no room over LOW nor over it: under it, lower
    ((1024, 50000), range(50001, 65536)),        # starts low: over it
    ((20500, 65535), range(1024, 20000)),
    ((1024, 65535), range(0)),                   # the whole range: port 0, the old way
])
def test_the_pool_avoids_the_ephemeral_range(monkeypatch, span, expect):
    monkeypatch.setattr(ports, "ephemeral_range", lambda: span)
    assert ports.pool() == expect


def test_a_port_in_use_or_given_before_is_not_handed_out(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        given, spare = free_port(), free_port()
        picks = iter([taken, given, taken, spare])
        monkeypatch.setattr(ports.random, "choice", lambda span: next(picks))
        monkeypatch.setattr(ports, "_given", set(ports._given) - {spare})
        assert free_port() == spare
