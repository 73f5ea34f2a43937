"""Authentication back ends that check SMTP AUTH (RFC 4954) credentials.

Entry points: the :class:`Authenticator` protocol, :class:`UsersFileAuthenticator`
(argon2 users file, reloaded on change) and :class:`CallableAuthenticator` (wraps
a plain function). A failing back end raises :class:`AuthError` (server: 454 4.7.0).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import inspect
import logging
import os
import secrets
import threading
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from argon2 import Parameters, extract_parameters
from argon2.exceptions import InvalidHashError
from argon2.profiles import get_default_parameters

from ..envelope import SessionInfo
from ..errors import AuthError, ConfigError
from .users import load_users, verify_password

__all__ = ["AuthFunc", "Authenticator", "CallableAuthenticator", "UsersFileAuthenticator"]

logger = logging.getLogger("smtpgate.auth")

AuthFunc = Callable[..., "bool | Awaitable[bool]"]
"""``(username, password) -> bool`` or ``(username, password, session) -> bool``,
sync or async."""


@runtime_checkable
class Authenticator(Protocol):
    """What the server calls to check a SASL identity and password (RFC 4954 §4).

    Implementations return True for valid credentials and False for invalid
    ones, and raise :class:`~smtpgate.errors.AuthError` when they cannot decide
    (back end down); the server answers 535 5.7.8 and 454 4.7.0 respectively.
    """

    async def authenticate(self, username: str, password: str, session: SessionInfo) -> bool:
        """Check ``username``/``password`` for the client of ``session``.

        Args:
            username: the authentication identity (UTF-8 decoded, RFC 4616).
            password: the clear-text password; must never be logged.
            session: facts about the client connection.

        Returns:
            True when the credentials are valid.

        Raises:
            AuthError: the back end failed (not: the credentials were wrong).
        """
        ...


def _scrub(text: str, password: str) -> str:
    """Remove the password from a text meant for the log."""
    if not password or password not in text:
        return text
    if len(password) < 4:
        # Replacing a short string would garble the text and reveal the password.
        return "<withheld: text may contain credentials>"
    return text.replace(password, "***")


def _log_backend_failure(backend: str, username: str, password: str, exc: BaseException) -> None:
    detail = _scrub("".join(traceback.format_exception(exc)).rstrip(), password)
    logger.error(
        "authentication back end %s failed for user %r: %s",
        backend,
        username,
        _scrub(f"{type(exc).__name__}: {exc}", password),
    )
    logger.debug("back end %s traceback:\n%s", backend, detail)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _dummy_hash(params: Parameters) -> str:
    """A PHC string with ``params`` and random salt/digest matching no password.

    Verifying against it costs exactly as much as verifying a real hash with the
    same parameters, without spending a hash computation to make it.
    """
    return (
        f"$argon2{params.type.name.lower()}$v={params.version}"
        f"$m={params.memory_cost},t={params.time_cost},p={params.parallelism}"
        f"${_b64(secrets.token_bytes(params.salt_len))}"
        f"${_b64(secrets.token_bytes(params.hash_len))}"
    )


def _params_key(p: Parameters) -> tuple[Any, ...]:
    return (p.type, p.version, p.salt_len, p.hash_len, p.time_cost, p.memory_cost, p.parallelism)


class UsersFileAuthenticator:
    """Checks credentials against an argon2 users file (see :mod:`smtpgate.auth.users`).

    The file is re-read when its mtime, size or inode changes, checked at most
    once per ``reload_interval`` seconds. A reload that fails (file missing or
    malformed) is logged and the previous table stays in force. Verification
    runs in a worker thread (``asyncio.to_thread``; one argon2id verification
    with the default parameters takes ~100 ms of CPU and 64 MiB of memory) and
    at most ``max_concurrent`` run at a time. An unknown user costs one
    verification against a dummy hash with the file's most common parameters,
    so response timing does not reveal which users exist.

    Args:
        path: the users file.
        reload_interval: minimum seconds between two change checks.
        max_concurrent: maximum simultaneous verifications (bounds CPU and
            memory under an AUTH flood); default: the number of CPUs, at least 2.
        clock: monotonic clock in seconds (injectable for tests).

    Raises:
        ConfigError: when the file cannot be read or is malformed at start-up.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        reload_interval: float = 1.0,
        max_concurrent: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = Path(path)
        self._reload_interval = reload_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._limit = max_concurrent or max(2, os.cpu_count() or 1)
        self._semaphore: asyncio.Semaphore | None = None
        self._users: dict[str, str] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._dummy = ""
        self._next_check = 0.0
        try:
            self._load()
        except OSError as exc:
            raise ConfigError(f"{self._path}: cannot read users file: {exc.strerror}") from None

    @property
    def path(self) -> Path:
        """The users file."""
        return self._path

    def usernames(self) -> frozenset[str]:
        """The names in the table currently in force."""
        return frozenset(self._users)

    def _stat(self) -> tuple[int, int, int]:
        st = self._path.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> None:
        """Read the file and swap the table in (raises OSError/ConfigError)."""
        stamp = self._stat()
        users = load_users(self._path)
        counts: Counter[tuple[Any, ...]] = Counter()
        by_key: dict[tuple[Any, ...], Parameters] = {}
        for pw_hash in users.values():
            try:
                params = extract_parameters(pw_hash)
            except InvalidHashError:  # pragma: no cover - load_users validated it
                continue
            key = _params_key(params)
            counts[key] += 1
            by_key[key] = params
        params = by_key[counts.most_common(1)[0][0]] if counts else get_default_parameters()
        dummy = _dummy_hash(params)
        with self._lock:
            self._users, self._stamp, self._dummy = users, stamp, dummy
        logger.info("users file %s: loaded %d user(s)", self._path, len(users))

    def reload_if_changed(self, force: bool = False) -> bool:
        """Re-read the file if it changed (or ``force``); blocking file I/O.

        Returns:
            True if a new table was loaded. Errors are logged, not raised; the
            old table stays in force.
        """
        now = self._clock()
        with self._lock:
            if not force and now < self._next_check:
                return False
            self._next_check = now + self._reload_interval
            old = self._stamp
        try:
            if not force and self._stat() == old:
                return False
            self._load()
        except (OSError, ConfigError) as exc:
            logger.error("users file %s: reload failed, keeping old table: %s", self._path, exc)
            return False
        return True

    def _check(self, username: str, password: str) -> bool:
        self.reload_if_changed()
        with self._lock:
            pw_hash = self._users.get(username)
            dummy = self._dummy
        if pw_hash is None:
            verify_password(dummy, password)  # equal cost; result ignored
            return False
        return verify_password(pw_hash, password)

    async def authenticate(self, username: str, password: str, session: SessionInfo) -> bool:
        """Check credentials against the users file (see :class:`Authenticator`).

        Raises:
            AuthError: on an unexpected failure of the verification thread.
        """
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self._limit)
        try:
            async with self._semaphore:
                ok = await asyncio.to_thread(self._check, username, password)
        except Exception as exc:
            _log_backend_failure(f"users file {self._path}", username, password, exc)
            raise AuthError("authentication back end failed") from None
        if not ok:
            logger.debug("session %s: authentication failed for %r", session.session_id, username)
        return ok


def _is_async(func: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(func):
        return True
    call = getattr(func, "__call__", None)  # noqa: B004 - async __call__ on instances
    return call is not None and inspect.iscoroutinefunction(call)


def _wants_session(func: Callable[..., Any]) -> bool:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return False  # no introspectable signature: assume the 2-argument form
    for n in (3, 2):
        try:
            sig.bind(*([None] * n))
        except TypeError:
            continue
        return n == 3
    raise TypeError(
        "authenticator callable must accept (username, password) or (username, password, session)"
    )


class CallableAuthenticator:
    """Adapts a function to the :class:`Authenticator` protocol.

    The function is ``(username, password) -> bool`` or
    ``(username, password, session) -> bool``, a plain or ``async`` function
    (or returns an awaitable). Arity and async-ness are decided once, here.
    Plain functions run in a worker thread (they may block on LDAP, PAM, a
    database) unless ``run_in_thread`` is false. Any exception, or a result
    that is not a ``bool``, becomes :class:`AuthError`; it is logged with the
    password scrubbed from the message and traceback.

    Args:
        func: the check function.
        run_in_thread: run a plain (non-async) function via ``asyncio.to_thread``.
        name: the back end's name in log lines (default: the function's name).

    Raises:
        TypeError: when ``func`` is not callable or accepts neither 2 nor 3
            positional arguments.
    """

    def __init__(
        self, func: AuthFunc, *, run_in_thread: bool = True, name: str | None = None
    ) -> None:
        if not callable(func):
            raise TypeError("authenticator must be callable")
        self._func = func
        self._pass_session = _wants_session(func)
        self._async = _is_async(func)
        self._run_in_thread = run_in_thread and not self._async
        self._name = name or getattr(func, "__qualname__", None) or repr(func)

    @property
    def passes_session(self) -> bool:
        """True when the function is called with the session as third argument."""
        return self._pass_session

    def __repr__(self) -> str:
        return f"CallableAuthenticator({self._name})"

    async def authenticate(self, username: str, password: str, session: SessionInfo) -> bool:
        """Call the function (see :class:`Authenticator`).

        Raises:
            AuthError: the function raised or returned a non-bool.
        """
        args: tuple[Any, ...] = (
            (username, password, session) if self._pass_session else (username, password)
        )
        try:
            if self._run_in_thread:
                result: Any = await asyncio.to_thread(functools.partial(self._func, *args))
            else:
                result = self._func(*args)
            if inspect.isawaitable(result):
                result = await result
            if not isinstance(result, bool):
                raise TypeError(f"returned {type(result).__name__}, expected bool")
        except Exception as exc:
            _log_backend_failure(self._name, username, password, exc)
            raise AuthError(f"authentication back end {self._name} failed") from None
        if not result:
            logger.debug("session %s: authentication failed for %r", session.session_id, username)
        return result
