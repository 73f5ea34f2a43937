"""An SQLite file shared by the processes of one host, used from the event loop.

Entry points: :class:`SqliteFile` (the base of the greylist and ratelimit plugins' SQLite
stores) and :func:`open_store` (a plugin's ``store`` option opened at registration).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import sqlite3
from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeVar

from . import OptionError, PluginRegistry

__all__ = ["SqliteFile", "open_store"]

_P = ParamSpec("_P")
_T = TypeVar("_T")
_S = TypeVar("_S", bound="SqliteFile")

#: Seconds a statement waits for another process's write lock (sqlite3 ``timeout``).
BUSY_TIMEOUT = 10.0


class SqliteFile:
    """One SQLite database file in WAL mode (readers never wait for the writer, and the
    workers and the delivery process of one host can share it), in autocommit mode.

    Every statement runs in one worker thread that owns the connection: subclasses write
    plain functions that take the connection from :meth:`connection` and call them
    through :meth:`run` from the event loop.

    Args:
        path: the database file (created when missing).
        schema: statements run once when the connection opens (``CREATE TABLE IF NOT
            EXISTS ...``).
        thread_name: the worker thread's name prefix (seen in py-spy and ``ps -L``).
    """

    def __init__(self, path: str, schema: Sequence[str], thread_name: str) -> None:
        self.path = path
        self._schema = tuple(schema)
        self._exec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=thread_name)
        self._db: sqlite3.Connection | None = None

    def connection(self) -> sqlite3.Connection:
        """The connection, opened (with the schema applied) on first use; worker thread
        only.

        Raises:
            sqlite3.Error: the file cannot be opened or the schema applied.
        """
        if self._db is None:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            for statement in self._schema:
                db.execute(statement)
            self._db = db
        return self._db

    def open(self) -> None:
        """Create the file and its tables now (so that a bad path is a configuration
        error, not a failure at the first message). Blocks until done.

        Raises:
            OSError / sqlite3.Error: the file cannot be created or opened.
        """
        self._exec.submit(self.connection).result()

    async def run(self, func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``func(*args, **kwargs)`` in the worker thread; its result or its exception."""
        call = functools.partial(func, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._exec, call)


def open_store(registry: PluginRegistry, spec: str, factory: Callable[[str], _S]) -> _S:
    """The SQLite store of a plugin's ``store`` option: ``spec`` as a path (relative to
    the configuration file, see :meth:`PluginRegistry.path`), made by ``factory`` and
    opened.

    Raises:
        OptionError: ``store``: the file cannot be created or opened.
    """
    path = registry.path(spec)
    store = factory(path)
    try:
        store.open()
    except (OSError, sqlite3.Error) as exc:
        raise OptionError("store", f"cannot open {path}: {exc}") from None
    return store
