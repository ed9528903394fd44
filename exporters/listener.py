"""The listening socket, guarded: connection caps, timeouts, request size limits.

aiohttp alone lets a client hold a connection with half a request forever and
accepts any number of connections; 60 of them holding 1.6 MB of headers each
doubled the collector's RSS before any authentication ran. Here:

- connections are counted from accept, before any TLS work, and refused over
  `max_connections` in total or `max_per_client` from one address (one pod
  cannot take every slot from Prometheus), after waiting up to a second for a
  slot (the previous connection of a client reconnecting at once);
- a TLS handshake must finish within `handshake_timeout`;
- a request must be complete within `read_timeout` of the connection opening or
  of the previous response (aiohttp's keep-alive timer, which it starts at
  accept and which closes a connection waiting for a request), so an idle
  keep-alive connection is closed after that time too;
- request line, each header and the number of headers are bounded, so one
  connection buffers at most ~`max_headers` x `max_field_size` bytes;
- a response must be taken by the client within `write_timeout`, or the
  connection is aborted (with its unsent buffer).

Each refusal is counted in `planewatch_http_refused_total{reason}`.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import Counter

from aiohttp import http_exceptions, web, web_protocol, web_server

from exporters.httpstats import REFUSALS, Limits, Refusals  # noqa: F401  (Limits: re-exported)

log = logging.getLogger(__name__)

# Without versions: the Server header would otherwise tell a scanner which
# Python and aiohttp releases to try.
SERVER_HEADER = "planewatch"
# How long a connection over a cap waits (accepted, unread) for a slot before it
# is refused: the close of a client's previous connection may not be seen yet.
ADMIT_WAIT_SECONDS = 1.0


class GuardedHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, counting what it refuses and telling the
    listener when the connection is gone. Relies on aiohttp 3.x internals
    (`_request_count`, `_process_keepalive`, `_messages`, `finish_response`);
    tests/test_hostile_http.py pins them."""

    def __init__(self, manager, *, refusals: Refusals, on_lost, write_timeout: float, **kwargs):
        super().__init__(manager, **kwargs)
        self._write_timeout = write_timeout
        self._refusals = refusals
        self._on_lost = on_lost
        self._unfinished = 0            # bytes of a request not yet complete

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        size = len(data)
        super().data_received(data)
        del data
        if self._request_count == before:
            self._unfinished += size
            return
        self._unfinished = 0
        for message, _payload in self._messages:
            exc = getattr(message, "exc", None)
            if exc is not None:
                # The parse error's traceback holds the frames that hold the
                # received buffers (256 KiB each): 60 refused floods kept 41 MiB
                # alive until a cycle collection. Nothing reads that traceback.
                exc.__traceback__ = None
                if self.transport is not None:
                    self.transport.pause_reading()      # the connection ends with the 400

    def _process_keepalive(self) -> None:
        was_open = self.transport is not None
        super()._process_keepalive()
        if was_open and self.transport is None and self._unfinished:
            self._refusals.refuse("header_timeout")

    async def finish_response(self, request, resp, start_time):
        """Writing the response, bounded: a client that sends requests and never
        reads would otherwise hold its slot and a copy of the body (the
        transport's buffer) forever."""
        try:
            return await asyncio.wait_for(super().finish_response(request, resp, start_time),
                                          self._write_timeout)
        except asyncio.TimeoutError:
            self._refusals.refuse("write_timeout")
            if self.transport is not None:
                self.transport.abort()      # close() would wait to flush the buffer
            self.force_close()
            return resp, True

    def handle_error(self, request, status=500, exc=None, message=None):
        if isinstance(exc, http_exceptions.HttpProcessingError):
            too_large = isinstance(exc, http_exceptions.LineTooLong) or "Too many headers" in str(exc)
            self._refusals.refuse("request_too_large" if too_large else "malformed_request")
            # A client's garbage is not our error: no traceback per bad request.
            log.debug("refused request from %s: %s", request.remote, exc)
            resp: web.StreamResponse = web.Response(status=status, text=f"{status} Bad Request\n")
            resp.force_close()
        else:
            resp = super().handle_error(request, status, exc, message)
        resp.headers["Server"] = SERVER_HEADER
        return resp

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        self._on_lost()


async def _server_header(request, response) -> None:
    response.headers["Server"] = SERVER_HEADER


def harden_app(app: web.Application) -> None:
    """Call before the app is frozen (before AppRunner.setup)."""
    app.on_response_prepare.append(_server_header)


# listen() caps its backlog at net.core.somaxconn: asking for the most an int holds
# gets the kernel's cap, as Go's net.Listen (node_exporter's) does by reading it.
# aiohttp's 128 overflowed under a connection flood: the kernel then drops SYNs, and
# every client connecting meanwhile, Prometheus included, waits for its SYN's
# retransmission a second later.
LISTEN_BACKLOG = 0x7FFFFFFF


def listen_socket(host: str, port: int, backlog: int | None = None) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG if backlog is None else backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class GuardedListener:
    """Accepts on its own socket and hands each admitted connection to `server`
    (the aiohttp low-level server of an AppRunner)."""

    def __init__(self, server: web_server.Server, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None, limits: Limits | None = None,
                 refusals: Refusals = REFUSALS):
        self.server = server
        self.host, self.requested_port = host, port
        self.ssl_context = ssl_context
        self.limits = limits or Limits()
        self.refusals = refusals
        self.active = 0
        self.per_client: Counter[str] = Counter()
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._opening: set[asyncio.Task] = set()
        self._waiting: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1] if self._sock else self.requested_port

    async def start(self) -> None:
        self._sock = listen_socket(self.host, self.requested_port)
        self._accepting = asyncio.create_task(self._accept_forever())

    async def stop(self) -> None:
        if self._accepting:
            self._accepting.cancel()
        tasks = [t for t in [self._accepting, *self._opening, *self._waiting] if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._sock:
            self._sock.close()
            self._sock = None

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                assert self._sock is not None       # set by start()
                conn, address = await loop.sock_accept(self._sock)
            except OSError as err:          # EMFILE and friends: do not spin
                log.warning("accept failed: %s", err)
                await asyncio.sleep(0.1)
                continue
            self._admit(conn, address[0] if isinstance(address, tuple) else "")

    def _full(self, client: str) -> bool:
        return (self.active >= self.limits.max_connections
                or self.per_client[client] >= self.limits.max_per_client)

    def _admit(self, conn: socket.socket, client: str) -> None:
        if self._full(client):
            # A client that closed and reconnected at once may still be counted
            # (its close not yet seen by the loop): give it a moment, unread,
            # before refusing. Those waiting are bounded like connections.
            if len(self._waiting) >= self.limits.max_connections:
                self.refusals.refuse("connection_limit")
                _close_now(conn)
                return
            task = asyncio.create_task(self._admit_later(conn, client))
            self._waiting.add(task)
            task.add_done_callback(self._waiting.discard)
            return
        self._start(conn, client)

    async def _admit_later(self, conn: socket.socket, client: str) -> None:
        deadline = asyncio.get_running_loop().time() + ADMIT_WAIT_SECONDS
        try:
            while self._full(client):
                if asyncio.get_running_loop().time() >= deadline:
                    self.refusals.refuse("connection_limit")
                    _close_now(conn)
                    return
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            conn.close()
            raise
        self._start(conn, client)

    def _start(self, conn: socket.socket, client: str) -> None:
        self.active += 1
        self.per_client[client] += 1
        task = asyncio.create_task(self._open(conn, client))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _open(self, conn: socket.socket, client: str) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.active -= 1
                self.per_client[client] -= 1
                if self.per_client[client] <= 0:
                    del self.per_client[client]

        loop = asyncio.get_running_loop()

        def handler() -> GuardedHandler:
            return GuardedHandler(self.server, loop=loop, refusals=self.refusals, on_lost=release,
                                  write_timeout=self.limits.write_timeout,
                                  **self.limits.handler_kwargs())
        kwargs: dict = {}
        if self.ssl_context is not None:
            kwargs = {"ssl": self.ssl_context, "ssl_handshake_timeout": self.limits.handshake_timeout}
        try:
            await loop.connect_accepted_socket(handler, conn, **kwargs)
        except asyncio.CancelledError:
            release()
            conn.close()
            raise
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as err:
            release()
            conn.close()
            if self.ssl_context is not None:
                self.refusals.refuse("tls_handshake")
            log.debug("connection from %s dropped before HTTP: %s", client, err)


def _close_now(conn: socket.socket) -> None:
    """Close with a reset, leaving no TIME_WAIT or lingering buffer behind."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    conn.close()
