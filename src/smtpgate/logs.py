"""Logging set-up (docs/operations.md, "Logs"): formats, the log file and its rolling,
the send log.

Entry points:

* :func:`setup_logging` — the one set-up of every smtpgate process (``serve``, its
  ``server.workers`` worker processes, the queue delivery process, the other commands).
* :class:`Event` — a log message with key/value fields:
  ``log.info(Event("reject", stage="rcpt", client=ip))``. Its text (``getMessage()``)
  is ``reject stage=rcpt client=192.0.2.1``, values quoted when needed; the JSON format
  writes the fields as members. Fields passed with ``extra=`` are fields too.
* :class:`TextFormatter`, :class:`JsonFormatter` — ``[log] format = "text" | "json"``.
* :class:`RollingFileHandler` — ``[log] file`` and ``[log] send_log`` with nssmtpd's
  rolling (``max_size``, ``roll_hour``, ``max_backups``, ``roll_format``,
  ``roll_on_start``, ``roll_on_signal``).
* :func:`reopen_logs` — SIGUSR1/SIGHUP: reopen (or roll) the files.
* :func:`send_log` — one line per relayed message in the send log.

Several processes write the same files, each with ``O_APPEND`` (whole records, no torn
lines). Exactly one process rolls: the one set up with ``roller=True`` (``serve``'s own
process, the supervisor with workers). The others (workers, the delivery process) never
rename anything: at most once a second (and on a signal they get) they compare the file
they write with the one at the path and reopen when it changed, so they follow a roll, a
reopen after logrotate or a removal.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import LogConfig

__all__ = [
    "SEND_LOGGER",
    "Event",
    "JsonFormatter",
    "RollingFileHandler",
    "TextFormatter",
    "format_value",
    "reopen_logs",
    "send_log",
    "setup_logging",
]

#: Logger of the send log (``[log] send_log``); not propagated to the main log.
SEND_LOGGER = "smtpgate.sendlog"

_CHECK_INTERVAL = 1.0  # seconds between a non-rolling process's checks of the path

# Attributes every LogRecord has: anything else on a record came with ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None)).keys()) | {
    "message", "asctime", "taskName"}

# Values written without quotes: nothing a shell-word parser treats specially here.
_PLAIN = re.compile(r"[A-Za-z0-9@.,:;/_+\-<>\[\]()!?%*&^~|{}$#]+")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _quote(text: str) -> str:
    if _CONTROL.search(text):
        text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    return "'" + text.replace("'", "'\\''") + "'"


def format_value(value: object) -> str:
    """``value`` as it appears after ``key=`` in the text format.

    Plain values are written as they are; an empty value, or one with white space,
    quotes, ``=``, a backslash or any other character outside a safe set, is written in
    single quotes as a POSIX shell word (a ``'`` inside becomes ``'\\''``), so that
    :func:`shlex.split` gives the value back (``results='a=pass (b)'``, as Python's
    ``repr`` writes most strings). Control characters (CR, LF, TAB ...) are written as
    ``\\n``-style escapes and do not round-trip. ``None`` is ``-``.
    """
    if value is None:
        return "-"
    text = value if type(value) is str else str(value)
    return text if _plain(text) else _quote(text)


_plain = _PLAIN.fullmatch


def render_fields(fields: Iterable[tuple[str, object]]) -> str:
    """``key=value`` pairs separated by a space (values per :func:`format_value`)."""
    out = []
    for k, v in fields:  # format_value inlined: this runs for every transaction line
        t = v if type(v) is str else "-" if v is None else str(v)
        out.append(f"{k}={t}" if _plain(t) else f"{k}={_quote(t)}")
    return " ".join(out)


class Event:
    """A log message with fields: ``Event("transaction", id=qid, client=ip)``.

    ``str()`` (and so ``LogRecord.getMessage()``) is the name followed by the fields as
    ``key=value`` (see :func:`format_value`), rendered once; :class:`JsonFormatter` writes
    :attr:`name` as ``message`` and every field as a member. Field order is kept.

    Attributes:
        name: what happened (``"transaction"``, ``"reject"``, ``"session"``, ``"sent"``).
        fields: the key/value pairs (values: str, int, float, bool, None or lists).
    """

    __slots__ = ("name", "fields", "_text")

    def __init__(self, name: str, /, **fields: object) -> None:
        self.name = name
        self.fields = fields
        self._text: str | None = None

    def __str__(self) -> str:
        text = self._text
        if text is None:
            text = self._text = (f"{self.name} {render_fields(self.fields.items())}"
                                 if self.fields else self.name)
        return text


def _extra_fields(record: logging.LogRecord) -> list[tuple[str, object]]:
    return [(k, v) for k, v in vars(record).items() if k not in _STANDARD and k[0] != "_"]


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER[PROCESS]: MESSAGE key=value ...``: one line per record.

    The message of an :class:`Event` carries its fields; fields given with ``extra=`` are
    appended. A traceback follows on the next lines (as :class:`logging.Formatter` does).

    Args:
        process: a tag after the logger name (``"worker 1"``, ``"delivery"``); ``""``: none.
    """

    def __init__(self, process: str = "") -> None:
        tag = f"[{process}]" if process else ""
        super().__init__(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - stdlib name
        """The line without traceback: the base format plus the ``extra=`` fields."""
        line = super().formatMessage(record)
        extra = _extra_fields(record)
        if extra:
            line = f"{line} {render_fields(extra)}"
        return line.replace("\r", "\\r").replace("\n", "\\n")


def _json_safe(value: object) -> object:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601, local time with offset, ms),
    ``level``, ``logger``, ``message``, ``process`` (when tagged), then the fields (of an
    :class:`Event` and from ``extra=``; one named like a member before it gets a ``_``
    appended: ``time_``), then
    ``exception`` (the traceback text) when there is one.

    Args:
        process: the ``process`` member (``"worker 1"``, ``"delivery"``); ``""``: none.
    """

    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON (non-ASCII kept, no embedded newline)."""
        msg = record.msg
        obj: dict[str, object] = {
            "time": _dt.datetime.fromtimestamp(record.created).astimezone().isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        if isinstance(msg, Event) and not record.args:
            obj["message"] = msg.name
            fields: list[tuple[str, object]] = list(msg.fields.items())
        else:
            obj["message"] = record.getMessage()
            fields = []
        if self.process:
            obj["process"] = self.process
        fields.extend(_extra_fields(record))
        for key, value in fields:
            while key in obj:  # a field named like a member above: "time_", ...
                key += "_"
            obj[key] = _json_safe(value)
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exception"] = record.exc_text
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class RollingFileHandler(logging.Handler):
    """A log file written with ``O_APPEND`` by one or more processes, rolled by one.

    Rolling (only when ``roller``): before a record that would take the file past
    ``max_size`` bytes (counted from the file, so other processes' lines count too), and
    at the first record after ``roll_hour`` o'clock (local time) each day (checked at
    each record this process writes and once a second, since the other processes may
    write most lines: a file may pass ``max_size`` by what they wrote in that second); also by
    :meth:`roll` (on start with ``roll_on_start``, on a signal with ``roll_on_signal``).
    The file is renamed to ``FILE.1`` (older ones shifted to ``.2`` ... and the oldest
    beyond ``max_backups`` removed), or with ``roll_format`` to ``FILE.`` plus the
    :func:`time.strftime` of the roll time (a ``-N`` suffix when that name exists; the
    oldest rolled files beyond ``max_backups`` by modification time removed); then a new
    file is opened. ``max_backups = 0`` keeps no rolled file.

    Not rolling (``roller=False``): the file at the path is compared with the open one
    (device and inode) at most once a second and reopened when it changed.

    Args:
        path: the file (created, mode 0640 before umask).
        max_size: bytes, 0 = no size limit.
        roll_hour: local hour 0-23 of the daily roll, -1 = none.
        max_backups: rolled files kept.
        roll_format: strftime suffix, ``""`` = numbered.
        roller: this process rolls (exactly one process per file should).

    Raises:
        OSError: the file cannot be opened (at construction).
    """

    def __init__(self, path: str, *, max_size: int = 0, roll_hour: int = -1,
                 max_backups: int = 10, roll_format: str = "", roller: bool = True) -> None:
        super().__init__()
        self.path = os.path.abspath(path)
        self.max_size = max_size
        self.roll_hour = roll_hour
        self.max_backups = max_backups
        self.roll_format = roll_format
        self.roller = roller
        self._fd = -1
        self._ident: tuple[int, int] = (0, 0)
        self._checked = 0.0
        self._io_lock = threading.Lock()
        self._open()
        self._next_roll = self._compute_next_roll(time.time())
        self._stop = threading.Event()
        if roller and (max_size > 0 or roll_hour >= 0):
            # The other processes may write most of the lines (the workers, while the
            # supervisor rolls): check once a second too, not only when this one writes.
            threading.Thread(target=self._watch, name="smtpgate-log-roll",
                             daemon=True).start()

    # ---------------------------------------------------------------- file

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        st = os.fstat(fd)
        old, self._fd = self._fd, fd
        self._ident = (st.st_dev, st.st_ino)
        self._checked = time.monotonic()
        if old >= 0:
            os.close(old)

    def reopen(self) -> None:
        """Close and open the file at the path again (after logrotate moved it away).

        Raises:
            OSError: the file cannot be opened (the old one stays open).
        """
        with self._io_lock:
            self._open()

    def _path_changed(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._ident

    def _compute_next_roll(self, now: float) -> float:
        if self.roll_hour < 0:
            return float("inf")
        local = _dt.datetime.fromtimestamp(now)
        at = local.replace(hour=self.roll_hour, minute=0, second=0, microsecond=0)
        if at <= local:
            at += _dt.timedelta(days=1)
        return at.timestamp()

    # ------------------------------------------------------------- rolling

    def roll(self) -> None:
        """Roll the file now (only a file with something in it): rename it to its backup
        name, remove backups beyond ``max_backups``, open a new file. A process that is not
        the roller only reopens.

        Raises:
            OSError: the rename or the new file failed.
        """
        with self._io_lock:
            if not self.roller:
                self._open()
                return
            self._roll_locked()

    def _roll_locked(self) -> None:
        self._next_roll = self._compute_next_roll(time.time())
        try:
            if os.stat(self.path).st_size == 0:
                self._open()
                return
        except FileNotFoundError:
            self._open()
            return
        if self.max_backups <= 0:
            os.unlink(self.path)
        elif self.roll_format:
            base = f"{self.path}.{time.strftime(self.roll_format)}"
            target, n = base, 0
            while os.path.exists(target):
                n += 1
                target = f"{base}-{n}"
            os.rename(self.path, target)
            self._prune_formatted()
        else:
            for i in range(self.max_backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
            stale = f"{self.path}.{self.max_backups + 1}"
            if os.path.exists(stale):
                os.unlink(stale)
        self._open()

    def _prune_formatted(self) -> None:
        folder, name = os.path.split(self.path)
        prefix = name + "."
        rolled = []
        for entry in os.scandir(folder):
            if entry.name.startswith(prefix) and entry.is_file():
                rolled.append((entry.stat().st_mtime, entry.path))
        rolled.sort()
        for _, path in rolled[: max(0, len(rolled) - self.max_backups)]:
            os.unlink(path)

    def _due(self, incoming: int) -> bool:
        if time.time() >= self._next_roll:
            return True
        return self.max_size > 0 and os.fstat(self._fd).st_size + incoming > self.max_size

    def _watch(self) -> None:
        while not self._stop.wait(_CHECK_INTERVAL):
            try:
                with self._io_lock:
                    if self._fd >= 0 and self._due(0):
                        self._roll_locked()
            except OSError as exc:
                print(f"smtpgate: cannot roll {self.path}: {exc}", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- emit

    def emit(self, record: logging.LogRecord) -> None:
        """Write the formatted record and a newline with one ``write(2)``; roll or reopen
        first when due. Errors go to :meth:`handleError` (never raised)."""
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            with self._io_lock:
                if self.roller:
                    if self._due(len(data)):
                        self._roll_locked()
                else:
                    now = time.monotonic()
                    if now - self._checked >= _CHECK_INTERVAL:
                        self._checked = now
                        if self._path_changed():
                            self._open()
                os.write(self._fd, data)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        """Close the file (the handler writes nothing afterwards)."""
        self._stop.set()
        with self._io_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        super().close()


_handlers: list[RollingFileHandler] = []
_roll_on_signal: list[bool] = [False]


def _formatter(fmt: str, process: str) -> logging.Formatter:
    return JsonFormatter(process) if fmt == "json" else TextFormatter(process)


def _file_handler(path: str, cfg: LogConfig, roller: bool, start: bool) -> RollingFileHandler:
    handler = RollingFileHandler(path, max_size=cfg.max_size, roll_hour=cfg.roll_hour,
                                 max_backups=cfg.max_backups, roll_format=cfg.roll_format,
                                 roller=roller)
    if roller and start and cfg.roll_on_start:
        handler.roll()
    return handler


def setup_logging(cfg: LogConfig | None, *, level: str | None = None, process: str = "",
                  roller: bool = True, start: bool = True) -> None:
    """Configure logging for this process: the root logger's one handler (the log file
    or standard error) with the configured format and level, and the send log.

    Replaces every handler set up before (a second call, e.g. a reload with a changed
    ``[log]``, starts over); the new files are opened first, so when one cannot be opened
    the running set-up is kept.

    Args:
        cfg: ``[log]`` (``None``: text on standard error).
        level: overrides ``cfg.level`` (``"DEBUG"``, ``"INFO"``, ``"WARNING"``,
            ``"ERROR"``, any case).
        process: tag of this process in each line (``"worker 1"``, ``"delivery"``).
        roller: this process rolls the files (``serve``'s own process); the worker and
            delivery processes pass ``False`` and follow the roller (see the module text).
        start: the process is starting (``roll_on_start`` applies); a reload passes
            ``False``.

    Raises:
        OSError: the log file or the send log cannot be opened.
    """
    level_name = (level or (cfg.level if cfg is not None else "INFO")).upper()
    fmt = cfg.format if cfg is not None else "text"
    # The new files are opened before the old handlers go, so that a file that cannot be
    # opened (a reload naming a bad path) leaves the running set-up as it was.
    handler: logging.Handler
    if cfg is not None and cfg.file:
        handler = _file_handler(cfg.file, cfg, roller, start)
    else:
        handler = logging.StreamHandler(sys.stderr)
    send_handler: RollingFileHandler | None = None
    if cfg is not None and cfg.send_log:
        try:
            send_handler = _file_handler(cfg.send_log, cfg, roller, start)
        except OSError:
            if isinstance(handler, RollingFileHandler):
                handler.close()
            raise
    for h in _handlers:
        h.close()
    _handlers.clear()
    if isinstance(handler, RollingFileHandler):
        _handlers.append(handler)
    handler.setFormatter(_formatter(fmt, process))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        if old is not handler and not isinstance(old, RollingFileHandler):
            old.close()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level_name, logging.INFO))
    sender = logging.getLogger(SEND_LOGGER)
    for old in sender.handlers[:]:
        sender.removeHandler(old)
    sender.propagate = False
    if send_handler is not None:
        send_handler.setFormatter(_formatter(fmt, process))
        _handlers.append(send_handler)
        sender.addHandler(send_handler)
        sender.setLevel(logging.INFO)
        sender.disabled = False
    else:
        sender.disabled = True
    _roll_on_signal[0] = bool(cfg is not None and cfg.roll_on_signal)


def reopen_logs(roll: bool | None = None) -> None:
    """SIGUSR1/SIGHUP: reopen the log file and the send log (``roll`` true: roll them,
    in the rolling process; ``None``: as ``[log] roll_on_signal`` says). Never raises: a
    file that cannot be opened is reported on standard error and the old one kept."""
    do_roll = _roll_on_signal[0] if roll is None else roll
    for handler in list(_handlers):
        try:
            if do_roll:
                handler.roll()
            else:
                handler.reopen()
        except OSError as exc:
            print(f"smtpgate: cannot reopen {handler.path}: {exc}", file=sys.stderr, flush=True)


_send = logging.getLogger(SEND_LOGGER)


def send_log(queue_id: str, sender: str, recipients: Iterable[str], upstream: str,
             reply: object, **more: object) -> None:
    """Write the send-log line of one relayed message (nssmtpd's send log): ``sent id=...
    from=<...> to=<a>,<b> upstream=HOST reply="250 ..."`` plus ``more`` fields. A no-op
    unless ``[log] send_log`` is set."""
    if _send.disabled or not _send.isEnabledFor(logging.INFO):
        return
    _send.info(Event("sent", id=queue_id, **{"from": f"<{sender}>"},
                     to=",".join(f"<{r}>" for r in recipients), upstream=upstream or "-",
                     reply=str(reply), **more))


_send.disabled = True
_send.propagate = False
