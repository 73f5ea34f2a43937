"""MaildirDelivery: byte-exact files in new/, nothing left in tmp/, errors are 451 4.3.0."""

from __future__ import annotations

import asyncio
import os
import re
import stat
from pathlib import Path

import pytest

from smtpgate.delivery import MaildirDelivery, make_delivery
from smtpgate.envelope import Envelope, Recipient
from smtpgate.errors import TemporaryDeliveryError

MESSAGE = b"From: a@example.org\r\nSubject: x\r\n\r\n.dot line\r\nbody \xc3\xa9\r\n"
NAME_RE = re.compile(r"^\d+\.M\d+P\d+Q\d+\.[^/:]+$")


def env() -> Envelope:
    return Envelope("a@example.org", {}, [Recipient("b@example.com")])


async def test_file_in_new_is_byte_exact(tmp_path: Path) -> None:
    box = tmp_path / "Maildir"
    d = MaildirDelivery(box)
    reply = await d.deliver(env(), MESSAGE)
    await d.aclose()
    assert (reply.code, reply.enhanced) == (250, "2.0.0")
    files = os.listdir(box / "new")
    assert len(files) == 1
    assert reply.text == f"Message stored as {files[0]}"
    assert NAME_RE.match(files[0])
    assert (box / "new" / files[0]).read_bytes() == MESSAGE
    assert os.listdir(box / "tmp") == []
    assert os.listdir(box / "cur") == []
    for sub in ("", "tmp", "new", "cur"):
        assert stat.S_IMODE(os.stat(box / sub).st_mode) & 0o077 == 0


async def test_one_file_per_transaction_unique_names(tmp_path: Path) -> None:
    d = MaildirDelivery(str(tmp_path))
    replies = await asyncio.gather(
        *(d.deliver(env(), MESSAGE + bytes([65 + i])) for i in range(20))
    )
    names = sorted(os.listdir(tmp_path / "new"))
    assert len(names) == 20 == len({r.text for r in replies})
    contents = sorted((tmp_path / "new" / n).read_bytes() for n in names)
    assert contents == sorted(MESSAGE + bytes([65 + i]) for i in range(20))


async def test_existing_maildir_is_used(tmp_path: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (tmp_path / sub).mkdir()
    (tmp_path / "cur" / "old:2,S").write_bytes(b"old")
    await MaildirDelivery(tmp_path).deliver(env(), MESSAGE)
    assert len(os.listdir(tmp_path / "new")) == 1
    assert (tmp_path / "cur" / "old:2,S").read_bytes() == b"old"


async def test_unwritable_tmp_is_temporary_error(tmp_path: Path) -> None:
    (tmp_path / "new").mkdir()
    (tmp_path / "cur").mkdir()
    (tmp_path / "tmp").write_bytes(b"a file where tmp/ should be")
    with pytest.raises(TemporaryDeliveryError) as ei:
        await MaildirDelivery(tmp_path).deliver(env(), MESSAGE)
    assert (ei.value.reply.code, ei.value.reply.enhanced) == (451, "4.3.0")


async def test_failed_rename_removes_temp_file(tmp_path: Path) -> None:
    d = MaildirDelivery(tmp_path)
    d.ensure_dirs()
    # new/ disappears after the directories were checked: the write to tmp/
    # succeeds, the rename into new/ fails.
    (tmp_path / "new").rmdir()
    (tmp_path / "new").write_bytes(b"a file where new/ should be")
    with pytest.raises(TemporaryDeliveryError) as ei:
        await d.deliver(env(), MESSAGE)
    assert ei.value.reply.code == 451
    assert os.listdir(tmp_path / "tmp") == []


async def test_make_delivery_without_url_is_maildir(tmp_path: Path) -> None:
    d = make_delivery(None, maildir_path=str(tmp_path / "m"))
    assert isinstance(d, MaildirDelivery)
    await d.deliver(env(), MESSAGE)
    assert len(os.listdir(tmp_path / "m" / "new")) == 1
