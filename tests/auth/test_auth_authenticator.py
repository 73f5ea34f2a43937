"""Tests for the authentication back ends (smtpgate.auth.authenticator)."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher, extract_parameters

from smtpgate.auth import (
    Authenticator,
    CallableAuthenticator,
    UsersFileAuthenticator,
    add_user,
    delete_user,
)
from smtpgate.envelope import SessionInfo
from smtpgate.errors import AuthError, ConfigError

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
SESSION = SessionInfo(session_id="S1", peer_ip="192.0.2.10", peer_port=40000)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    add_user(path, "alice@example.com", "wonderland", hasher=CHEAP)
    add_user(path, "bob", "builder", hasher=CHEAP)
    return path


async def test_users_file_authenticator(users_file: Path) -> None:
    auth = UsersFileAuthenticator(users_file)
    assert isinstance(auth, Authenticator)
    assert await auth.authenticate("alice@example.com", "wonderland", SESSION) is True
    assert await auth.authenticate("alice@example.com", "builder", SESSION) is False
    assert await auth.authenticate("ALICE@example.com", "wonderland", SESSION) is False
    assert await auth.authenticate("mallory", "wonderland", SESSION) is False
    assert await auth.authenticate("", "", SESSION) is False
    assert auth.usernames() == {"alice@example.com", "bob"}


async def test_reloads_when_file_changes(users_file: Path) -> None:
    clock = Clock()
    auth = UsersFileAuthenticator(users_file, clock=clock)
    assert await auth.authenticate("carol", "pw", SESSION) is False
    add_user(users_file, "carol", "pw", hasher=CHEAP)
    delete_user(users_file, "bob")
    # within the 1 s check interval the old table is still in force
    clock.now += 0.5
    assert await auth.authenticate("carol", "pw", SESSION) is False
    assert await auth.authenticate("bob", "builder", SESSION) is True
    clock.now += 0.6
    assert await auth.authenticate("carol", "pw", SESSION) is True
    assert await auth.authenticate("bob", "builder", SESSION) is False
    # password change of an existing user
    add_user(users_file, "carol", "new", hasher=CHEAP)
    clock.now += 1.0
    assert await auth.authenticate("carol", "pw", SESSION) is False
    assert await auth.authenticate("carol", "new", SESSION) is True


async def test_in_place_edit_detected(users_file: Path) -> None:
    auth = UsersFileAuthenticator(users_file, reload_interval=0.0)
    text = users_file.read_text()
    users_file.write_text(text + "dave:" + CHEAP.hash("pw") + "\n")  # same inode, new size
    assert await auth.authenticate("dave", "pw", SESSION) is True


async def test_broken_reload_keeps_old_table(
    users_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    auth = UsersFileAuthenticator(users_file, reload_interval=0.0)
    good = users_file.read_text()
    users_file.write_text(good + "garbage line\n")
    with caplog.at_level(logging.ERROR, logger="smtpgate.auth"):
        assert await auth.authenticate("bob", "builder", SESSION) is True
    assert any(":3: expected 'name:hash'" in r.getMessage() for r in caplog.records)
    users_file.unlink()
    assert await auth.authenticate("bob", "builder", SESSION) is True
    users_file.write_text(good)
    add_user(users_file, "erin", "pw", hasher=CHEAP)
    assert await auth.authenticate("erin", "pw", SESSION) is True


def test_missing_or_broken_file_at_startup(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read users file"):
        UsersFileAuthenticator(tmp_path / "absent")
    (tmp_path / "bad").write_text("x:y\n")
    with pytest.raises(ConfigError, match=r"bad:1:"):
        UsersFileAuthenticator(tmp_path / "bad")


def test_dummy_hash_matches_file_parameters(users_file: Path, tmp_path: Path) -> None:
    auth = UsersFileAuthenticator(users_file)
    assert extract_parameters(auth._dummy) == extract_parameters(CHEAP.hash("x"))
    empty = tmp_path / "empty"
    empty.write_text("# nobody yet\n")
    auth2 = UsersFileAuthenticator(empty)
    assert extract_parameters(auth2._dummy) == extract_parameters(PasswordHasher().hash("x"))


async def test_unknown_user_costs_a_verification_off_the_loop(tmp_path: Path) -> None:
    """Default-cost hashes: unknown users take as long as known ones; the loop keeps running."""
    path = tmp_path / "users"
    add_user(path, "real", "pw")  # default parameters (~100 ms per verification)
    auth = UsersFileAuthenticator(path)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())

    async def timed(user: str) -> float:
        t0 = time.perf_counter()
        assert await auth.authenticate(user, "wrong", SESSION) is False
        return time.perf_counter() - t0

    known = min([await timed("real"), await timed("real")])
    unknown = min([await timed("ghost"), await timed("ghost")])
    stop.set()
    await task
    assert unknown > 0.5 * known, (known, unknown)
    assert ticks >= 10  # the event loop was not blocked during ~4 verifications


async def test_concurrency_is_bounded(users_file: Path) -> None:
    auth = UsersFileAuthenticator(users_file, max_concurrent=2)
    results = await asyncio.gather(
        *(auth.authenticate("bob", "builder" if i % 2 else "x", SESSION) for i in range(10))
    )
    assert results == [bool(i % 2) for i in range(10)]


# ------------------------------------------------------------ CallableAuthenticator

USERS = {"alice": "wonderland"}


def sync2(username: str, password: str) -> bool:
    return USERS.get(username) == password


def sync3(username: str, password: str, session: SessionInfo) -> bool:
    return USERS.get(username) == password and session.peer_ip == "192.0.2.10"


async def async2(username: str, password: str) -> bool:
    await asyncio.sleep(0)
    return USERS.get(username) == password


async def async3(username: str, password: str, session: SessionInfo) -> bool:
    await asyncio.sleep(0)
    return USERS.get(username) == password and session.session_id == "S1"


class AsyncCallable:
    async def __call__(self, username: str, password: str, session: SessionInfo) -> bool:
        return USERS.get(username) == password


def returns_awaitable(username: str, password: str) -> Any:
    return async2(username, password)


def varargs(*args: Any) -> bool:
    return len(args) == 3 and USERS.get(args[0]) == args[1]


@pytest.mark.parametrize(
    ("func", "passes_session"),
    [
        (sync2, False),
        (sync3, True),
        (async2, False),
        (async3, True),
        (AsyncCallable(), True),
        (functools.partial(async3), True),
        (returns_awaitable, False),
        (varargs, True),
        (lambda u, p, s=None: USERS.get(u) == p, True),
    ],
)
async def test_callable_forms(func: Any, passes_session: bool) -> None:
    auth = CallableAuthenticator(func)
    assert isinstance(auth, Authenticator)
    assert auth.passes_session is passes_session
    assert await auth.authenticate("alice", "wonderland", SESSION) is True
    assert await auth.authenticate("alice", "nope", SESSION) is False
    assert await auth.authenticate("bob", "wonderland", SESSION) is False


async def test_session_is_passed() -> None:
    other = SessionInfo(session_id="S2", peer_ip="198.51.100.1", peer_port=1)
    assert await CallableAuthenticator(sync3).authenticate("alice", "wonderland", other) is False
    assert await CallableAuthenticator(async3).authenticate("alice", "wonderland", other) is False


async def test_sync_runs_in_thread_unless_disabled() -> None:
    seen: list[int] = []

    def record(username: str, password: str) -> bool:
        seen.append(threading.get_ident())
        return True

    await CallableAuthenticator(record).authenticate("a", "b", SESSION)
    await CallableAuthenticator(record, run_in_thread=False).authenticate("a", "b", SESSION)
    assert seen[0] != threading.get_ident()
    assert seen[1] == threading.get_ident()


def test_bad_arity_rejected_at_construction() -> None:
    with pytest.raises(TypeError, match="username, password"):
        CallableAuthenticator(lambda u: True)
    with pytest.raises(TypeError, match="username, password"):
        CallableAuthenticator(lambda u, p, s, extra: True)
    with pytest.raises(TypeError):
        CallableAuthenticator("not callable")  # type: ignore[arg-type]


PASSWORD = "Tr0ub4dor&3-secret"


def leaky(username: str, password: str) -> bool:
    raise RuntimeError(f"LDAP bind failed for {username} with {password}")


async def leaky_async(username: str, password: str, session: SessionInfo) -> bool:
    raise ConnectionRefusedError(f"db down ({password})")


@pytest.mark.parametrize("func", [leaky, leaky_async])
async def test_backend_exception_becomes_auth_error_without_password(
    func: Any, caplog: pytest.LogCaptureFixture
) -> None:
    auth = CallableAuthenticator(func)
    with caplog.at_level(logging.DEBUG, logger="smtpgate.auth"):
        with pytest.raises(AuthError) as info:
            await auth.authenticate("alice", PASSWORD, SESSION)
    assert PASSWORD not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert caplog.records, "the failure is logged"
    assert any("alice" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        assert PASSWORD not in record.getMessage()
        assert PASSWORD not in (caplog.text or "")


async def test_short_password_in_error_is_withheld(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="smtpgate.auth"):
        with pytest.raises(AuthError):
            await CallableAuthenticator(leaky).authenticate("alice", "pw", SESSION)
    assert "withheld" in caplog.text
    assert "with pw" not in caplog.text


@pytest.mark.parametrize("result", [None, 1, "yes", 0])
async def test_non_bool_result_is_auth_error(result: Any) -> None:
    auth = CallableAuthenticator(lambda u, p: result)
    with pytest.raises(AuthError):
        await auth.authenticate("alice", "wonderland", SESSION)
