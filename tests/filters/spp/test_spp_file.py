"""The plugins file format (qmail-spp README, section 9) and the reply built from a
plugin's message lines (RFC 5321 §4.2, RFC 3463)."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpgate.hooks import Stage
from smtpgate.plugins.qmail_spp import build_reply
from smtpgate.plugins.spp_file import SECTIONS, load_spp_file, parse_spp_file
from smtpgate.reply import Reply

SAMPLE = """# smtpplugins sample file
[connection]
:plugins/rbl -r relays.ordb.org

[auth]
plugins/onlycrammd5

[helo]
:plugins/badhelo example.com spammers.com

[mail]
plugins/blacklisted
plugins/spf
plugins/dnsmx-check

[rcpt]
plugins/rcptexists
:plugins/tarpit --start-after=5 --wait=3
plugins/greylisting

[data]
plugins/foo
"""


def test_the_readme_sample() -> None:
    f = parse_spp_file(SAMPLE, "/var/qmail")
    assert [p.line for p in f.programs("rcpt")] == [
        "plugins/rcptexists", ":plugins/tarpit --start-after=5 --wait=3",
        "plugins/greylisting"]
    assert f.programs("rcpt")[0].argv == ("/var/qmail/plugins/rcptexists",)
    assert f.programs("rcpt")[1].argv == (
        "/bin/sh", "-c", "plugins/tarpit --start-after=5 --wait=3")
    assert f.programs("rcpt")[1].shell and not f.programs("rcpt")[0].shell
    assert [p.line for p in f.programs("auth")] == ["plugins/onlycrammd5"]
    assert [p.lineno for p in f.programs("mail")] == [12, 13, 14]
    assert {s: len(f.programs(s)) for s in SECTIONS} == {
        "connection": 1, "helo": 1, "mail": 3, "rcpt": 3, "data": 1, "auth": 1}
    assert f.ignored == ()


def test_first_letter_decides_unknown_sections_ignored() -> None:
    """As qmail-spp: only the first letter after '[' counts; others are ignored, as
    are programs before the first section; absolute paths stay as they are."""
    f = parse_spp_file("before/any\n[RCPT]\n/usr/bin/x\n[recipient]\ny\n[xyz]\nz\n"
                       "  [mail]  \n  # indented comment\n\t:echo N  \n", "/d")
    assert [p.argv for p in f.programs("rcpt")] == [("/usr/bin/x",), ("/d/y",)]
    assert f.ignored == ((1, "before/any"), (7, "z"))
    assert [p.argv for p in f.programs("mail")] == [("/bin/sh", "-c", "echo N")]


def test_load_checks_programs(tmp_path: Path) -> None:
    (tmp_path / "ok").write_text("#!/bin/sh\n")
    (tmp_path / "ok").chmod(0o755)
    (tmp_path / "noexec").write_text("#!/bin/sh\n")
    (tmp_path / "smtpplugins").write_text("[mail]\nok\n:not checked\n")
    assert load_spp_file(str(tmp_path / "smtpplugins")).programs("mail")[0].argv == (
        str(tmp_path / "ok"),)
    (tmp_path / "smtpplugins").write_text("[mail]\nnoexec\n")
    with pytest.raises(ValueError, match=r"smtpplugins:2: \[mail\] noexec: not executable"):
        load_spp_file(str(tmp_path / "smtpplugins"))
    with pytest.raises(OSError):
        load_spp_file(str(tmp_path / "absent"))


@pytest.mark.parametrize("lines, stage, expected", [
    (["553 sorry, in my badmailfrom list (#5.7.1)"], Stage.MAIL,
     Reply(553, "5.7.1", "sorry, in my badmailfrom list (#5.7.1)")),
    (["550 5.1.1 no mailbox"], Stage.RCPT, Reply(550, "5.1.1", "no mailbox")),
    (["450 try later"], Stage.RCPT, Reply(450, "4.7.1", "try later")),
    (["go away"], Stage.RCPT, Reply(550, "5.7.1", "go away")),
    (["go away"], Stage.CONNECT, Reply(554, "5.7.1", "go away")),
    (["go away"], Stage.AUTH, Reply(535, "5.7.8", "go away")),
    (["250 fine"], Stage.MAIL, Reply(550, "5.7.1", "250 fine")),       # not a refusal code
    (["550 4.7.1 class mismatch"], Stage.MAIL, Reply(550, "5.7.1", "4.7.1 class mismatch")),
    (["554"], Stage.DATA_START, Reply(554, "5.7.1", "Transaction rejected")),
    (["451-first", "451-4.7.1 second", "451 4.7.1 last"], Stage.RCPT,
     Reply(451, "4.7.1", "first\nsecond\nlast")),
    (["550 bad\tbyte \u00e9"], Stage.MAIL, Reply(550, "5.7.1", "bad?byte ?")),
])
def test_build_reply(lines: list[str], stage: Stage, expected: Reply) -> None:
    assert build_reply(lines, stage) == expected
