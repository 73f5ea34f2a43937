"""The admin HTTP listener: one aiohttp application in the server's event loop.

Routes come from three modules, each with ``add_routes(app)``: :mod:`.api` (the JSON
API under ``/api/`` and its OpenAPI description), :mod:`.messages` (captured and
quarantined mail under ``/api/messages``) and :mod:`.web` (the HTML page). ``/metrics``
is served here (Prometheus text format, :func:`smtpgate.metrics.exposition`).

Access: with ``[admin] token_file`` set, every request but ``/metrics`` needs
``Authorization: Bearer TOKEN`` (or the ``smtpgate_token`` cookie the page's login form
sets); without it the listener may only bind loopback addresses (checked by the
configuration).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from ..config import AdminConfig, parse_listen
from ..errors import ConfigError
from ..metrics import exposition

if TYPE_CHECKING:
    from ..app import Smtpgate

log = logging.getLogger("smtpgate.admin")

#: The running :class:`~smtpgate.app.Smtpgate`, for route handlers: ``request.app[GATE]``.
GATE: web.AppKey[Smtpgate] = web.AppKey("smtpgate")
#: The bearer token required by the routes ("" = none).
TOKEN: web.AppKey[str] = web.AppKey("token", str)
#: Paths served without the token.
OPEN_PATHS = frozenset({"/metrics"})
#: Name of the cookie the page's login form sets to the token.
TOKEN_COOKIE = "smtpgate_token"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def read_token(path: str) -> str:
    """Read the bearer token from ``path`` (surrounding whitespace stripped).

    Raises:
        ConfigError: the file cannot be read or is empty (naming ``admin.token_file``).
    """
    if not path:
        return ""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"admin.token_file: cannot read {path}: {exc}"]) from None
    if not token:
        raise ConfigError([f"admin.token_file: {path} is empty"])
    return token


def presented_token(request: web.Request) -> str:
    """The token a request carries: ``Authorization: Bearer TOKEN`` or the cookie."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(TOKEN_COOKIE, "")


@web.middleware
async def _require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[TOKEN]
    if not token or request.path in OPEN_PATHS or request.path == "/login":
        return await handler(request)
    if hmac.compare_digest(presented_token(request).encode(), token.encode()):
        return await handler(request)
    if request.path.startswith("/api/"):
        return web.json_response({"error": "a valid bearer token is required"}, status=401,
                                 headers={"WWW-Authenticate": 'Bearer realm="smtpgate"'})
    raise web.HTTPSeeOther("/login")


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Under ``/api/``, answer every error as JSON ``{"error": "..."}`` with its status
    (unknown route 404, wrong method 405 with ``Allow``, a body over 1 MiB 413) and an
    unexpected exception as 500 (logged with its traceback): never an HTML page or a
    traceback to the client."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items()
                   if k.lower() in ("allow", "www-authenticate", "retry-after")}
        return web.json_response({"error": exc.reason if exc.text is None
                                  or exc.text.startswith(f"{exc.status}:")
                                  else exc.text},
                                 status=exc.status, headers=headers)
    except Exception:
        log.exception("admin: %s %s failed", request.method, request.path)
        return web.json_response({"error": "internal error (logged by the server)"},
                                 status=500)


async def _metrics(_request: web.Request) -> web.Response:
    body, content_type = exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


def make_app(gate: Smtpgate, token: str = "") -> web.Application:
    """Build the admin application for ``gate`` (routes of :mod:`.api`, :mod:`.messages`,
    :mod:`.web`, and ``/metrics``), requiring ``token`` when not empty."""
    from . import api, messages
    from . import web as page

    app = web.Application(middlewares=[_json_errors, _require_token],
                          client_max_size=1 << 20)
    app[GATE] = gate
    app[TOKEN] = token
    app.router.add_get("/metrics", _metrics)
    api.add_routes(app)
    messages.add_routes(app)
    page.add_routes(app)
    return app


class AdminServer:
    """The admin listener of one :class:`~smtpgate.app.Smtpgate`.

    Args:
        gate: the server it administers.
        config: ``[admin]``; ``listen`` must be set.

    Raises:
        ConfigError: unreadable or empty token file (from :meth:`start`).
    """

    def __init__(self, gate: Smtpgate, config: AdminConfig) -> None:
        self.gate = gate
        self.config = config
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    async def start(self) -> None:
        """Bind ``[admin] listen`` and start serving.

        Raises:
            OSError: the address cannot be bound.
            ConfigError: the token file cannot be read.
        """
        token = read_token(self.config.token_file)
        address = parse_listen(self.config.listen)
        runner = web.AppRunner(make_app(self.gate, token), access_log=None,
                               handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._site = runner, site
        log.info("admin listener on http://%s:%d/", *self.address)

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)`` (port 0 resolved); ``("", 0)`` when not started."""
        if self._runner is None:
            return ("", 0)
        for addr in self._runner.addresses:
            return (str(addr[0]), int(addr[1]))
        return ("", 0)

    async def stop(self) -> None:
        """Stop serving (requests in flight get a few seconds to finish)."""
        runner, self._runner, self._site = self._runner, None, None
        if runner is not None:
            await runner.cleanup()
