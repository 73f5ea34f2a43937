"""Shipped plugin ``content-filter``: ZMailer's ``PARAM contentfilter`` (smtpserver(8),
"CONTENTFILTER INTERFACE"), the ``#hungry`` protocol, at the ``data`` stage.

Entry points: :func:`register` (``[[plugin]] use = "content-filter"``),
:class:`FilterPool` (the long-lived filter programs), :func:`parse_answer` and
:func:`parse_reply` (the filter's answer line), :func:`write_message_file` (the file the
filter reads). docs/filters/content-filter.md is the guide.

The protocol, per filter process (the scheduler-to-transport-agent protocol ZMailer
reuses):

1. smtpgate starts the program (``command``, split like a shell would, no shell);
2. the filter writes ``#hungry\\n`` when it is ready for a job;
3. smtpgate writes the path of a file holding the received message, ``\\n``;
4. the filter answers one line ``RESULT TEXT\\n``: ``RESULT`` a signed integer (negative:
   reject, 0: accept, positive: freeze, i.e. quarantine), ``TEXT`` optional: an SMTP
   reply ``code enhanced-code text`` (the codes may be left out), CR characters in it
   separating the lines of a multi-line reply;
5. back to 2; the filter ends when it reads end of file.

A line that does not begin with a signed integer is logged and smtpgate closes the
filter's input; lines still coming are scanned for a well-formed answer, and when none
comes the message is frozen (result 1), as smtpserver(8) says. ``processes`` filters run
side by side; a message waits for a hungry one. A filter that dies is restarted (the
first time at once, then after 1, 2, 4 ... s, at most ``restart_delay_max``); one that
does not answer within ``timeout`` seconds is killed and restarted. While no filter can
take the message (down, busy beyond ``timeout``, killed) the plugin's ``on_error``
applies: ``tempfail`` (default) answers ``451 4.3.0``, ``accept`` lets the message go on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import shutil
import signal
import tempfile
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..envelope import SessionInfo
from ..hooks import HookResult, Transaction, Verdict
from ..reply import Reply
from . import Option, OptionError, PluginRegistry, positive

__all__ = [
    "Answer",
    "FilterPool",
    "FilterUnavailable",
    "OPTIONS",
    "parse_answer",
    "parse_reply",
    "register",
    "write_message_file",
]

log = logging.getLogger("smtpgate.plugins.content_filter")

PRIORITY = 0
DISCARD_PRIORITY = -100  # the queue hook that takes a "-1 250 ..." (destroyed) message

_RESULT = re.compile(r"([+-]?\d+)(?:[ \t]+(.*))?\Z", re.DOTALL)
_CODE = re.compile(r"([245]\d\d)(?:[ \t]+|\Z)")
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:[ \t]+|\Z)")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 3463 codes added when the filter's reply has none (by reply class): 2.6.0 is
# smtpserver(8)'s own "zero is ok" code, 5.7.1 its rejection code.
_DEFAULT_ENHANCED = {2: "2.6.0", 4: "4.7.1", 5: "5.7.1"}
_DEFAULT_TEXT = {-1: "Rejected by content filter", 0: "Message accepted by content filter",
                 1: "Rejected by content filter"}
_HUNGRY = b"#hungry"
_LINE_LIMIT = 64 * 1024  # bytes in one line from the filter


def _check_command(value: str) -> str | None:
    try:
        argv = shlex.split(value)
    except ValueError as exc:
        return f"cannot split {value!r}: {exc}"
    if not argv:
        return "must name a program"
    program = argv[0]
    if os.sep in program:
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            return f"{program}: not an executable file"
    elif shutil.which(program) is None:
        return f"{program}: not found on PATH"
    return None


def _check_directory(value: str) -> str | None:
    if value and not os.path.isdir(value):
        return f"{value}: not a directory"
    return None


OPTIONS: dict[str, Option] = {
    "command": Option(str, check=_check_command,
                      help="the filter program and its arguments (ZMailer PARAM contentfilter)"),
    "processes": Option(int, default=1,
                        check=lambda v: None if 1 <= v <= 64 else "must be 1..64",
                        help="filter processes serving messages side by side"),
    "quarantine_path": Option(str, default="",
                              help="Maildir for frozen messages (result 1); empty: a freeze "
                                   "answers 451 4.3.0 and nothing is stored"),
    "directory": Option(str, default="", check=_check_directory,
                        help="where the message files are written (default: system temp dir)"),
    "restart_delay_max": Option(float, default=60.0, check=positive,
                                help="longest pause (seconds) before restarting a failing filter"),
}


# ----------------------------------------------------------------- the message file


def write_message_file(transaction: Transaction, directory: str | None) -> str:
    """Write the transaction's current message to a new private file (mode 0600) and
    return its absolute path (blocking: run it in a thread).

    The only place that produces the file the filter reads: the caller deletes it after
    the answer. A long message is copied from the file it was received into, in pieces
    (:meth:`~smtpgate.hooks.Transaction.iter_message`), never loaded whole.

    Args:
        transaction: the transaction (headers and body as earlier plugins left them, CRLF
            lines, not dot-stuffed).
        directory: where to create it; ``None`` or ``""``: the system temp directory.

    Raises:
        OSError: the file cannot be created or written (nothing is left behind).
    """
    fd, path = tempfile.mkstemp(prefix="smtpgate-cf-", suffix=".msg", dir=directory or None)
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in transaction.iter_message():
                f.write(piece)
    except BaseException:
        os.unlink(path)
        raise
    return os.path.abspath(path)


# ----------------------------------------------------------------- answers


@dataclass(frozen=True, slots=True)
class Answer:
    """What a filter answered for one message.

    Attributes:
        result: the signed integer: < 0 reject, 0 accept, > 0 freeze.
        text: the optional TEXT after it (CR characters separate reply lines).
        pid: the filter process that answered.
        malformed: the lines that did not begin with a signed integer (logged; when no
            well-formed line followed, ``result`` is 1, the freezer).
    """

    result: int
    text: str
    pid: int
    malformed: tuple[str, ...] = ()


def parse_answer(line: str) -> tuple[int, str] | None:
    """``"RESULT TEXT"`` → ``(RESULT, TEXT)``; ``None`` when the line does not begin
    with a signed integer followed by a blank or the end of the line (smtpserver(8):
    such lines are logged and the filter's input is closed).

    Args:
        line: one line from the filter, without its newline.
    """
    m = _RESULT.match(line)
    if m is None:
        return None
    return int(m.group(1)), m.group(2) or ""


def parse_reply(text: str, result: int) -> Reply | None:
    """The SMTP reply a filter's TEXT asks for; ``None`` when TEXT is empty.

    smtpserver(8): when the text starts with numbers it holds the reply code and the
    enhanced status code before the text; CR characters make a multi-line reply. A
    missing code is 250 for result 0 and 550 otherwise; a missing (or wrong-class)
    enhanced code is added by class (RFC 3463: ``2.6.0``, ``4.7.1``, ``5.7.1``). A code
    other than 2xx/4xx/5xx counts as text. Control characters become ``?``.

    Args:
        text: the TEXT part of the answer.
        result: the answer's RESULT (for the defaults).

    Returns:
        A :class:`~smtpgate.reply.Reply` (RFC 5321 §4.2; lines separated by ``"\\n"``).
    """
    lines = [_CONTROL.sub("?", line) for line in text.split("\r")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        return None
    first = lines[0].lstrip(" \t")
    code: int | None = None
    enhanced: str | None = None
    m = _CODE.match(first)
    if m is not None:
        code = int(m.group(1))
        first = first[m.end():]
        e = _ENHANCED.match(first)
        if e is not None:
            first = first[e.end():]
            if e.group(1) == str(code)[0]:
                enhanced = f"{e.group(1)}.{int(e.group(2))}.{int(e.group(3))}"
    if code is None:
        code = 250 if result == 0 else 550
    if enhanced is None:
        enhanced = _DEFAULT_ENHANCED[code // 100]
    lines[0] = first
    if not "".join(lines).strip():
        lines = [_DEFAULT_TEXT[max(-1, min(1, result))]]
    return Reply(code, enhanced, "\n".join(lines))


# ----------------------------------------------------------------- the filter processes


class FilterUnavailable(Exception):
    """No filter could take or answer the message (down, busy, died, timed out)."""


class _FilterDied(FilterUnavailable):
    pass


class _FilterTimeout(FilterUnavailable):
    pass


def _printable(line: bytes | str) -> str:
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    return _CONTROL.sub("?", text.replace("\r", "\\r"))[:500]


@dataclass(eq=False)
class _Filter:
    """One running filter program."""

    proc: asyncio.subprocess.Process
    stderr_task: asyncio.Task[None] | None = None
    hungry: bool = False  # has said "#hungry" and not been given a job since
    gone: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def readline(self, deadline: float) -> bytes | None:
        """The next line (without the newline), ``None`` at end of file.

        Raises:
            _FilterTimeout: nothing complete before ``deadline`` (loop time).
            _FilterDied: a line longer than the limit.
        """
        assert self.proc.stdout is not None
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise _FilterTimeout(f"filter {self.pid} did not answer in time")
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
        except TimeoutError:
            raise _FilterTimeout(f"filter {self.pid} did not answer in time") from None
        except (ValueError, asyncio.LimitOverrunError):
            raise _FilterDied(f"filter {self.pid} wrote a line over {_LINE_LIMIT} "
                              "bytes") from None
        if not line:
            return None
        return line.rstrip(b"\r\n")

    async def wait_hungry(self, deadline: float) -> None:
        """Read until ``#hungry``; other lines are logged.

        Raises:
            _FilterDied: end of file first; _FilterTimeout: not before ``deadline``.
        """
        while not self.hungry:
            line = await self.readline(deadline)
            if line is None:
                raise _FilterDied(f"filter {self.pid} exited "
                                  f"({self.proc.returncode}) before saying #hungry")
            if line.strip() == _HUNGRY:
                self.hungry = True
            else:
                log.warning("content filter %d: unexpected line before #hungry: %s",
                            self.pid, _printable(line))

    def kill(self) -> None:
        """Kill the filter's process group (it was started in its own session)."""
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


async def _log_stderr(pid: int, stream: asyncio.StreamReader) -> None:
    """Each line the filter writes on stderr goes to the log (INFO)."""
    while True:
        try:
            line = await stream.readline()
        except (ValueError, asyncio.LimitOverrunError):
            await stream.read(_LINE_LIMIT)
            continue
        if not line:
            return
        log.info("content filter %d: %s", pid, _printable(line.rstrip(b"\r\n")))


@dataclass(eq=False)
class FilterPool:
    """The long-lived filter programs of one ``content-filter`` plugin.

    Filters are started on demand (at most ``processes``) in the event loop that uses
    the pool; they are closed (end of file on their input, then killed after 5 s) when
    that loop shuts down its async generators (``asyncio.run``, ``uvloop.run``,
    :meth:`smtpgate.app.Smtpgate.stop_thread`) or when the pool is garbage-collected
    after a reload, and by the end of file on their input when smtpgate exits.

    Args:
        argv: the program and its arguments.
        processes: how many filters may run at once.
        restart_delay_max: longest pause in seconds before restarting after failures.
    """

    argv: list[str]
    processes: int = 1
    restart_delay_max: float = 60.0
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _idle: deque[_Filter] = field(default_factory=deque, repr=False)
    _all: set[_Filter] = field(default_factory=set, repr=False)
    _live: int = 0
    _failures: int = 0
    _next_start: float = 0.0
    _changed: asyncio.Event | None = field(default=None, repr=False)
    _keeper: AsyncIterator[None] | None = field(default=None, repr=False)
    _reaping: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    # -- lifetime

    async def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        # A new loop (first use, or a server restarted in the same process): whatever
        # ran under an old loop was closed with it.
        self._loop = loop
        self._idle.clear()
        self._all.clear()
        self._reaping.clear()
        self._live = self._failures = 0
        self._next_start = 0.0
        self._changed = asyncio.Event()
        keeper = self._lifetime()
        await keeper.__anext__()  # registered with the loop's async-generator hooks
        self._keeper = keeper

    async def _lifetime(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.aclose()

    async def aclose(self, grace: float = 5.0) -> None:
        """Close every filter: end of file on its input, then SIGKILL after ``grace`` s."""
        filters = list(self._all)
        self._all.clear()
        self._idle.clear()
        for f in filters:
            f.gone = True
            stdin = f.proc.stdin
            if stdin is not None and not stdin.is_closing():
                stdin.close()
        for f in filters:
            try:
                await asyncio.wait_for(f.proc.wait(), grace)
            except TimeoutError:
                f.kill()
                await f.proc.wait()
        # (asyncio.run cancels the remaining tasks before it closes async generators.)
        tasks = [f.stderr_task for f in filters if f.stderr_task is not None]
        for task in tasks + list(self._reaping):
            if not task.done():
                await task
        self._live = 0

    def _notify(self) -> None:
        assert self._changed is not None
        self._changed.set()
        self._changed = asyncio.Event()

    def _count_failure(self) -> None:
        """One more failure in a row: the next start is at once after the first, then
        after 1, 2, 4 ... seconds (at most ``restart_delay_max``)."""
        self._failures += 1
        delay = 0.0 if self._failures <= 1 else min(
            2.0 ** (self._failures - 2), self.restart_delay_max)
        assert self._loop is not None
        self._next_start = self._loop.time() + delay
        if delay:
            log.warning("content filter: %d failures in a row; next start in %g s",
                        self._failures, delay)

    def _forget(self, f: _Filter, failed: bool) -> None:
        """Drop ``f`` (killing it if it still runs); a failure delays the next start."""
        if f.gone:
            return
        f.gone = True
        f.kill()
        stdin = f.proc.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()
        self._all.discard(f)
        self._live -= 1
        if failed:
            self._count_failure()
        assert self._loop is not None
        task = self._loop.create_task(self._reap(f))
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)
        self._notify()

    async def _reap(self, f: _Filter) -> None:
        await f.proc.wait()
        if f.stderr_task is not None:
            await f.stderr_task

    async def _spawn(self, deadline: float) -> _Filter:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True, limit=_LINE_LIMIT)
        except OSError as exc:
            raise _FilterDied(f"cannot start {self.argv[0]}: {exc}") from None
        f = _Filter(proc)
        assert proc.stderr is not None
        f.stderr_task = asyncio.get_running_loop().create_task(
            _log_stderr(proc.pid, proc.stderr))
        self._all.add(f)
        log.info("content filter %d started: %s", proc.pid, shlex.join(self.argv))
        return f

    # -- one message

    async def _acquire(self, deadline: float) -> _Filter:
        """A filter that has said ``#hungry`` (started if need be).

        Raises:
            FilterUnavailable: none within ``deadline``, or every filter is down.
        """
        await self._bind()
        loop = self._loop
        assert loop is not None
        while True:
            f: _Filter | None = None
            while True:
                if self._idle:
                    f = self._idle.popleft()
                    break
                now = loop.time()
                if self._live < self.processes and now >= self._next_start:
                    self._live += 1
                    break
                if self._live == 0:
                    raise FilterUnavailable(
                        f"filter down after {self._failures} failures; restart in "
                        f"{self._next_start - now:.1f} s")
                if now >= deadline:
                    raise FilterUnavailable("no filter free in time")
                assert self._changed is not None
                try:
                    await asyncio.wait_for(self._changed.wait(), deadline - now)
                except TimeoutError:
                    pass
            if f is None:
                try:
                    f = await self._spawn(deadline)
                except BaseException as exc:
                    if not isinstance(exc, FilterUnavailable):  # cancelled while starting
                        self._live -= 1
                        self._notify()
                        raise
                    self._live -= 1
                    log.error("content filter: %s", exc)
                    self._count_failure()
                    self._notify()
                    continue
            try:
                await f.wait_hungry(deadline)
            except _FilterTimeout:
                self._forget(f, failed=True)
                raise
            except _FilterDied as exc:
                log.error("content filter: %s", exc)
                self._forget(f, failed=True)
                continue
            except BaseException:
                self._forget(f, failed=False)
                raise
            return f

    async def _ask(self, f: _Filter, path: str, deadline: float) -> Answer:
        """Give ``f`` the job, read its answer (the seed's malformed-line rule included).

        Raises:
            FilterUnavailable: the filter died or did not answer before ``deadline``.
        """
        stdin = f.proc.stdin
        assert stdin is not None
        f.hungry = False
        try:
            stdin.write(path.encode("utf-8", "surrogateescape") + b"\n")
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _FilterDied(f"filter {f.pid} closed its input: {exc}") from None
        malformed: list[str] = []
        while True:
            try:
                raw = await f.readline(deadline)
            except _FilterTimeout:
                if malformed:
                    return Answer(1, "", f.pid, tuple(malformed))
                raise
            if raw is None:
                if malformed:
                    return Answer(1, "", f.pid, tuple(malformed))
                raise _FilterDied(f"filter {f.pid} exited without answering")
            line = raw.decode("utf-8", "replace")
            parsed = parse_answer(line)
            if parsed is not None:
                return Answer(parsed[0], parsed[1], f.pid, tuple(malformed))
            log.warning("content filter %d: malformed answer line: %s", f.pid, _printable(line))
            if not malformed and not stdin.is_closing():
                stdin.close()  # smtpserver(8): the channel to the filter is closed
            malformed.append(_printable(line))

    async def check(self, path: str, timeout: float) -> Answer:
        """Have a filter judge the message in ``path``.

        Waits up to ``timeout`` seconds for a hungry filter (starting one if fewer than
        ``processes`` run), then up to ``timeout`` seconds for its answer. A filter that
        misses the answer deadline is killed (and restarted for a later message).

        Args:
            path: the message file (absolute path, sent to the filter).
            timeout: seconds for each of the two waits.

        Raises:
            FilterUnavailable: no filter took the job, or the one that did died or hung.
        """
        loop = asyncio.get_running_loop()
        f = await self._acquire(loop.time() + timeout)
        try:
            answer = await self._ask(f, path, loop.time() + timeout)
        except FilterUnavailable:
            self._forget(f, failed=True)
            raise
        except BaseException:  # cancelled (the hook's own timeout, shutdown)
            self._forget(f, failed=False)
            raise
        if answer.malformed:
            self._forget(f, failed=True)  # its input is closed: a new one is needed
        else:
            self._failures = 0
            self._idle.append(f)
            self._notify()
        return answer


# ----------------------------------------------------------------- the plugin


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    """Set up the filter pool (started on first use) and the ``data`` hook (and a
    ``queue`` hook that takes messages the filter destroyed with a 2xx reply).

    Raises:
        OptionError: ``quarantine_path`` is not a usable directory name.
    """
    command, processes = options["command"], options["processes"]
    quarantine, directory = options["quarantine_path"], options["directory"]
    delay_max = options["restart_delay_max"]
    assert isinstance(command, str) and isinstance(processes, int)
    assert isinstance(quarantine, str) and isinstance(directory, str)
    assert isinstance(delay_max, float)
    if quarantine and os.path.exists(quarantine) and not os.path.isdir(quarantine):
        raise OptionError("quarantine_path", f"{quarantine}: not a directory")
    name = registry.name
    timeout = registry.timeout if registry.timeout is not None else registry.config.hooks.timeout
    pool = FilterPool(shlex.split(command), processes, delay_max)
    on_error_accept = registry.on_error == "accept"
    discard_key = f"{name}:discard"

    def failure(tx: Transaction, reason: str) -> HookResult | None:
        tx.results.add(name, "error", reason=reason)
        log.warning("transaction %s: content filter: %s", tx.id, reason)
        if on_error_accept:
            return None
        return HookResult(Verdict.DENYSOFT, Reply(451, "4.3.0", "Content filter unavailable, "
                                                              "try again later"),
                          reason=f"content filter: {reason}")

    async def data(session: SessionInfo, transaction: Transaction) -> HookResult | None:
        try:
            path = await asyncio.to_thread(write_message_file, transaction, directory)
        except OSError as exc:
            return failure(transaction, f"cannot write the message file: {exc}")
        try:
            answer = await pool.check(path, timeout)
        except FilterUnavailable as exc:
            return failure(transaction, str(exc))
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return decide(transaction, answer)

    def decide(tx: Transaction, answer: Answer) -> HookResult | None:
        result = answer.result
        reply = parse_reply(answer.text, result)
        details: dict[str, str | int] = {"answer": result, "pid": answer.pid}
        if reply is not None:
            details["reply"] = f"{reply.code} {reply.enhanced} {reply.text}".replace("\n", " / ")
        if answer.malformed:
            details["malformed"] = answer.malformed[0][:200]
        word = "malformed" if answer.malformed else (
            "reject" if result < 0 else "accept" if result == 0 else "freeze")
        tx.results.add(name, word, **details)
        reason = f"content filter {word} ({result})"
        if reply is not None and reply.is_transient:  # any result: the client tries again
            return HookResult(Verdict.DENYSOFT, reply, reason=reason)
        if result == 0:
            if reply is None:
                return None
            if reply.is_permanent:  # never tell a client 5xx for a message we deliver
                return HookResult(Verdict.DENY, reply, reason=reason)
            tx.set_reply(reply)
            return None
        if result < 0:
            if reply is None:
                return HookResult(Verdict.DENY, Reply(550, "5.7.1", _DEFAULT_TEXT[-1]),
                                  reason=reason)
            if reply.is_permanent:
                return HookResult(Verdict.DENY, reply, reason=reason)
            tx.notes[discard_key] = reply  # destroyed, but the client hears 2xx
            return None
        if reply is None:
            reply = Reply(550, "5.7.1", _DEFAULT_TEXT[1])
        if not quarantine:
            log.error("transaction %s: content filter froze the message but no "
                      "quarantine_path is set: answering 451 4.3.0", tx.id)
            return HookResult(Verdict.DENYSOFT, Reply(451, "4.3.0", "Message cannot be "
                                                                    "stored, try again later"),
                              reason=reason)
        return HookResult(Verdict.QUARANTINE, reply, quarantine=quarantine, reason=reason)

    def discard(session: SessionInfo, transaction: Transaction) -> HookResult | None:
        reply = transaction.notes.get(discard_key)
        if not isinstance(reply, Reply):
            return None
        return HookResult(Verdict.OK, reply, reason="content filter destroyed the message")

    # Two waits of ``timeout`` each (a free filter, its answer) plus writing the file.
    registry.on("data", data, timeout=2 * timeout + 10.0)
    registry.on("queue", discard, priority=DISCARD_PRIORITY)
