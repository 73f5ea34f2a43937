"""A configurable test plugin (``module = "tests.plugins.probe"``): it registers hooks on
the stages it is told, records every call as one JSON line in a file (so that calls made
in the queue's delivery process are seen too) and answers as it is told.

Options:
    record: the JSON-lines file (``""``: record nothing).
    stages: the stages to register a hook on.
    answers: stage → what to answer: ``"CODE X.Y.Z text"`` (a reply: 2xx/3xx OK,
        4xx DENYSOFT, 5xx DENY), ``"sleep"`` (sleep far past any timeout), ``"raise"``
        (raise RuntimeError), ``"quarantine"`` (QUARANTINE into ``quarantine_path`` with
        ``250 2.0.0 Quarantined``).
    when: stage → a substring the call's subject must contain for the answer to apply
        (the subject: the sender, the recipient, the header block, the command line...).
    priorities: stage → the priority of that stage's hook (default: the plugin's).
    fail_register: raise in ``register``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from smtpgate.envelope import Recipient, SessionInfo
from smtpgate.hooks import HookResult, Stage, Transaction, Verdict
from smtpgate.plugins import Option, PluginRegistry
from smtpgate.reply import Reply

OPTIONS = {
    "record": Option(str, default=""),
    "stages": Option(list, default=[], items=str,
                     check=lambda v: next((f"unknown stage {s!r}" for s in v
                                           if s not in {st.value for st in Stage}), None)),
    "answers": Option(dict, default={}),
    "when": Option(dict, default={}),
    "priorities": Option(dict, default={}),
    "fail_register": Option(bool, default=False),
    "quarantine_path": Option(str, default=""),
}


def read_records(path: Path) -> list[dict[str, Any]]:
    """The calls recorded in ``path``, in order (``[]`` before the first)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _parse(answer: str) -> Reply:
    code, enhanced, text = answer.split(" ", 2)
    return Reply(int(code), enhanced, text)


def _subject(stage: Stage, args: tuple[Any, ...]) -> dict[str, Any]:
    """What a call is about, for the record and for ``when``."""
    session = args[0]
    assert isinstance(session, SessionInfo)
    out: dict[str, Any] = {"session": session.session_id, "auth_user": session.auth_user}
    if stage is Stage.HELO:
        out["subject"] = args[1]
    elif stage is Stage.AUTH:
        out.update(mechanism=args[1], username=args[2], success=args[3], subject=args[2])
    elif stage in (Stage.MAIL, Stage.DATA_START, Stage.QUEUE):
        tx = args[1]
        assert isinstance(tx, Transaction)
        out.update(subject=tx.mail_from, rcpts=[r.address for r in tx.recipients])
    elif stage in (Stage.HEADERS, Stage.DATA):
        tx = args[1]
        assert isinstance(tx, Transaction)
        out.update(subject=tx.header_bytes.decode("utf-8", "replace"),
                   rcpts=[r.address for r in tx.recipients], results=tx.results.summary())
    elif stage is Stage.RCPT:
        rcpt = args[2]
        assert isinstance(rcpt, Recipient)
        out["subject"] = rcpt.address
    elif stage is Stage.VRFY:
        out.update(subject=args[1], kind=args[2])
    elif stage is Stage.UNKNOWN:
        out.update(verb=args[1], subject=args[2])
    elif stage is Stage.DELIVERED:
        tx, rcpt, reply = args[1], args[2], args[3]
        assert isinstance(tx, Transaction) and isinstance(rcpt, Recipient)
        assert isinstance(reply, Reply)
        out.update(subject=rcpt.address, transaction=tx.id, code=reply.code,
                   reply=f"{reply.code} {reply.enhanced} {reply.text}")
    elif stage is Stage.ERROR:
        out["subject"] = f"{args[1].code} {args[2]}"
    else:
        out["subject"] = ""
    return out


def register(registry: PluginRegistry, options: dict[str, Any]) -> None:
    """Register one recording hook on each of ``stages``."""
    if options["fail_register"]:
        raise RuntimeError("probe told to fail")
    record = options["record"]
    answers: dict[str, str] = options["answers"]
    when: dict[str, str] = options["when"]
    priorities: dict[str, int] = options["priorities"]

    def make(stage: Stage) -> Any:
        async def hook(*args: Any) -> HookResult | Reply | None:
            facts = _subject(stage, args)
            if record:
                with open(record, "a") as fh:
                    fh.write(json.dumps({"plugin": registry.name, "stage": stage.value,
                                         **facts}) + "\n")
            answer = answers.get(stage.value)
            if answer is None or when.get(stage.value, "") not in str(facts["subject"]):
                return None
            if answer == "sleep":
                await asyncio.sleep(3600)
            if answer == "raise":
                raise RuntimeError(f"probe raised at {stage.value}")
            if answer == "quarantine":
                return HookResult(Verdict.QUARANTINE, Reply(250, "2.0.0", "Quarantined"),
                                  quarantine=options["quarantine_path"], reason="probe")
            return _parse(answer)

        hook.__name__ = stage.value
        return hook

    for name in options["stages"]:
        stage = Stage(name)
        registry.on(stage, make(stage), priority=priorities.get(name))
