"""The HTTP face's caps, what it refused, and whether its credentials files reloaded.

Counted here so that a flood, a slow client or a guessing attack shows on
/metrics (`planewatch_http_refused_total{reason}`) instead of only in logs,
while the collector keeps answering everyone else. Every reason is exported
from the start at 0, so a rule can use `increase()` from the first scrape.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from collector.family import COUNTER, GAUGE, Family


@dataclass(frozen=True)
class Limits:
    """What one client may hold; exporters/listener.py enforces them (the
    defaults are the flags' defaults in exporters/cli.py)."""

    max_connections: int = 128
    max_per_client: int = 64
    read_timeout: float = 30.0
    write_timeout: float = 60.0
    handshake_timeout: float = 10.0
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 32

    def handler_kwargs(self) -> dict:
        return {"keepalive_timeout": self.read_timeout, "max_line_size": self.max_line_size,
                "max_field_size": self.max_field_size, "max_headers": self.max_headers,
                "lingering_time": 1.0, "access_log": None}


REASONS = {
    "connection_limit": "over --web.max-connections (total or per client address)",
    "tls_handshake": "TLS handshake failed or did not finish in time",
    "header_timeout": "request not complete within --web.read-timeout",
    "write_timeout": "response not read by the client within --web.write-timeout",
    "request_too_large": "request line, a header or the number of headers over the limits",
    "malformed_request": "not parseable as HTTP/1.1",
    "client_certificate": "no client certificate, or none of its SANs allowed",
    "unauthorized": "no or wrong credentials (401)",
    "auth_busy": "too many password checks already running (503)",
}
RELOADED_FILES = ("certificate", "bearer_token")


class Refusals:
    """Thread-safe counters: refusals come from the event loop, reloads too,
    and /metrics is rendered on the scrape worker thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._refused = dict.fromkeys(REASONS, 0)
        self._reloads = {(f, r): 0 for f in RELOADED_FILES for r in ("success", "failure")}
        self._last_ok = dict.fromkeys(RELOADED_FILES, 1)

    def refuse(self, reason: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}")
        with self._lock:
            self._refused[reason] += 1

    def reloaded(self, file: str, ok: bool) -> None:
        with self._lock:
            self._reloads[(file, "success" if ok else "failure")] += 1
            self._last_ok[file] = 1 if ok else 0

    def count(self, reason: str) -> int:
        with self._lock:
            return self._refused[reason]

    def families(self) -> list[Family]:
        refused = Family("planewatch_http_refused_total", COUNTER,
                         "Connections or requests the HTTP server refused, by reason.", ("reason",))
        reloads = Family("planewatch_web_config_reloads_total", COUNTER,
                         "Re-reads of a changed web config file (TLS certificate and key, "
                         "bearer token file), by result; a failure keeps the previous one.",
                         ("file", "result"))
        last = Family("planewatch_web_config_last_reload_success", GAUGE,
                      "0 when the latest change of the file could not be loaded (the previous "
                      "certificate or tokens are still in use), else 1.", ("file",))
        with self._lock:
            for reason, n in sorted(self._refused.items()):
                refused.add((reason,), n)
            for (file, result), n in sorted(self._reloads.items()):
                reloads.add((file, result), n)
            for file, ok in sorted(self._last_ok.items()):
                last.add((file,), ok)
        return [refused, reloads, last]


# The process's counters (one HTTP server per process); tests make their own.
REFUSALS = Refusals()
