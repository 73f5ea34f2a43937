"""Shipped plugin ``qmail-spp``: run qmail-spp plugin programs (seed 003) unchanged.

Entry point: :func:`register` (``[[plugin]] use = "qmail-spp"``). docs/filters/qmail-spp.md
is the guide and the compatibility table.

For each SMTP command with a section in the plugins file (see :mod:`.spp_file`), the
section's programs run one after the other, each as an asyncio subprocess (stdin
``/dev/null``, stdout read for commands, each stderr line logged), with qmail-spp's
environment (``SMTPHELOHOST``, ``SMTPMAILFROM``, ``SMTPRCPTTO``, ``SMTPRCPTCOUNT``,
``SMTPRCPTCOUNTALL``, ``SMTPRCPTHOSTSOK``, ``SMTPAUTHUSER``, ``SMTPAUTHMETHOD``, the
ucspi-tcp ``PROTO``/``TCP*`` names, the variables set with ``S``). Each output line is a
command: ``A`` ``N`` ``O`` ``E`` ``R`` ``D`` end the command's plugins; ``H`` ``C`` ``S``
``U`` ``P`` ``LM`` ``LR`` ``LD`` act and reading goes on. A program killed by the
``timeout``, killed by a signal or exiting with status 120 fails: ``451 4.3.0
qmail-spp failure: LINE: REASON`` (``on_error = "tempfail"``), or, with ``on_error =
"accept"``, it is logged and the next program runs. At most ``max_processes``
programs run at once in the server process.

Stages: connection → ``connect``, helo → ``helo``, mail → ``mail``, rcpt → ``rcpt``,
data → ``data_start`` (the ``DATA`` command, before ``354``), auth → ``auth`` (after a
successful exchange); ``H`` headers are added at ``data``. The hooks run at priority -92:
before relay control (-90), so ``O`` at RCPT skips the relay check as it skips qmail's
rcpthosts check. RFC 5321 §4.2 (replies), RFC 3463 (enhanced codes), RFC 5322 §3.6
(header fields).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from ..envelope import Recipient, SessionInfo
from ..hooks import HookResult, Transaction, Verdict, default_reply
from ..hooks.verdict import Stage
from ..policy import RelayPolicy
from ..reply import R, Reply
from ..results import Results
from . import Option, OptionError, PluginRegistry
from .spp_file import SppFile, SppProgram, load_spp_file

__all__ = ["OPTIONS", "PRIORITY", "register"]

log = logging.getLogger("smtpgate.plugins.qmail_spp")

PRIORITY = -92
"""Before relay control (-90) and the HELO rules (-80), after the load and disk checks."""

DEFAULT_MAX_PROCESSES = 64


def _positive(value: int) -> str | None:
    return None if value >= 1 else "must be >= 1"


def _file_name(value: str) -> str | None:
    return "must be a file name" if not value.strip() or "\0" in value else None


OPTIONS: dict[str, Option] = {
    "plugins_file": Option(str, default="smtpplugins", check=_file_name,
                           help="qmail-spp plugins file (relative: to the configuration "
                                "file's directory); SPPCONFFILE overrides it"),
    "max_processes": Option(int, default=DEFAULT_MAX_PROCESSES, check=_positive,
                            help="plugin programs running at once in this process"),
}

_LINE_LIMIT = 1 << 20          # longest stdout/stderr line read from a program (bytes)
_EXIT_CANT_EXEC = 120          # qmail-spp: "should not exit with error code 120"
_TERMINATORS = frozenset("ANODER")
_CODE = re.compile(r"([1-5][0-9][0-9])(?:[ -]|$)")
_ENHANCED = re.compile(r"([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: +|$)")
_TRAILING_ENHANCED = re.compile(r"\(#([245]\.[0-9]{1,3}\.[0-9]{1,3})\)\s*$")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_HEADER_NAME = re.compile(r"[!-9;-~]+")


@dataclass(slots=True)
class _State:
    """Per-session qmail-spp state (what qmail-smtpd keeps in its process).

    ``env``: the session's variables (ucspi-tcp and SMTP names, ``S`` changes) over
    smtpgate's own environment; ``unset``: names removed with ``U``; ``headers``: ``H``
    lines not yet added; ``errors``: ``LM``, ``LR``, ``LD`` messages (keys ``M``,
    ``R``, ``D``); ``rcpt_all``: RCPT commands seen by the rcpt plugins since MAIL;
    ``stash``: the headers taken at DATA for that transaction (id, headers); ``log``:
    ``stage:outcome`` entries of the transaction; ``changed``: ``C`` changes made.
    """

    env: dict[str, str]
    unset: set[str] = field(default_factory=set)
    running: bool = True
    headers: list[str] = field(default_factory=list)
    errors: dict[str, list[str]] = field(default_factory=lambda: {"M": [], "R": [], "D": []})
    rcpt_all: int = 0
    stash: tuple[str, list[str]] | None = None
    log: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def set(self, name: str, value: str) -> None:
        """``S``: set a variable for the rest of the session."""
        self.env[name] = value
        self.unset.discard(name)

    def unsetenv(self, name: str) -> None:
        """``U``: remove a variable (also one of smtpgate's own environment)."""
        self.env.pop(name, None)
        self.unset.add(name)

    def disabled(self) -> bool:
        """``A`` was given, or ``NOSPP`` is set (server environment or ``S``)."""
        if not self.running or "NOSPP" in self.env:
            return True
        return "NOSPP" in os.environ and "NOSPP" not in self.unset

    def environ(self) -> dict[str, str]:
        """The environment a program gets."""
        env = {k: v for k, v in os.environ.items() if k not in self.unset}
        env.pop("SPPCONFFILE", None)
        env.update(self.env)
        return env

    def reset(self) -> None:
        """qmail-spp's ``spp_rset``: at RSET and once a message's data has begun."""
        self.headers = []
        self.errors = {"M": [], "R": [], "D": []}
        self.rcpt_all = 0


@dataclass(slots=True)
class _Outcome:
    """What a section's programs decided.

    kind: ``pass`` (no decision), ``accept`` (A), ``next`` (N), ``ok`` (O), ``reject``
    (E), ``disconnect`` (R), ``drop`` (D), ``error`` (a failed program).
    lines: ``P`` lines and the ``E``/``R`` message, in order (raw texts).
    failure: for ``error``: ``"LINE: REASON"``.
    """

    kind: str = "pass"
    lines: list[str] = field(default_factory=list)
    failure: str = ""


class _Failure(Exception):
    """A program failed (cannot run, crashed, exit 120, timeout)."""


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _reply_text(text: str) -> str:
    """Reply text is printable ASCII (RFC 5321 §4.2: no CR/LF, no controls)."""
    return _UNPRINTABLE.sub("?", text)


def _split_code(text: str) -> tuple[int | None, str | None, str]:
    """``"553 5.7.1 go away"`` → ``(553, "5.7.1", "go away")``; missing parts are None
    (an enhanced code of another class than the reply code stays in the text)."""
    code: int | None = None
    m = _CODE.match(text)
    if m:
        code = int(m.group(1))
        text = text[m.end():]
    enhanced: str | None = None
    m = _ENHANCED.match(text)
    if m and (code is None or str(code)[0] == m.group(1)[0]):
        enhanced = m.group(1)
        text = text[m.end():]
    return code, enhanced, text


def build_reply(lines: list[str], stage: Stage) -> Reply:
    """The reply for a plugin's message lines (``P`` lines then the ``E``/``R``/``L``
    message; qmail-spp writes them to the client as they are, codes included).

    The last line's code decides (a 4xx or 5xx; anything else: the stage's default
    rejection code, e.g. ``550`` at RCPT, with the whole line as text). The enhanced code
    (RFC 3463) is the one after the code (``550 5.7.1 text``, removed from the text), else
    a qmail-style ``(#5.7.1)`` at the end (kept in the text), else the stage default's
    when of the same class, else ``X.7.1``. Codes at the start of the other lines are
    dropped: every line of the reply carries the last line's codes (RFC 5321 §4.2.1).

    Args:
        lines: raw message texts, at least one.
        stage: where the reply is sent.

    Returns:
        A 4xx or 5xx :class:`~smtpgate.reply.Reply`.
    """
    last = _reply_text(lines[-1])
    code, enhanced, text = _split_code(last)
    deny = default_reply(stage, Verdict.DENY) or R.ACCESS_DENIED
    if code is None or code < 400:
        code, enhanced, text = deny.code, None, last
    cls = str(code)[0]
    if enhanced is not None and enhanced[0] != cls:
        enhanced = None
    if enhanced is None:
        m = _TRAILING_ENHANCED.search(text)
        if m and m.group(1)[0] == cls:
            enhanced = m.group(1)
    if enhanced is None:
        soft = default_reply(stage, Verdict.DENYSOFT) or R.TEMP_ERROR
        default = deny if cls == "5" else soft
        enhanced = default.enhanced if default.enhanced and default.enhanced[0] == cls \
            else f"{cls}.7.1"
    if not text.strip():
        text = (deny if cls == "5" else (default_reply(stage, Verdict.DENYSOFT)
                                         or R.TEMP_ERROR)).text
    body = [_split_code(_reply_text(line))[2] for line in lines[:-1]]
    return Reply(code, enhanced, "\n".join([*body, text]))


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    """Read the plugins file and register the hooks (connect, helo, auth, mail, rcpt,
    data_start, data, rset).

    The file is ``$SPPCONFFILE`` when that is set (non-empty) in smtpgate's environment,
    else ``plugins_file`` (relative to the configuration file's directory); it is read
    here, at start and at each reload (SIGHUP).

    Raises:
        OptionError: the plugins file cannot be read, or names a program that does not
            exist or is not executable (``plugins_file: ...``).
    """
    plugins_file = options["plugins_file"]
    max_processes = options["max_processes"]
    assert isinstance(plugins_file, str) and isinstance(max_processes, int)
    conffile = os.environ.get("SPPCONFFILE") or ""
    if conffile:
        path = os.path.abspath(conffile)
        origin = f"SPPCONFFILE={conffile}"
    else:
        path = registry.path(plugins_file)
        origin = path
    try:
        spp = load_spp_file(path)
    except OSError as exc:
        raise OptionError("plugins_file", f"cannot read {origin}: "
                                          f"{exc.strerror or exc}") from None
    except ValueError as exc:
        raise OptionError("plugins_file", str(exc)) from None
    for lineno, line in spp.ignored:
        log.warning("qmail-spp: %s:%d: %r is not under a known section; ignored",
                    spp.path, lineno, line)
    timeout = registry.timeout if registry.timeout is not None else \
        registry.config.hooks.timeout
    runner = _Runner(registry.name, spp, timeout, max_processes, registry.on_error,
                     RelayPolicy(registry.config.relay.relay_domains,
                                 registry.config.relay.local_networks),
                     registry.config.server.hostname)
    runner.register(registry)
    # Only a program under [rcpt] can accept a recipient (O) that relay control would
    # refuse; without one the rcpt hook only counts recipients for the environment.
    registry.decides_relay = bool(spp.programs("rcpt"))


class _Runner:
    """The hooks of one ``qmail-spp`` plugin table."""

    def __init__(self, name: str, spp: SppFile, timeout: float, max_processes: int,
                 on_error: str, relay: RelayPolicy, hostname: str) -> None:
        self.name = name
        self.spp = spp
        self.timeout = timeout
        self.slots = asyncio.Semaphore(max_processes)
        self.on_error = on_error
        self.relay = relay
        self.hostname = hostname
        self.key = f"qmail-spp:{name}"

    def register(self, registry: PluginRegistry) -> None:
        """Put the hooks on the chain; each bounded by its section's worst case (every
        program waiting for a slot and running for ``timeout``)."""
        def bound(section: str) -> float:
            return self.timeout * (2 * max(1, len(self.spp.programs(section))) + 1) + 5.0

        registry.on("connect", self.connect, timeout=bound("connection"))
        registry.on("helo", self.helo, timeout=bound("helo"))
        registry.on("auth", self.auth, timeout=bound("auth"))
        registry.on("mail", self.mail, timeout=bound("mail"))
        registry.on("rcpt", self.rcpt, timeout=bound("rcpt"))
        registry.on("data_start", self.data_start, timeout=bound("data"))
        registry.on("data", self.data)
        registry.on("rset", self.rset)

    # ----------------------------------------------------------------- state

    def state(self, session: SessionInfo) -> _State:
        """The session's state, created at the first hook (normally ``connect``)."""
        state = session.notes.get(self.key)
        if state is None:
            state = self.new_state(session)
            session.notes[self.key] = state
        assert isinstance(state, _State)
        return state

    def new_state(self, session: SessionInfo) -> _State:
        """Environment of a new session: smtpgate's own (which may hold ``NOSPP``), the
        ucspi-tcp names tcpserver would set, and ``RELAYCLIENT=""`` for a client in
        ``[relay] local_networks`` (tcprules' usual way of marking them)."""
        env = {"PROTO": "TCP"}
        if session.local_ip:
            env["TCPLOCALIP"] = session.local_ip
            env["TCPLOCALPORT"] = str(session.local_port)
        env["TCPLOCALHOST"] = session.hostname or self.hostname
        if session.peer_ip:
            env["TCPREMOTEIP"] = session.peer_ip
            env["TCPREMOTEPORT"] = str(session.peer_port)
            try:
                if self.relay.local_check(session.peer_ip):
                    env["RELAYCLIENT"] = ""
            except ValueError:
                pass
        if session.peer_hostname:
            env["TCPREMOTEHOST"] = session.peer_hostname
        return _State(env)

    def record(self, results: Results, state: _State, stage: str, outcome: _Outcome) -> None:
        """Add ``stage:kind`` to the finding in ``results`` (the transaction's, or the
        session's before MAIL)."""
        state.log.append(f"{stage}:{outcome.kind}")
        details: dict[str, list[str] | str] = {"stages": list(state.log)}
        if state.changed:
            details["changed"] = list(state.changed)
        if outcome.failure:
            details["failure"] = outcome.failure
        results.add(self.name, outcome.kind, **details)

    # ------------------------------------------------------------ running

    async def run_section(self, session: SessionInfo, state: _State, section: str,
                          address: Callable[[str], bool] | None = None,
                          address_var: str = "") -> _Outcome:
        """Run ``section``'s programs in order until one ends the command.

        ``address`` applies a ``C`` command (returns False when the new address is
        refused); ``address_var`` is the variable holding that address.
        """
        outcome = _Outcome()
        for program in self.spp.programs(section):
            if state.disabled():
                break
            try:
                lines = await self.execute(session, program, state.environ())
            except _Failure as exc:
                failure = f"{program.line}: {exc}"
                log.warning("qmail-spp session=%s [%s] %s", session.session_id, section,
                            failure)
                if self.on_error == "accept":
                    continue
                return _Outcome("error", [], failure)
            decided = self.interpret(session, state, section, program, lines, outcome,
                                     address, address_var)
            if decided:
                break
        return outcome

    def interpret(self, session: SessionInfo, state: _State, section: str,
                  program: SppProgram, lines: list[str], outcome: _Outcome,
                  address: Callable[[str], bool] | None, address_var: str) -> bool:
        """Apply one program's commands (qmail-spp's ``spp()`` switch); True when a
        terminating command (A, N, O, E, R, D) ended the command's plugins."""
        for line in lines:
            if not line:
                continue
            cmd, arg = line[0], line[1:]
            if cmd == "H":
                state.headers.append(arg)
            elif cmd == "C":
                if address is not None and address(arg):
                    state.set(address_var, arg)
            elif cmd == "S":
                name, eq, value = arg.partition("=")
                if eq and name and "\0" not in arg:
                    state.set(name, value)
                else:
                    log.info("qmail-spp session=%s %s: ignored S%s (not var=value)",
                             session.session_id, program.line, _escape(arg))
            elif cmd == "U":
                if arg and "=" not in arg and "\0" not in arg:
                    state.unsetenv(arg)
            elif cmd == "P":
                outcome.lines.append(arg)
            elif cmd == "L":
                which = arg[:1]
                if which in state.errors:
                    state.errors[which].append(arg[1:])
            elif cmd in _TERMINATORS:
                if cmd == "A":
                    state.running = False
                    outcome.kind = "accept"
                elif cmd == "N":
                    outcome.kind = "next"
                elif cmd == "O":
                    outcome.kind = "ok"
                elif cmd == "D":
                    outcome.kind = "drop"
                elif cmd == "E":
                    outcome.kind = "reject"
                    outcome.lines.append(arg)
                else:
                    outcome.kind = "disconnect"
                    outcome.lines.append(arg)
                log.debug("qmail-spp session=%s [%s] %s: %s", session.session_id, section,
                          program.line, cmd)
                return True
        return False

    async def execute(self, session: SessionInfo, program: SppProgram,
                      env: dict[str, str]) -> list[str]:
        """Run one program; its stdout lines up to the first terminating command.

        Raises:
            _Failure: no free slot within ``timeout``, cannot be started, exit status
                120, killed by a signal, or still running after ``timeout`` seconds (its
                process group is killed).
        """
        try:
            async with asyncio.timeout(self.timeout):
                await self.slots.acquire()
        except TimeoutError:
            raise _Failure(f"no free process slot within {self.timeout:g}s "
                           "(max_processes)") from None
        try:
            return await self._spawn(session, program, env)
        finally:
            self.slots.release()

    async def _spawn(self, session: SessionInfo, program: SppProgram,
                     env: dict[str, str]) -> list[str]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *program.argv, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=env, cwd=self.spp.directory, start_new_session=True,
                limit=_LINE_LIMIT)
        except (OSError, ValueError) as exc:
            raise _Failure(f"can't execute ({exc})") from None
        assert proc.stdout is not None and proc.stderr is not None
        lines: list[str] = []
        stderr_task = asyncio.ensure_future(self._log_stderr(session, program, proc.stderr))
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    done = False
                    while True:
                        data = await proc.stdout.readline()
                        if not data:
                            break
                        if done:
                            continue  # qmail-spp stops reading here; drained, not used
                        line = _text(data.rstrip(b"\n").removesuffix(b"\r"))
                        lines.append(line)
                        if line[:1] in _TERMINATORS:
                            done = True
                    await stderr_task
                    status = await proc.wait()
            except TimeoutError:
                raise _Failure(f"timeout after {self.timeout:g}s") from None
            except ValueError:  # a line over _LINE_LIMIT
                raise _Failure("output line too long") from None
        finally:
            if proc.returncode is None:
                _kill_group(proc.pid)
                await asyncio.shield(proc.wait())
            if not stderr_task.done():
                stderr_task.cancel()
        if status < 0:
            raise _Failure(f"child crashed (signal {-status})")
        if status == _EXIT_CANT_EXEC:
            raise _Failure("can't execute (exit 120)")
        return lines

    async def _log_stderr(self, session: SessionInfo, program: SppProgram,
                          stream: asyncio.StreamReader) -> None:
        """Each stderr line to the log (qmail-spp: "they are logged")."""
        while True:
            try:
                data = await stream.readline()
            except ValueError:
                data = await stream.read(_LINE_LIMIT)
            if not data:
                return
            log.info("qmail-spp session=%s %s: %s", session.session_id, program.line,
                     _escape(_text(data.rstrip(b"\r\n"))))

    # -------------------------------------------------------------- verdicts

    def verdict(self, stage: Stage, outcome: _Outcome, ok_reply: Reply | None = None
                ) -> HookResult | None:
        """The hook result for ``outcome`` at ``stage``."""
        kind = outcome.kind
        if kind in ("pass", "accept", "next"):
            if outcome.lines:
                log.info("qmail-spp: P lines not sent (no reply of the plugin to carry "
                         "them): %s", [_escape(x) for x in outcome.lines])
            return None
        if kind == "ok":
            if outcome.lines and ok_reply is not None:
                text = [_split_code(_reply_text(x))[2] for x in outcome.lines]
                return HookResult(Verdict.OK, Reply(ok_reply.code, ok_reply.enhanced,
                                                    "\n".join([*text, ok_reply.text])))
            return HookResult(Verdict.OK)
        if kind == "error":
            return HookResult(Verdict.DENYSOFT, Reply(
                451, "4.3.0", _reply_text(f"qmail-spp failure: {outcome.failure}")),
                reason=f"qmail-spp {outcome.failure}")
        if kind == "drop":
            # qmail-spp closes without a word; RFC 5321 §3.8: 421 before closing.
            return HookResult(Verdict.DENYSOFT_DISCONNECT,
                              Reply(421, "4.7.0", "Closing connection"), reason="qmail-spp D")
        reply = build_reply(outcome.lines, stage)
        if kind == "disconnect":
            v = Verdict.DENYSOFT_DISCONNECT if reply.is_transient else Verdict.DENY_DISCONNECT
        else:
            v = Verdict.DENYSOFT if reply.is_transient else Verdict.DENY
        return HookResult(v, reply, reason=f"qmail-spp {kind}")

    def stored_errors(self, state: _State, which: str, stage: Stage) -> HookResult | None:
        """``LM``/``LR``/``LD`` messages waiting for this command (qmail-spp's
        ``spp_errors``): the command is refused with them, plugins or not."""
        lines = state.errors[which]
        if not lines:
            return None
        reply = build_reply(lines, stage)
        return HookResult(Verdict.DENYSOFT if reply.is_transient else Verdict.DENY, reply,
                          reason=f"qmail-spp L{which}")

    # ------------------------------------------------------------------ hooks

    async def connect(self, session: SessionInfo) -> HookResult | None:
        """[connection] programs, before the greeting."""
        state = self.new_state(session)
        session.notes[self.key] = state
        if not self.spp.programs("connection"):
            return None
        outcome = await self.run_section(session, state, "connection")
        self.record(session.results, state, "connection", outcome)
        return self.verdict(Stage.CONNECT, outcome)

    async def helo(self, session: SessionInfo, helo_name: str) -> HookResult | None:
        """[helo] programs with ``SMTPHELOHOST``."""
        state = self.state(session)
        state.set("SMTPHELOHOST", helo_name)
        if not self.spp.programs("helo"):
            return None
        outcome = await self.run_section(session, state, "helo")
        self.record(session.results, state, "helo", outcome)
        return self.verdict(Stage.HELO, outcome)

    async def auth(self, session: SessionInfo, mechanism: str, username: str,
                   success: bool) -> HookResult | None:
        """[auth] programs after a successful AUTH, with ``SMTPAUTHUSER`` and
        ``SMTPAUTHMETHOD`` (lower case, as qmail's SMTP AUTH patches name methods)."""
        if not success:
            return None
        state = self.state(session)
        state.set("SMTPAUTHUSER", username)
        state.set("SMTPAUTHMETHOD", mechanism.lower())
        state.set("RELAYCLIENT", "")
        if not self.spp.programs("auth"):
            return None
        outcome = await self.run_section(session, state, "auth")
        self.record(session.results, state, "auth", outcome)
        return self.verdict(Stage.AUTH, outcome)

    async def mail(self, session: SessionInfo, transaction: Transaction) -> HookResult | None:
        """``LM`` messages, else [mail] programs with ``SMTPMAILFROM`` (``C`` changes
        the sender)."""
        state = self.state(session)
        stored = self.stored_errors(state, "M", Stage.MAIL)
        if stored is not None:
            return stored
        state.rcpt_all = 0
        state.log = []
        state.changed = []
        if state.disabled():
            return None
        state.set("SMTPMAILFROM", transaction.mail_from)
        if not self.spp.programs("mail"):
            return None

        def change(new: str) -> bool:
            old = transaction.mail_from
            try:
                transaction.mail_from = new
            except (ValueError, TypeError) as exc:
                log.warning("qmail-spp session=%s: C%s refused: %s", session.session_id,
                            _escape(new), exc)
                return False
            state.changed.append(f"mail:{old}->{transaction.mail_from}")
            return True

        outcome = await self.run_section(session, state, "mail", change, "SMTPMAILFROM")
        self.record(transaction.results, state, "mail", outcome)
        return self.verdict(Stage.MAIL, outcome, R.SENDER_OK)

    async def rcpt(self, session: SessionInfo, transaction: Transaction,
                   recipient: Recipient) -> HookResult | None:
        """``LR`` messages, else [rcpt] programs with ``SMTPRCPTTO``, the counts and
        ``SMTPRCPTHOSTSOK`` (whether relay control would accept it); ``C`` changes the
        recipient."""
        state = self.state(session)
        stored = self.stored_errors(state, "R", Stage.RCPT)
        if stored is not None:
            return stored
        state.set("SMTPRCPTCOUNT", str(len(transaction.recipients)))
        state.rcpt_all += 1
        state.set("SMTPRCPTCOUNTALL", str(state.rcpt_all))
        try:
            ok = self.relay.may_relay(session.peer_ip, session.auth_user, recipient.address)
        except ValueError:
            ok = False
        state.set("SMTPRCPTHOSTSOK", "1" if ok else "0")
        if state.disabled():
            return None
        state.set("SMTPRCPTTO", recipient.address)
        if not self.spp.programs("rcpt"):
            return None

        def change(new: str) -> bool:
            if not new or _UNPRINTABLE.search(new) or any(c in new for c in " <>"):
                log.warning("qmail-spp session=%s: C%s refused: not an address",
                            session.session_id, _escape(new))
                return False
            state.changed.append(f"rcpt:{recipient.address}->{new}")
            recipient.address = new
            return True

        outcome = await self.run_section(session, state, "rcpt", change, "SMTPRCPTTO")
        self.record(transaction.results, state, "rcpt", outcome)
        return self.verdict(Stage.RCPT, outcome, R.RCPT_OK)

    async def data_start(self, session: SessionInfo, transaction: Transaction
                         ) -> HookResult | None:
        """``LD`` messages, else [data] programs (at DATA, before ``354``). Unless
        refused, the ``H`` headers gathered so far are taken for this message and the
        per-message state is reset (qmail-spp's ``spp_rset`` once data begins)."""
        state = self.state(session)
        stored = self.stored_errors(state, "D", Stage.DATA_START)
        if stored is not None:
            return stored
        result: HookResult | None = None
        if not state.disabled() and self.spp.programs("data"):
            outcome = await self.run_section(session, state, "data")
            self.record(transaction.results, state, "data", outcome)
            result = self.verdict(Stage.DATA_START, outcome)
        if result is None or not result.verdict.is_denial:
            state.stash = (transaction.id, state.headers)
            state.reset()
        return result

    def data(self, session: SessionInfo, transaction: Transaction) -> None:
        """Add the ``H`` headers taken at DATA, at the top of the header block in the
        order the plugins printed them (qmail-spp writes them after its Received)."""
        state = session.notes.get(self.key)
        if not isinstance(state, _State) or state.stash is None:
            return
        tx_id, headers = state.stash
        state.stash = None
        if tx_id != transaction.id or not headers:
            return
        added: list[str] = []
        for line in reversed(headers):
            name, colon, value = line.partition(":")
            name = name.strip()
            if not colon or not _HEADER_NAME.fullmatch(name):
                log.warning("qmail-spp session=%s: H%s is not a header field; not added",
                            session.session_id, _escape(line))
                continue
            try:
                transaction.add_header(name, value.strip(), prepend=True)
            except ValueError as exc:
                log.warning("qmail-spp session=%s: H%s not added: %s", session.session_id,
                            _escape(line), exc)
                continue
            added.append(name)
        finding = transaction.results.get(self.name)
        details = dict(finding.details) if finding is not None else {}
        details["headers"] = list(reversed(added))
        transaction.results.add(self.name, finding.result if finding else "pass",
                                **details)

    def rset(self, session: SessionInfo) -> None:
        """RSET: qmail-spp's ``spp_rset`` (headers, ``L`` messages, counts)."""
        state = session.notes.get(self.key)
        if isinstance(state, _State):
            state.reset()
            state.stash = None


def _kill_group(pid: int) -> None:
    """SIGKILL the program's process group (its own session: ``/bin/sh -c`` children
    go too)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _escape(text: str) -> str:
    """Printable for a log line (control characters escaped)."""
    return text.encode("unicode_escape", "backslashreplace").decode("ascii") \
        if _UNPRINTABLE.search(text) else text
