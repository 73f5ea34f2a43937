"""The users file: SMTP AUTH (RFC 4954) user names with argon2id password hashes.

Entry points: :func:`load_users`, :func:`add_user`, :func:`delete_user`,
:func:`verify_password`. Hashes are PHC strings made by argon2-cffi (RFC 9106).

File format (UTF-8, one entry per line)::

    # comment lines start with '#'; blank lines are ignored
    alice@example.com:$argon2id$v=19$m=65536,t=3,p=4$<salt>$<hash>

Each entry is ``name:hash``. The line is split at its LAST ``:`` (a PHC hash
never contains one), so a name may hold any character except CR, LF and NUL,
including ``:`` and ``@``; it must not be empty, start with ``#`` or carry
leading/trailing whitespace. Names are compared exactly (case-sensitive). The
hash must start with ``$argon2``. A name may appear only once.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError

from ..errors import ConfigError

__all__ = ["add_user", "delete_user", "load_users", "validate_name", "verify_password"]

logger = logging.getLogger("smtpgate.auth.users")

_HASH_PREFIX = "$argon2"
_FILE_MODE = 0o600
# verify() takes its cost parameters from the hash itself; one shared instance is enough.
_VERIFIER = PasswordHasher()

# A parsed line: ("entry", name, hash) or ("other", raw line, "") for comments/blank lines.
_Line = tuple[str, str, str]


def validate_name(name: str) -> str:
    """Check a user name for the users file.

    Args:
        name: the SMTP AUTH identity (often an e-mail address).

    Returns:
        The name, unchanged.

    Raises:
        ValueError: when the name is not a string, is empty, starts with ``#``,
            has leading/trailing whitespace, or contains CR, LF or NUL.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("user name must be a non-empty string")
    if name != name.strip():
        raise ValueError("user name must not start or end with whitespace")
    if name.startswith("#"):
        raise ValueError("user name must not start with '#'")
    if any(c in name for c in "\r\n\0"):
        raise ValueError("user name must not contain CR, LF or NUL")
    return name


def _parse(path: Path, text: str) -> list[_Line]:
    """Parse the users file text; raises ConfigError naming file and line."""
    lines: list[_Line] = []
    seen: dict[str, int] = {}
    # Split on LF only: str.splitlines() would also split on U+2028, VT, FF, ...
    if text.endswith("\n"):
        text = text[:-1]
    for lineno, raw in enumerate(text.split("\n") if text else [], start=1):
        raw = raw.removesuffix("\r")
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            lines.append(("other", raw, ""))
            continue
        name, sep, pw_hash = stripped.rpartition(":")
        where = f"{path}:{lineno}"
        if not sep or not name:
            raise ConfigError(f"{where}: expected 'name:hash'")
        if not pw_hash.startswith(_HASH_PREFIX):
            raise ConfigError(f"{where}: password hash must start with {_HASH_PREFIX!r}")
        try:
            validate_name(name)
            extract_parameters(pw_hash)
        except (ValueError, InvalidHashError) as exc:
            # Never echo the line: it holds a hash.
            raise ConfigError(f"{where}: {str(exc) or 'malformed argon2 hash'}") from None
        if name in seen:
            raise ConfigError(f"{where}: duplicate user {name!r} (first on line {seen[name]})")
        seen[name] = lineno
        lines.append(("entry", name, pw_hash))
    return lines


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def load_users(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a users file.

    Args:
        path: the users file (format in the module docstring).

    Returns:
        ``{name: argon2 PHC hash string}`` in file order.

    Raises:
        ConfigError: on a malformed line (the problem names ``file:line``) or
            a file that is not UTF-8.
        OSError: when the file cannot be read (e.g. ``FileNotFoundError``).
    """
    p = Path(path)
    return {name: h for kind, name, h in _parse(p, _read(p)) if kind == "entry"}


def _write_atomic(path: Path, lines: list[_Line]) -> None:
    """Write the file atomically: temp file in the same dir, fsync, rename, fsync dir."""
    body = "".join((f"{a}:{b}" if kind == "entry" else a) + "\n" for kind, a, b in lines)
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


def _existing_lines(path: Path) -> list[_Line]:
    try:
        text = _read(path)
    except FileNotFoundError:
        return []
    return _parse(path, text)


def add_user(
    path: str | os.PathLike[str],
    name: str,
    password: str,
    *,
    hasher: PasswordHasher | None = None,
) -> None:
    """Create or replace one user's entry, hashing the password with argon2id.

    Comments, blank lines and the other entries are kept; a replaced entry keeps
    its position, a new one is appended. The file is rewritten atomically (temp
    file in the same directory, fsync, ``os.replace``) with mode 0600. Concurrent
    writers are not serialised: the last one wins.

    Args:
        path: the users file; created when missing (its directory must exist).
        name: the user name (see :func:`validate_name`).
        password: the clear-text password; never logged.
        hasher: the argon2-cffi hasher; default ``PasswordHasher()`` (argon2id,
            RFC 9106 low-memory profile: t=3, m=64 MiB, p=4).

    Raises:
        ValueError: on an invalid name or an empty password.
        ConfigError: when the existing file is malformed (it is left untouched).
        OSError: when the file cannot be read or written.
    """
    validate_name(name)
    if not isinstance(password, str) or not password:
        raise ValueError("password must be a non-empty string")
    p = Path(path)
    lines = _existing_lines(p)
    pw_hash = (hasher or PasswordHasher()).hash(password)
    new: _Line = ("entry", name, pw_hash)
    for i, (kind, existing, _) in enumerate(lines):
        if kind == "entry" and existing == name:
            lines[i] = new
            action = "replaced"
            break
    else:
        lines.append(new)
        action = "added"
    _write_atomic(p, lines)
    logger.info("users file %s: %s user %r", p, action, name)


def delete_user(path: str | os.PathLike[str], name: str) -> bool:
    """Remove one user's entry (atomic rewrite, mode 0600, as :func:`add_user`).

    Args:
        path: the users file.
        name: the user name to remove.

    Returns:
        True if the user was present and removed; False if absent or the file
        does not exist (the file is then not rewritten).

    Raises:
        ConfigError: when the existing file is malformed.
        OSError: when the file cannot be read or written.
    """
    p = Path(path)
    lines = _existing_lines(p)
    kept = [line for line in lines if not (line[0] == "entry" and line[1] == name)]
    if len(kept) == len(lines):
        return False
    _write_atomic(p, kept)
    logger.info("users file %s: deleted user %r", p, name)
    return True


def verify_password(password_hash: str, password: str | bytes) -> bool:
    """Check a password against an argon2 PHC hash (constant-time in argon2).

    Takes tens of milliseconds with the default parameters: call it off the
    event loop (``asyncio.to_thread``).

    Args:
        password_hash: the PHC string from the users file.
        password: the clear-text password; ``str`` is encoded as UTF-8 (lone
            surrogates from ``surrogateescape`` decoding map back to their bytes).

    Returns:
        True on a match; False on a mismatch, a malformed hash or an
        unencodable password. Never raises for a wrong password.
    """
    try:
        secret = (
            password.encode("utf-8", "surrogateescape") if isinstance(password, str) else password
        )
        return bool(_VERIFIER.verify(password_hash, secret))
    except (VerificationError, InvalidHashError, UnicodeEncodeError, TypeError):
        return False
