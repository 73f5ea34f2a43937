"""The CLI's client of the admin JSON API (``smtpgate sessions``, ``smtpgate reload``).

Entry points: :func:`admin_target` (where the API is and its token, from ``-c FILE``'s
``[admin]`` or ``--admin-url``), :func:`call` (one request through aiohttp's client, the
project's one HTTP stack), :class:`AdminCallError`. The API and its shapes are described
in docs/operations.md ("Admin API"); HTTP semantics are RFC 9110, the bearer token
RFC 6750.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from .config import Config, parse_listen
from .errors import ConfigError, SmtpgateError

__all__ = ["AdminCallError", "AdminTarget", "admin_target", "call"]

#: Seconds allowed for one API request (connect, send, read the reply).
TIMEOUT = 30.0


class AdminCallError(SmtpgateError):
    """A request to the admin API failed: the server cannot be reached, or it answered
    with an error status. ``str()`` is the one-line ``WHERE: CAUSE`` message.

    Attributes:
        status: the HTTP status of an error reply, ``None`` when there was no reply.
        exit_code: the CLI's exit code: 2 for a token the API refused (401/403: the
            ``token_file`` is wrong), 1 for everything else.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.exit_code = 2 if status in (401, 403) else 1


@dataclass(frozen=True, slots=True)
class AdminTarget:
    """Where the admin API is.

    Attributes:
        url: the base URL, ``http://host:port`` (no trailing slash).
        token: the bearer token (``""``: none is sent).
        origin: where the URL came from, for messages (``"FILE: admin.listen"`` or
            ``"--admin-url"``).
    """

    url: str
    token: str
    origin: str


def _connect_host(host: str) -> str:
    """The address to connect to for a listener bound to ``host`` (a wildcard address
    means this machine: loopback)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return host


def admin_target(cfg: Config, url: str | None = None) -> AdminTarget:
    """The admin API of the server that runs ``cfg``.

    Args:
        cfg: the configuration (``[admin] listen`` and ``token_file``).
        url: ``--admin-url`` (``http://host:port``), used instead of ``admin.listen``.

    Raises:
        ConfigError: neither ``url`` nor ``admin.listen`` is set (no admin listener is
            configured), or the token file cannot be read.
    """
    from .admin.server import read_token

    where = f"{cfg.source}: " if not cfg.source.startswith("<") else ""
    try:
        token = read_token(cfg.admin.token_file) if cfg.admin.token_file else ""
    except ConfigError as exc:
        raise ConfigError([f"{where}{p}" for p in exc.problems]) from None
    if url:
        return AdminTarget(url.rstrip("/"), token, "--admin-url")
    if not cfg.admin.listen:
        hint = "set [admin] listen" if where else "give -c FILE with [admin] listen"
        raise ConfigError([f"{where}admin.listen: no admin listener is configured "
                           f"({hint}, or use --admin-url)"])
    address = parse_listen(cfg.admin.listen)
    host = _connect_host(address.host)
    shown = f"[{host}]" if ":" in host else host
    return AdminTarget(f"http://{shown}:{address.port}", token, f"{where}admin.listen")


def _error_text(body: bytes) -> str:
    """The ``error`` member of a JSON error body, else the body's first line."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        text = data["error"]
    else:
        text = body.decode("utf-8", "replace")
    return " ".join(text.split())[:300]


async def _request(target: AdminTarget, method: str, path: str) -> tuple[int, bytes]:
    import aiohttp

    headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
    async with asyncio.timeout(TIMEOUT), aiohttp.ClientSession() as http, http.request(
        method, target.url + path, headers=headers, allow_redirects=False
    ) as response:
        return response.status, await response.read()


def call(target: AdminTarget, method: str, path: str, *, ok: tuple[int, ...] = (200,)) -> Any:
    """One API request; returns the parsed JSON reply.

    Args:
        target: from :func:`admin_target`.
        method: ``GET``, ``POST``, ...
        path: ``/api/...``.
        ok: statuses whose JSON body is returned (others raise).

    Raises:
        AdminCallError: connection refused or failed, no reply within :data:`TIMEOUT`
            seconds, a status not in ``ok`` (the API's ``error`` text in the message),
            or a reply that is not JSON.
    """
    import aiohttp

    where = f"{target.url}{path}"
    try:
        status, body = asyncio.run(_request(target, method, path))
    except TimeoutError:
        raise AdminCallError(f"{where}: no reply within {TIMEOUT:g}s") from None
    except aiohttp.ClientConnectorError as exc:
        error = exc.os_error
        cause = ("connection refused" if isinstance(error, ConnectionRefusedError)
                 else error.strerror or str(error))
        raise AdminCallError(f"{where}: cannot connect ({cause}; is smtpgate running with "
                             f"the admin listener of {target.origin}?)") from None
    except aiohttp.ClientError as exc:
        raise AdminCallError(f"{where}: {type(exc).__name__}: {exc}") from None
    if status not in ok:
        if status in (401, 403):
            why = ("the token of admin.token_file was refused" if target.token
                   else "a token is required: set admin.token_file")
            raise AdminCallError(f"{where}: HTTP {status}: {why}", status)
        raise AdminCallError(f"{where}: HTTP {status}: {_error_text(body)}", status)
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise AdminCallError(f"{where}: HTTP {status}: the reply is not JSON", status) from None
