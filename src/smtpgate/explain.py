"""Explain mode: run the whole chain on a stored message as a dry run, and say why
(``smtpgate explain``; docs/explain.md).

Entry points: :func:`explain` (the dry run) and :class:`Explanation` (what it found:
each SMTP command, the reply, and the decision record of every plugin that ran for it),
with :meth:`Explanation.text` and :meth:`Explanation.as_dict` for the CLI.

The dry run is a real SMTP session with the server the configuration describes (the
same chain, the same protocol checks), held in this process on a loopback port that only
it knows; the client address is given to the server in a PROXY protocol header, as a
load balancer would. Nothing leaves: delivery is replaced (a ``queue`` hook that runs
first takes the accepted message and answers ``250 2.0.0 Dry run: not delivered``), no
admin, milter or policy listener is opened, and every session has ``dry_run`` set, which
tells plugins that keep state (greylisting, rate limits) to judge without counting.
Content scanners configured with ``[[scanner]]`` are asked, as they are part of the chain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from .app import Smtpgate
from .config import AdminConfig, Config, ListenerConfig
from .envelope import Decision, SessionInfo
from .hooks import HookResult, Stage, Transaction, accept

__all__ = ["Explanation", "Step", "explain"]

DRY_RUN_REPLY = "Dry run: not delivered"


@dataclass(slots=True)
class Step:
    """One command of the dry run.

    Attributes:
        command: what was sent (``"RCPT TO:<bob@example.com>"``; ``"(connect)"`` for the
            greeting, ``"(message)"`` for the end of data).
        reply: the server's reply, lines joined by ``" / "``.
        decisions: the plugins' decisions while the server handled it, in order.
    """

    command: str
    reply: str
    decisions: list[Decision] = field(default_factory=list)


@dataclass(slots=True)
class Explanation:
    """What the dry run found.

    Attributes:
        steps: the commands, replies and decisions, in order.
        outcome: ``"accepted"`` (the message would be delivered), ``"refused"`` (a
            permanent refusal) or ``"deferred"`` (a temporary one), with where.
        findings: the ``results`` findings of the transaction (``Finding.text()``).
    """

    steps: list[Step]
    outcome: str
    findings: list[str]

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: ``{"outcome", "findings", "steps": [{"command", "reply",
        "decisions": [{"stage", "plugin", "hook", "verdict", "reply", "ms", "findings"}]}]}``."""
        return {
            "outcome": self.outcome,
            "findings": list(self.findings),
            "steps": [{"command": s.command, "reply": s.reply,
                       "decisions": [{"stage": d.stage, "plugin": d.plugin, "hook": d.hook,
                                      "verdict": d.verdict, "reply": d.reply,
                                      "ms": round(d.seconds * 1000, 3),
                                      "findings": list(d.findings)}
                                     for d in s.decisions]}
                      for s in self.steps],
        }

    def text(self) -> str:
        """A readable report: each command, its reply, and below it each plugin's decision
        (``stage plugin verdict [reply] (ms) findings``)."""
        lines: list[str] = []
        for step in self.steps:
            lines.append(f"> {step.command}")
            lines.append(f"< {step.reply}")
            for d in step.decisions:
                extra = f" {d.reply}" if d.reply else ""
                found = f"  [{'; '.join(d.findings)}]" if d.findings else ""
                lines.append(f"    {d.stage:<10} {d.plugin:<24} {d.verdict}{extra} "
                             f"({d.seconds * 1000:.1f} ms){found}")
        lines.append(f"outcome: {self.outcome}")
        if self.findings:
            lines.append("results: " + "; ".join(self.findings))
        return "\n".join(lines) + "\n"


def _dry_config(config: Config) -> Config:
    """``config`` with one private loopback SMTP listener behind a trusted PROXY header,
    and no other listener."""
    listener = ListenerConfig(address="127.0.0.1:0", protocol="smtp", tls="none",
                              proxy_protocol=True, trusted_proxies=("127.0.0.1",))
    return dataclasses.replace(
        config, server=dataclasses.replace(config.server, listen=(), workers=1),
        listeners=(listener,), admin=AdminConfig())


def _stuff(message: bytes) -> bytes:
    """CRLF lines, dot-stuffed, ended by ``.CRLF`` (RFC 5321 §4.5.2)."""
    text = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    lines = [b"." + line if line.startswith(b".") else line for line in text.split(b"\r\n")]
    return b"\r\n".join(lines) + b".\r\n"


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines: list[str] = []
    while True:
        raw = await reader.readline()
        if not raw:
            raise ConnectionError("the server closed the connection")
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            break
    code = int(lines[-1][:3]) if lines[-1][:3].isdigit() else 0
    return code, " / ".join(lines)


async def explain(
    config: Config,
    message: bytes,
    *,
    client_ip: str,
    mail_from: str,
    recipients: Sequence[str],
    helo: str = "client.example",
    timeout: float = 120.0,
) -> Explanation:
    """Run the chain of ``config`` on ``message`` as a dry run.

    Args:
        config: the configuration (as ``serve`` would use it).
        message: the message (RFC 5322; LF or CRLF lines).
        client_ip: the client address the server sees (IPv4 or IPv6).
        mail_from: the reverse-path (``""`` for ``<>``).
        recipients: the forward-paths (at least one).
        helo: the EHLO name.
        timeout: seconds for the whole dry run.

    Returns:
        The :class:`Explanation`.

    Raises:
        ConfigError: the configuration cannot be started (a plugin that cannot load).
        ValueError: ``client_ip`` is not an IP address, or no recipient.
        TimeoutError: the dry run took longer than ``timeout``.
    """
    ip = ipaddress.ip_address(client_ip)
    if not recipients:
        raise ValueError("at least one recipient is needed")
    seen: list[SessionInfo] = []
    taken: list[Transaction] = []
    app = Smtpgate(_dry_config(config), deliver=lambda envelope, data: None)

    def capture_session(session: SessionInfo) -> None:
        seen.append(session)

    def take_message(session: SessionInfo, tx: Transaction) -> HookResult:
        taken.append(tx)
        return accept(DRY_RUN_REPLY)

    app.hook(Stage.CONNECT, priority=-100)(capture_session)
    app.hook(Stage.QUEUE, priority=-100)(take_message)
    await app.start()
    try:
        assert app.server is not None
        for _, _, ctx in app.server.listeners:
            ctx.dry_run = True
        host, port = app.addresses[0]
        async with asyncio.timeout(timeout):
            return await _dialogue(host, port, ip, message, mail_from, recipients, helo,
                                   seen, taken)
    finally:
        await app.stop(0)


async def _dialogue(host: str, port: int, ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                    message: bytes, mail_from: str, recipients: Sequence[str], helo: str,
                    seen: list[SessionInfo], taken: list[Transaction]) -> Explanation:
    reader, writer = await asyncio.open_connection(host, port)
    family = "TCP4" if ip.version == 4 else "TCP6"
    dst = "127.0.0.1" if ip.version == 4 else "::1"
    writer.write(f"PROXY {family} {ip} {dst} 40000 25\r\n".encode("ascii"))
    steps: list[Step] = []
    used = 0

    def decisions() -> list[Decision]:
        nonlocal used
        if not seen:
            return []
        record = seen[0].decisions
        new = [d for d in record[used:] if not (d.plugin.startswith("smtpgate.explain"))]
        used = len(record)
        return new

    async def say(command: str, data: bytes | None = None) -> int:
        writer.write(data if data is not None else command.encode("utf-8") + b"\r\n")
        code, reply = await _read_reply(reader)
        steps.append(Step(command, reply, decisions()))
        return code

    outcome = ""
    try:
        code, greeting = await _read_reply(reader)
        steps.append(Step("(connect)", greeting, decisions()))
        if code != 220:
            outcome = f"{'deferred' if code < 500 else 'refused'} at connect"
        elif (code := await say(f"EHLO {helo}")) != 250:
            outcome = f"{'deferred' if code < 500 else 'refused'} at EHLO"
        else:
            eight_bit = any(b > 127 for b in message)
            params = f" SIZE={len(message)}" + (" BODY=8BITMIME" if eight_bit else "")
            code = await say(f"MAIL FROM:<{mail_from}>{params}")
            if code != 250:
                outcome = f"{'deferred' if code < 500 else 'refused'} at MAIL"
            else:
                accepted = 0
                codes = []
                for rcpt in recipients:
                    c = await say(f"RCPT TO:<{rcpt}>")
                    codes.append(c)
                    accepted += c in (250, 251)
                if not accepted:
                    worst = "refused" if all(c >= 500 for c in codes) else "deferred"
                    outcome = f"{worst} at RCPT (every recipient)"
                elif (code := await say("DATA")) != 354:
                    outcome = f"{'deferred' if code < 500 else 'refused'} at DATA"
                else:
                    code = await say("(message)", _stuff(message))
                    if code == 250 and taken:
                        part = "" if accepted == len(recipients) else \
                            f" for {accepted} of {len(recipients)} recipients"
                        outcome = f"accepted{part} (dry run: not delivered)"
                    elif code == 250:
                        outcome = "accepted, but a plugin quarantined or took the message"
                    else:
                        outcome = f"{'deferred' if code < 500 else 'refused'} at end of data"
        writer.write(b"QUIT\r\n")
        try:
            await _read_reply(reader)
        except ConnectionError:
            pass
    except ConnectionError:
        outcome = outcome or "the server closed the connection"
    finally:
        writer.close()
    findings = [f.text() for f in taken[0].results] if taken else []
    return Explanation(steps, outcome, findings)
