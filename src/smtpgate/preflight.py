"""Start-up checks shared by ``smtpgate check-config`` and ``smtpgate serve``.

Entry point: :func:`preflight`. :func:`~smtpgate.config.load_config` checks what can be
checked from the file alone (types, ranges, syntax, files that must exist, the relay URL
through :func:`~smtpgate.delivery.url.parse_relay_url`); :func:`preflight` checks what
``serve`` needs from the machine before it binds a socket: hooks and the authenticator
import, TLS certificates and CA files load, the users file parses, the Maildir, spool,
quarantine and pid-file directories can be created and written, listener host names
resolve, implicit-TLS listeners have a certificate, the scanners can be built.
Both commands run the same function, so a configuration ``check-config`` accepts is one
``serve`` starts with (bind failures and a spool locked by another server aside: those
are run-time conditions).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import tempfile

from .config import Config, ListenAddress
from .errors import ConfigError

__all__ = ["check_writable_dir", "preflight"]


def check_writable_dir(path: str, subdirs: tuple[str, ...] = ()) -> str | None:
    """Say why ``path`` cannot be used as a directory smtpgate writes to (None: it can).

    Nothing is left behind: an existing directory is probed by creating and removing a
    temporary file in it (also in each existing entry of ``subdirs``); a missing one by
    creating and removing a temporary directory in its nearest existing ancestor. A probe
    is used rather than :func:`os.access`, which says yes to root on read-only or
    virtual file systems such as ``/proc``.

    Args:
        path: directory path (a relative one is taken from the current directory).
        subdirs: sub-directories that will be written too (``tmp``, ``new``, ...).

    Returns:
        ``None``, or the reason, e.g. ``"cannot create /proc/x: No such file or directory"``.
    """
    path = os.path.abspath(path)
    if os.path.lexists(path):
        if not os.path.isdir(path):
            return f"{path} exists and is not a directory"
        for sub in ("", *subdirs):
            where = os.path.join(path, sub) if sub else path
            if sub and not os.path.lexists(where):
                continue
            if not os.path.isdir(where):
                return f"{where} exists and is not a directory"
            why = _probe_write(where)
            if why is not None:
                return why
        return None
    parent = os.path.dirname(path.rstrip(os.sep)) or os.sep
    while not os.path.lexists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.path.isdir(parent):
        return f"cannot create {path}: {parent} is not a directory"
    try:
        probe = tempfile.mkdtemp(prefix=".smtpgate-probe-", dir=parent)
    except OSError as exc:
        return f"cannot create {path}: {exc.strerror or exc}"
    os.rmdir(probe)
    return None


def _check_file_dir(path: str) -> str | None:
    """Say why the file ``path`` (pid file) cannot be written and removed (None: it can)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return f"{path} is a directory"
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        return f"directory {parent} does not exist"
    return _probe_write(parent)


def _probe_write(directory: str) -> str | None:
    """Create and remove a file in ``directory``; say why that fails (None: it works).

    A probe, not :func:`os.access`, which says yes to root on read-only or virtual file
    systems such as ``/proc``.
    """
    try:
        fd, probe = tempfile.mkstemp(prefix=".smtpgate-probe-", dir=directory)
    except OSError as exc:
        return f"cannot write into {directory}: {exc.strerror or exc}"
    os.close(fd)
    os.unlink(probe)
    return None


def _check_listen(key: str, addr: ListenAddress, problems: list[str]) -> None:
    """A host name in a listen address must resolve (``serve`` binds its addresses)."""
    try:
        ipaddress.ip_address(addr.host)
        return
    except ValueError:
        pass
    try:
        socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM,
                           flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        why = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        problems.append(f"{key}: cannot resolve {addr.host!r}: {why}")


def preflight(cfg: Config, *, listeners: bool = True) -> None:
    """Check everything ``serve`` needs at start that the file alone cannot tell.

    Run by ``smtpgate check-config`` and ``smtpgate serve`` (before anything starts), and by
    ``bsmtp``/``inetd``/``policy-test`` with ``listeners=False``. Creates nothing and
    changes nothing (write probes are removed at once).

    Checks: hooks (``[hooks]``, ``auth.authenticator``) import and are callable; the
    ``[tls]`` certificate/key/CA files load; ``relay.cafile`` loads; the users file parses;
    the relay (or MX) delivery can be built with ``server.hostname`` as EHLO name; in queue
    mode ``queue.path`` can be created and written, in local mode with an empty
    ``relay.url`` ``maildir.path``; each ``[[scanner]]`` can be built and its
    ``quarantine_path`` written; ``server.pid_file``'s directory is writable; every
    ``[[listener]]`` with ``tls = "implicit"`` has a certificate; host names in listen
    addresses resolve; with ``server.workers > 1`` no listener has port 0.

    Args:
        cfg: a loaded configuration (paths already absolute).
        listeners: also check what only the listening server uses (listen addresses,
            ``[[listener]]``, ``pid_file``).

    Raises:
        ConfigError: listing every problem found, each starting with its dotted key.
    """
    problems: list[str] = []
    _check_code(cfg, problems)
    _check_tls(cfg, problems)
    _check_delivery(cfg, problems)
    _check_scanners(cfg, problems)
    if listeners:
        _check_listeners(cfg, problems)
    if problems:
        raise ConfigError(problems)


def _check_code(cfg: Config, problems: list[str]) -> None:
    from .hooks import load_callable

    hooks = cfg.hooks
    for point in (*hooks.POINTS, "address_check"):
        for i, spec in enumerate(getattr(hooks, point)):
            key = f"hooks.{point}" if len(getattr(hooks, point)) == 1 else f"hooks.{point}[{i}]"
            try:
                load_callable(spec, key)
            except ConfigError as exc:
                problems.extend(exc.problems)
    if cfg.auth.authenticator:
        try:
            load_callable(cfg.auth.authenticator, "auth.authenticator")
        except ConfigError as exc:
            problems.extend(exc.problems)


def _check_tls(cfg: Config, problems: list[str]) -> None:
    tls = cfg.tls
    if tls.certificate:
        from .server import server_tls_context

        try:
            server_tls_context(tls.certificate, tls.key, cafile=tls.cafile, capath=tls.capath,
                               ciphers=tls.ciphers, min_version=tls.min_version)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if cfg.relay.cafile:
        try:
            ssl.create_default_context(cafile=cfg.relay.cafile)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"relay.cafile: cannot load {cfg.relay.cafile}: {exc}")
    if cfg.auth.users_file:
        from .auth.users import load_users

        try:
            load_users(cfg.auth.users_file)
        except ConfigError as exc:
            problems.extend(f"auth.users_file: {p}" for p in exc.problems)
        except OSError as exc:
            problems.append(f"auth.users_file: cannot read {cfg.auth.users_file}: "
                            f"{exc.strerror or exc}")


def _check_delivery(cfg: Config, problems: list[str]) -> None:
    mode = cfg.delivery_mode
    url = cfg.relay.url
    if mode == "queue":
        why = check_writable_dir(cfg.queue.path)
        if why:
            problems.append(f"queue.path: {why}")
    elif mode == "local" and not url:
        why = check_writable_dir(cfg.maildir.path, ("tmp", "new", "cur"))
        if why:
            problems.append(f"maildir.path: {why}")
    elif mode == "capture":
        database = os.path.abspath(cfg.capture.database)
        if os.path.isdir(database):
            problems.append(f"capture.database: {database} is a directory")
        elif os.path.exists(database) and not os.access(database, os.R_OK | os.W_OK):
            problems.append(f"capture.database: {database} cannot be read and written")
        else:
            why = check_writable_dir(os.path.dirname(database))
            if why:  # SQLite writes its journal files beside the database
                problems.append(f"capture.database: {why}")
    if url == "mx:":
        from .delivery.mx import MxDelivery

        try:
            MxDelivery(helo_name=cfg.server.hostname, port=cfg.delivery.mx_port)
        except ConfigError as exc:
            problems.extend(f"server.hostname: {p}" for p in exc.problems)
        from .dns import make_resolver

        try:  # MX delivery looks names up: the [dns] resolver must be usable
            make_resolver(cfg.dns.nameservers, port=cfg.dns.port)
        except ConfigError as exc:
            problems.extend(f"dns.nameservers: {p}" for p in exc.problems)
    elif url and url != "discard:":
        from .delivery.upstream import UpstreamDelivery

        try:
            UpstreamDelivery(url, timeout=cfg.relay.timeout, helo_name=cfg.server.hostname,
                             cafile=cfg.relay.cafile or None)
        except ConfigError as exc:
            for p in exc.problems:
                problems.append(f"server.hostname: {p}" if p.startswith("helo_name")
                                else f"relay.url: {p}")


def _check_scanners(cfg: Config, problems: list[str]) -> None:
    if not cfg.scanners:
        return
    from .scanners.stage import ScannerSet

    for i, sc in enumerate(cfg.scanners):
        try:
            ScannerSet.from_config([sc], cfg.server.hostname)
        except ConfigError as exc:
            problems.extend(f"scanner[{i}]: {p}" for p in exc.problems)
        except (ValueError, OSError) as exc:
            problems.append(f"scanner[{i}]: {exc}")
        if sc.quarantine_path:
            why = check_writable_dir(sc.quarantine_path, ("tmp", "new", "cur"))
            if why:
                problems.append(f"scanner[{i}].quarantine_path: {why}")


def _check_listeners(cfg: Config, problems: list[str]) -> None:
    for i, addr in enumerate(cfg.server.listen):
        key = "server.listen" if len(cfg.server.listen) == 1 else f"server.listen[{i}]"
        _check_listen(key, addr, problems)
    for i, lc in enumerate(cfg.listeners):
        if lc.tls == "implicit" and not cfg.tls.certificate:
            problems.append(f'listener[{i}].tls: "implicit" needs [tls] certificate')
        _check_listen(f"listener[{i}].address", lc.listen, problems)
    _check_workers(cfg, problems)
    pid_file = cfg.server.pid_file
    if pid_file:
        why = _check_file_dir(pid_file)
        if why:
            problems.append(f"server.pid_file: {why}")


def _check_workers(cfg: Config, problems: list[str]) -> None:
    """``server.workers > 1`` needs ``SO_REUSEPORT`` and a fixed port on every listener:
    each worker binds every address itself, so port 0 would give each its own port."""
    if cfg.server.workers == 1:
        return
    if not hasattr(socket, "SO_REUSEPORT"):
        problems.append(f"server.workers: {cfg.server.workers} needs SO_REUSEPORT, which "
                        "this system lacks; use workers = 1")
    for i, addr in enumerate(cfg.server.listen):
        if addr.port == 0:
            key = "server.listen" if len(cfg.server.listen) == 1 else f"server.listen[{i}]"
            problems.append(f"{key}: port 0 cannot be shared by server.workers = "
                            f"{cfg.server.workers} processes; give a fixed port")
    for i, lc in enumerate(cfg.listeners):
        if lc.listen.port == 0:
            problems.append(f"listener[{i}].address: port 0 cannot be shared by "
                            f"server.workers = {cfg.server.workers} processes; give a fixed port")
