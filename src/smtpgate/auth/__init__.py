"""SMTP AUTH back ends (RFC 4954): argon2 users file, callables, failure limiting.

Entry points: :class:`Authenticator`, :class:`UsersFileAuthenticator`,
:class:`CallableAuthenticator`, :class:`FailureLimiter`, and the users-file
functions :func:`load_users`, :func:`add_user`, :func:`delete_user`, :func:`verify_password`.
"""

from .authenticator import Authenticator, AuthFunc, CallableAuthenticator, UsersFileAuthenticator
from .ratelimit import FailureLimiter, client_key
from .users import add_user, delete_user, load_users, validate_name, verify_password

__all__ = [
    "AuthFunc",
    "Authenticator",
    "CallableAuthenticator",
    "FailureLimiter",
    "UsersFileAuthenticator",
    "add_user",
    "client_key",
    "delete_user",
    "load_users",
    "validate_name",
    "verify_password",
]
