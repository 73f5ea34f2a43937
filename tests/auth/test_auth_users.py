"""Tests for the argon2 users file (smtpgate.auth.users)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from argon2 import PasswordHasher, extract_parameters
from argon2.profiles import RFC_9106_LOW_MEMORY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpgate.auth import add_user, delete_user, load_users, verify_password
from smtpgate.errors import ConfigError

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_add_load_verify_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "users"
    add_user(path, "alice@example.com", "s3cret!", hasher=CHEAP)
    add_user(path, "bob", "hunter2", hasher=CHEAP)
    users = load_users(path)
    assert list(users) == ["alice@example.com", "bob"]
    assert users["alice@example.com"].startswith("$argon2id$")
    assert verify_password(users["alice@example.com"], "s3cret!") is True
    assert verify_password(users["alice@example.com"], "hunter2") is False
    assert verify_password(users["bob"], "hunter2") is True
    assert mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users"]  # no temp files left
    assert "s3cret" not in path.read_text()


def test_default_hasher_is_argon2id_rfc9106_low_memory(tmp_path: Path) -> None:
    path = tmp_path / "users"
    add_user(path, "carol", "pw")
    params = extract_parameters(load_users(path)["carol"])
    assert params == RFC_9106_LOW_MEMORY
    assert verify_password(load_users(path)["carol"], "pw")


def test_replace_keeps_position_comments_and_others(tmp_path: Path) -> None:
    path = tmp_path / "users"
    add_user(path, "a", "pw-a", hasher=CHEAP)
    add_user(path, "b", "old", hasher=CHEAP)
    add_user(path, "c", "pw-c", hasher=CHEAP)
    text = path.read_text()
    path.write_text("# users of smtpgate\n\n" + text)
    old_hash_a = load_users(path)["a"]
    add_user(path, "b", "new", hasher=CHEAP)
    lines = path.read_text().split("\n")
    assert lines[0] == "# users of smtpgate"
    assert lines[1] == ""
    assert [ln.split(":")[0] for ln in lines[2:5]] == ["a", "b", "c"]
    users = load_users(path)
    assert users["a"] == old_hash_a
    assert verify_password(users["b"], "new")
    assert not verify_password(users["b"], "old")


def test_mode_forced_to_0600_on_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("# empty\n")
    os.chmod(path, 0o644)
    add_user(path, "x", "y", hasher=CHEAP)
    assert mode(path) == 0o600
    assert delete_user(path, "x") is True
    assert mode(path) == 0o600
    assert path.read_text() == "# empty\n"


def test_delete(tmp_path: Path) -> None:
    path = tmp_path / "users"
    assert delete_user(path, "nobody") is False
    assert not path.exists()
    add_user(path, "a", "1", hasher=CHEAP)
    add_user(path, "b", "2", hasher=CHEAP)
    before = path.stat().st_ino
    assert delete_user(path, "zed") is False
    assert path.stat().st_ino == before  # not rewritten
    assert delete_user(path, "a") is True
    assert list(load_users(path)) == ["b"]
    assert delete_user(path, "a") is False


def test_name_may_contain_colon_and_unicode_separators(tmp_path: Path) -> None:
    path = tmp_path / "users"
    odd = ['"we:ird"@example.com', "a\u2028b", "ü@bücher.example", "x\x0cy"]
    for i, name in enumerate(odd):
        add_user(path, name, f"pw{i}", hasher=CHEAP)
    users = load_users(path)
    assert list(users) == odd
    for i, name in enumerate(odd):
        assert verify_password(users[name], f"pw{i}")


@pytest.mark.parametrize("name", ["", " alice", "alice ", "#alice", "a\nb", "a\rb", "a\0b"])
def test_invalid_name_rejected_file_untouched(tmp_path: Path, name: str) -> None:
    path = tmp_path / "users"
    add_user(path, "ok", "pw", hasher=CHEAP)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        add_user(path, name, "pw", hasher=CHEAP)
    assert path.read_bytes() == before


def test_empty_password_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        add_user(tmp_path / "users", "a", "", hasher=CHEAP)
    assert not (tmp_path / "users").exists()


@pytest.mark.parametrize(
    ("bad_line", "fragment"),
    [
        ("no-colon-here", "expected 'name:hash'"),
        (":$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo", "expected 'name:hash'"),
        ("bob:plaintext", "must start with '$argon2'"),
        ("bob:$argon2id$garbage", "malformed argon2 hash"),
        ("bob :$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo", "whitespace"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad_line: str, fragment: str) -> None:
    path = tmp_path / "users"
    add_user(path, "alice", "pw", hasher=CHEAP)
    good = path.read_text()
    path.write_text("# comment\n" + good + bad_line + "\n")
    with pytest.raises(ConfigError) as info:
        load_users(path)
    msg = str(info.value)
    assert f"{path}:3:" in msg
    assert fragment in msg
    assert "aGFzaGhhc2hoYXNo" not in msg  # hashes are not echoed
    # add_user/delete_user refuse to rewrite a file they do not understand
    with pytest.raises(ConfigError):
        add_user(path, "x", "y", hasher=CHEAP)
    with pytest.raises(ConfigError):
        delete_user(path, "alice")
    assert path.read_text().endswith(bad_line + "\n")


def test_duplicate_user_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "users"
    add_user(path, "alice", "pw", hasher=CHEAP)
    line = path.read_text()
    path.write_text(line + "\n" + line)
    with pytest.raises(ConfigError, match=r":3: duplicate user 'alice' \(first on line 1\)"):
        load_users(path)


def test_crlf_and_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "users"
    add_user(path, "alice", "pw", hasher=CHEAP)
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert verify_password(load_users(path)["alice"], "pw")
    path.write_bytes(b"\xff\xfe:$argon2id\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_users(path)


def test_missing_file_is_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_users(tmp_path / "nope")


def test_verify_password_never_raises() -> None:
    h = CHEAP.hash("right")
    assert verify_password(h, "right") is True
    assert verify_password(h, b"right") is True
    assert verify_password(h, "wrong") is False
    assert verify_password(h, "") is False
    assert verify_password(h, "\udcff\ud800") is False  # unencodable surrogates
    assert verify_password("not a hash", "right") is False
    assert verify_password("", "right") is False
    assert verify_password("$argon2id$v=19$m=8,t=1,p=1$AAAA$", "right") is False
    # surrogateescape'd bytes map back to the raw bytes
    raw = CHEAP.hash(b"caf\xe9")
    assert verify_password(raw, b"caf\xe9".decode("utf-8", "surrogateescape")) is True


names = st.text(
    alphabet=st.characters(exclude_characters="\r\n\0", exclude_categories=["Cs"]),
    min_size=1,
    max_size=30,
).filter(lambda s: s == s.strip() and not s.startswith("#"))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=names)
def test_any_valid_name_round_trips(tmp_path: Path, name: str) -> None:
    path = tmp_path / "users"
    add_user(path, "first", "pw", hasher=CHEAP)
    add_user(path, name, "pw2", hasher=CHEAP)
    users = load_users(path)
    assert name in users
    assert verify_password(users[name], "pw2")
    assert delete_user(path, name) is True
    assert name not in load_users(path)
    path.unlink()
