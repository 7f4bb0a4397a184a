"""The serve room: `/healthz`, `/metrics` and `/runs` on `HTTP_ADDR`, bounded.

The status server must never cost the daemon its real job. 1,100 idle connections once
exhausted the process's 1,024 file descriptors and no run settled, so: at most
`max_connections` connections are served at a time (the next ones get a one-line 503 and
are closed at once), an idle connection is closed after `idle_timeout` (aiohttp's
keep-alive timer also runs before the first request), and refusals are counted and
logged at most once a minute. Handlers only read what the other rooms keep in memory.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from tokensettle.config import http_addr_problem

log = structlog.get_logger("tokensettle.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 36\r\n"
    b"Connection: close\r\n\r\ntoo many connections; try again soon\n"
)


class BindError(Exception):
    """The address cannot be listened on. `str()` is one line naming the setting."""


class _Refuse(asyncio.Protocol):
    """Answers 503 and hangs up: what a connection over the limit gets."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.Transport):
            transport.write(_BUSY)
        transport.close()


class BoundedSite(web.BaseSite):
    """A TCP site that serves at most `limit` connections at once."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        limit: int,
        on_refused: Callable[[], None],
    ) -> None:
        super().__init__(runner, backlog=128)
        self._host, self._port = host, port
        self._limit = limit
        self._on_refused = on_refused

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None

        def factory() -> asyncio.Protocol:
            if len(server.connections) >= self._limit:
                self._on_refused()
                return _Refuse()
            return server()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            factory, self._host, self._port, backlog=self._backlog, reuse_address=True
        )


#: Paths a monitoring system polls: never behind the token.
OPEN_PATHS = frozenset({"/healthz", "/metrics"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guard(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response(
                    {"error": "this path needs Authorization: Bearer <TOKENSETTLE_HTTP_TOKEN>"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="tokensettle"'},
                )
        return await handler(request)

    return guard


class StatusServer:
    def __init__(
        self,
        addr: str,
        bind: tuple[str, int],
        routes: dict[str, Handler],
        *,
        token: str | None = None,
        max_connections: int = 64,
        idle_timeout: float = 15.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.addr = addr
        self.bind = bind
        self.routes = routes
        self.token = token
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.refused = 0
        self._monotonic = monotonic
        self._last_refusal_log = -float("inf")
        self._runner: web.AppRunner | None = None
        self.on_refused: Callable[[], None] = lambda: None

    def _refused(self) -> None:
        self.refused += 1
        self.on_refused()
        now = self._monotonic()
        if now - self._last_refusal_log >= 60:
            self._last_refusal_log = now
            log.warning(
                "http.connections_refused",
                limit=self.max_connections,
                refused_total=self.refused,
                detail="the status server is at its connection limit; runs keep settling",
            )

    async def start(self) -> None:
        host, port = self.bind
        app = web.Application(middlewares=[_guard(self.token)] if self.token else [])
        for path, handler in self.routes.items():
            app.router.add_get(path, handler)
        runner = web.AppRunner(
            app, access_log=None, keepalive_timeout=self.idle_timeout, handle_signals=False
        )
        await runner.setup()
        site = BoundedSite(runner, host, port, limit=self.max_connections, on_refused=self._refused)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise BindError(str(http_addr_problem(self.addr, exc))) from None
        self._runner = runner
        log.info(
            "http.listening",
            addr=self.addr,
            max_connections=self.max_connections,
            token_required=self.token is not None,
        )
        if self.token is None and not is_loopback(host):
            log.warning(
                "http.unprotected",
                addr=self.addr,
                detail="listening beyond loopback without TOKENSETTLE_HTTP_TOKEN: anyone who "
                "can reach it sees the runs and the report",
            )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def probe_bind(host: str, port: int) -> OSError | None:
    """Bind `host:port` as the server will (every address the name resolves to,
    SO_REUSEADDR, IPv6 sockets v6-only) and close at once; the OSError if that fails.
    Nothing is listened on or sent. The daemon calls it before starting anything, doctor
    to check the configuration."""
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_ADDRCONFIG
        )
    except OSError as exc:  # socket.gaierror: the name does not resolve
        return exc
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
        except OSError as exc:
            return exc
    return None
