"""smtpgate.preflight: the start-up checks shared by ``check-config`` and ``serve``.

Real files and directories (``/proc`` for a place nothing can be created, as root too);
every problem must name its key, all problems come at once, and nothing is created.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from smtpgate.config import config_from_mapping, load_config
from smtpgate.errors import ConfigError
from smtpgate.preflight import check_writable_dir, preflight


def problems(data: dict[str, Any], base_dir: Path, **kw: Any) -> list[str]:
    cfg = config_from_mapping(data, base_dir=base_dir)
    with pytest.raises(ConfigError) as info:
        preflight(cfg, **kw)
    return info.value.problems


def test_writable_directory_probes_leave_nothing(tmp_path: Path) -> None:
    assert check_writable_dir(str(tmp_path)) is None
    assert check_writable_dir(str(tmp_path / "a" / "b" / "c")) is None
    assert os.listdir(tmp_path) == []


def test_unwritable_directories(tmp_path: Path) -> None:
    why = check_writable_dir("/proc/smtpgate-test/spool")
    assert why is not None and why.startswith("cannot create /proc/smtpgate-test/spool")
    (tmp_path / "file").write_text("x")
    why = check_writable_dir(str(tmp_path / "file" / "mail"))
    assert why == f"cannot create {tmp_path / 'file' / 'mail'}: {tmp_path / 'file'} is not a directory"
    assert check_writable_dir(str(tmp_path / "file")) == f"{tmp_path / 'file'} exists and is not a directory"
    (tmp_path / "md").mkdir()
    (tmp_path / "md" / "new").write_text("x")
    why = check_writable_dir(str(tmp_path / "md"), ("tmp", "new", "cur"))
    assert why == f"{tmp_path / 'md' / 'new'} exists and is not a directory"


def test_every_problem_at_once_each_with_its_key(tmp_path: Path, monkeypatch: Any) -> None:
    (tmp_path / "broken_hook_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "users").write_text("no-hash-here\n")
    found = problems({
        "hooks": {"connect": "broken_hook_mod:f", "rcpt": ["os:getcwd", "os:no_such_attr"]},
        "auth": {"authenticator": "no_such_auth_mod:check", "users_file": "users"},
        "tls": {"certificate": "cert.pem"},
        "maildir": {"path": "/proc/smtpgate-mail"},
        "server": {"pid_file": "missing-dir/smtpgate.pid"},
    }, tmp_path)
    keys = [p.split(": ", 1)[0] for p in found]
    assert keys == ["hooks.connect", "hooks.rcpt[1]", "auth.authenticator", "tls.certificate",
                    "auth.users_file", "maildir.path", "server.pid_file"]
    assert "boom at import" in found[0]
    assert set(os.listdir(tmp_path)) - {"__pycache__"} == {"broken_hook_mod.py", "cert.pem",
                                                          "users"}


def test_implicit_tls_listener_needs_a_certificate(tmp_path: Path) -> None:
    found = problems({"listener": [{"address": "127.0.0.1:0", "tls": "starttls"},
                                   {"address": "127.0.0.1:0", "tls": "implicit"}]}, tmp_path)
    assert found == ['listener[1].tls: "implicit" needs [tls] certificate']


def test_stdio_modes_skip_listener_checks(tmp_path: Path) -> None:
    cfg = config_from_mapping({
        "listener": [{"address": "127.0.0.1:0", "tls": "implicit"}],
        "server": {"pid_file": "missing-dir/smtpgate.pid"},
    }, base_dir=tmp_path)
    preflight(cfg, listeners=False)


def test_spool_checked_in_queue_mode_only(tmp_path: Path) -> None:
    bad_spool = {"queue": {"path": "/proc/smtpgate-queue"}}
    # Maildir delivery: the spool is not used, so not checked
    preflight(config_from_mapping(bad_spool, base_dir=tmp_path))
    found = problems({**bad_spool, "relay": {"url": "smtp://127.0.0.1:9"}}, tmp_path)
    assert found == ["queue.path: cannot create /proc/smtpgate-queue: No such file or directory"]
    found = problems({**bad_spool, "relay": {"url": "mx:"}}, tmp_path)
    assert [p.split(":")[0] for p in found] == ["queue.path"]


def test_maildir_checked_only_when_it_receives_mail(tmp_path: Path) -> None:
    bad = {"maildir": {"path": "/proc/smtpgate-mail"}}
    preflight(config_from_mapping({**bad, "relay": {"url": "discard:"}}, base_dir=tmp_path))
    assert problems(bad, tmp_path)[0].startswith("maildir.path: cannot create /proc/")


def test_good_file_passes_and_creates_nothing(tmp_path: Path) -> None:
    conf = tmp_path / "smtpgate.toml"
    conf.write_text('[server]\nlisten = ["localhost:0"]\npid_file = "smtpgate.pid"\n'
                    '[relay]\nurl = "smtp+starttls://127.0.0.1:9"\n')
    preflight(load_config(conf))
    assert os.listdir(tmp_path) == ["smtpgate.toml"]


def test_helo_name_the_relay_would_refuse(tmp_path: Path) -> None:
    found = problems({"server": {"hostname": "bad!name"},
                      "relay": {"url": "smtp://127.0.0.1:9"}}, tmp_path)
    assert found and found[0].startswith("server.hostname: ")


def test_relay_cafile_must_load(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("garbage\n")
    found = problems({"relay": {"url": "smtps://127.0.0.1:9", "cafile": "ca.pem"}}, tmp_path)
    assert [p.split(":")[0] for p in found] == ["relay.cafile"]


def test_capture_database_must_be_writable(tmp_path: Path) -> None:
    ok = config_from_mapping({"delivery": {"mode": "capture"},
                              "capture": {"database": str(tmp_path / "c.sqlite")}})
    preflight(ok, listeners=False)
    (tmp_path / "dir.sqlite").mkdir()
    bad = config_from_mapping({"delivery": {"mode": "capture"},
                               "capture": {"database": str(tmp_path / "dir.sqlite")}})
    with pytest.raises(ConfigError) as info:
        preflight(bad, listeners=False)
    assert info.value.problems == [f"capture.database: {tmp_path / 'dir.sqlite'} is a directory"]
    nowhere = config_from_mapping({"delivery": {"mode": "capture"},
                                   "capture": {"database": "/proc/no/such/c.sqlite"}})
    with pytest.raises(ConfigError) as info:
        preflight(nowhere, listeners=False)
    assert info.value.problems[0].startswith("capture.database: cannot create /proc/no")
