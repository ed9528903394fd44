"""Checking each request against the web config: client SANs, basic auth, bearer tokens.

Everything here treats the request as hostile: any header bytes (not UTF-8, not
base64, a password longer than bcrypt's 72 bytes) end in 401, never in a 500;
bcrypt work is bounded (a flood of wrong passwords gets a fast 503 instead of
queueing behind the CPU); token and user checks take the same time whether or
not the token or user exists.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hashlib
import hmac
import logging
import os
import time
from typing import Mapping

import bcrypt
from aiohttp import web

from exporters.httpstats import REFUSALS, Refusals

log = logging.getLogger(__name__)

UNAUTHENTICATED_PATHS = frozenset({"/healthz", "/readyz"})

# How long a successful bcrypt check is remembered, refreshed on every use: a
# Prometheus scraping every 15-60 s pays bcrypt (~60-100 ms at cost 10) once.
AUTH_CACHE_SECONDS = 60.0
AUTH_CACHE_MAX_ENTRIES = 256
# bcrypt checks running (BCRYPT_THREADS) plus waiting: beyond that a request is
# refused at once. Two threads: a flood of wrong passwords cannot take every core.
BCRYPT_THREADS = 2
BCRYPT_MAX_PENDING = 8
BCRYPT_MAX_PASSWORD = 72        # bytes; bcrypt ignores (v5: refuses) anything longer
# A token file is stat'ed at most this often to notice a rotation.
TOKEN_RECHECK_SECONDS = 1.0


class AuthBusy(Exception):
    """Too many bcrypt checks are already running or waiting."""


def cert_sans(peercert: dict | None) -> set[str]:
    """All subjectAltName values of a verified peer certificate (DNS, IP, URI, email)."""
    return {value for _kind, value in (peercert or {}).get("subjectAltName", ())}


def parse_authorization(header: str) -> tuple[str, str | bytes] | None:
    """("basic", (user, password)) / ("bearer", token) / None for anything else.

    aiohttp hands over header bytes that are not UTF-8 as surrogate escapes:
    they are taken back to bytes, so a token is compared byte for byte and a
    non-UTF-8 basic credential is simply not one."""
    raw = header.encode("utf-8", "surrogateescape") if isinstance(header, str) else bytes(header)
    scheme, _, value = raw.strip().partition(b" ")
    value = value.strip()
    if scheme.lower() == b"bearer" and value:
        return "bearer", value
    if scheme.lower() == b"basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):       # UnicodeDecodeError is a ValueError
            return None
        user, sep, password = decoded.partition(":")
        return ("basic", (user, password)) if sep else None
    return None


def parse_tokens(text: str) -> tuple[bytes, ...]:
    """One token per non-empty line; surrounding whitespace is not part of a token."""
    return tuple(line.strip().encode() for line in text.splitlines() if line.strip())


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def token_matches(token: bytes, tokens: tuple[bytes, ...]) -> bool:
    """Compare digests (same length whatever the token's) against every
    configured token, no early exit: the time says nothing about which, or
    how much of one, matched."""
    wanted = _digest(token)
    found = False
    for candidate in tokens:
        found |= hmac.compare_digest(wanted, _digest(candidate))
    return found


class BasicAuthChecker:
    """bcrypt checks off the event loop, bounded, with successes kept briefly.

    Only successes are cached: a wrong password always pays the full bcrypt
    cost, which is what slows guessing. The cache key is a digest of user,
    stored hash and password, so a changed hash invalidates it.
    """

    def __init__(self, users: Mapping[str, bytes], ttl: float = AUTH_CACHE_SECONDS,
                 clock=time.monotonic, max_pending: int = BCRYPT_MAX_PENDING):
        self._users = dict(users)
        # An unknown user is checked against a real hash anyway so that the
        # answer takes as long as for a known one (no user enumeration by timing).
        self._decoy = next(iter(self._users.values()), None)
        self._ttl = ttl
        self._clock = clock
        self._ok: dict[bytes, float] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(BCRYPT_THREADS, thread_name_prefix="bcrypt")
        self._max_pending = max_pending
        self._pending = 0

    async def check(self, user: str, password: str) -> bool:
        """True for a right password; raises AuthBusy when bcrypt is saturated."""
        hashed = self._users.get(user)
        known = hashed is not None
        if not known:
            hashed = self._decoy
        if hashed is None:
            return False
        secret = password.encode("utf-8", "surrogateescape")
        if len(secret) > BCRYPT_MAX_PASSWORD:
            return False            # can never match: bcrypt hashes only 72 bytes
        key = hashlib.sha256(b"\0".join((user.encode("utf-8", "surrogateescape"), hashed, secret))).digest()
        now = self._clock()
        if known and self._ok.get(key, 0.0) > now:
            self._ok[key] = now + self._ttl             # refreshed on use
            return True
        if self._pending >= self._max_pending:
            raise AuthBusy()
        self._pending += 1
        try:
            good = await asyncio.get_running_loop().run_in_executor(
                self._pool, _checkpw, secret, hashed)
        finally:
            self._pending -= 1
        if good and known:
            self._remember(key, self._clock())
        return good and known

    def _remember(self, key: bytes, now: float) -> None:
        if len(self._ok) >= AUTH_CACHE_MAX_ENTRIES:
            self._ok = {k: t for k, t in self._ok.items() if t > now}
            if len(self._ok) >= AUTH_CACHE_MAX_ENTRIES:
                self._ok.pop(next(iter(self._ok)))
        self._ok[key] = now + self._ttl


def _checkpw(secret: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(secret, hashed)
    except ValueError:          # a NUL byte or similar the library refuses
        return False


class TokenFile:
    """The bearer tokens, re-read when the file changes (a rotated Secret).

    The file is stat'ed at most once a second; a change that leaves it
    unreadable or empty keeps the tokens in force and is counted, so a
    half-written file never locks Prometheus out."""

    def __init__(self, path: str, tokens: tuple[bytes, ...], refusals: Refusals = REFUSALS,
                 clock=time.monotonic):
        self.path = path
        self.tokens = tokens
        self._refusals = refusals
        self._clock = clock
        self._signature = _signature(path) if path else None
        self._next_check = 0.0

    def current(self) -> tuple[bytes, ...]:
        if not self.path:
            return self.tokens
        now = self._clock()
        if now < self._next_check:
            return self.tokens
        self._next_check = now + TOKEN_RECHECK_SECONDS
        signature = _signature(self.path)
        if signature == self._signature:
            return self.tokens
        self._signature = signature
        try:
            with open(self.path, encoding="utf-8") as f:
                tokens = parse_tokens(f.read(1 << 20))
        except (OSError, ValueError) as err:
            tokens, why = (), str(err)
        else:
            why = "holds no token"
        if not tokens:
            log.warning("bearer_token_file %s changed but %s; keeping the previous tokens",
                        self.path, why)
            self._refusals.reloaded("bearer_token", False)
            return self.tokens
        log.info("bearer_token_file %s re-read: %d token(s)", self.path, len(tokens))
        self._refusals.reloaded("bearer_token", True)
        self.tokens = tokens
        return tokens


def _signature(path: str) -> tuple | None:
    """What changes when a file (or the symlink a Secret volume swaps) is replaced."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def challenge_headers(basic: bool, bearer: bool) -> list[tuple[str, str]]:
    headers = []
    if basic:
        headers.append(("WWW-Authenticate", 'Basic realm="planewatch"'))
    if bearer:
        headers.append(("WWW-Authenticate", 'Bearer realm="planewatch"'))
    return headers


def make_middleware(users: Mapping[str, bytes], tokens: TokenFile, allowed_sans: set[str],
                    refusals: Refusals = REFUSALS):
    checker = BasicAuthChecker(users)
    auth_required = bool(users or tokens.tokens)

    @web.middleware
    async def web_config_middleware(request: web.Request, handler):
        if allowed_sans:
            # Checked per request, before the path exemption: like a failed
            # handshake in Go, a client with the wrong identity, or none, gets nothing.
            peercert = request.transport.get_extra_info("peercert") if request.transport else None
            if not peercert or not cert_sans(peercert) & allowed_sans:
                refusals.refuse("client_certificate")
                raise web.HTTPForbidden(text="client certificate missing or SAN not allowed\n")
        if not auth_required or request.path in UNAUTHENTICATED_PATHS:
            return await handler(request)
        try:
            ok = await _authorized(request.headers.get("Authorization", ""), users, tokens, checker)
        except AuthBusy:
            refusals.refuse("auth_busy")
            return web.Response(status=503, text="authentication busy, retry\n",
                                headers={"Retry-After": "1"})
        if ok:
            return await handler(request)
        refusals.refuse("unauthorized")
        response = web.Response(status=401, text="Unauthorized\n")
        for name, value in challenge_headers(bool(users), bool(tokens.tokens)):
            response.headers.add(name, value)
        return response

    return web_config_middleware


async def _authorized(header: str, users: Mapping[str, bytes], tokens: TokenFile,
                      checker: BasicAuthChecker) -> bool:
    parsed = parse_authorization(header)
    if parsed is None:
        return False
    scheme, credentials = parsed
    if scheme == "bearer":
        current = tokens.current()
        return bool(current) and token_matches(credentials, current)
    if not users:
        return False
    user, password = credentials
    return await checker.check(user, password)
