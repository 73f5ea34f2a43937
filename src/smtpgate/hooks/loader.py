"""Load hooks named in the configuration as ``"package.module:function"`` strings.

Entry point: :func:`load_callable` (one spec; the ``hooks`` plugin loads the ``[hooks]``
table with it). Every problem becomes a :class:`~smtpgate.errors.ConfigError` naming the
configuration key.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError

__all__ = ["load_callable"]

log = logging.getLogger("smtpgate.hooks")

# module path: dotted identifiers; attribute path: dotted identifiers.
_DOTTED = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


def load_callable(spec: str, key: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` (or ``"package.module:Class.method"``).

    Args:
        spec: module path, a colon, then a dotted attribute path inside the module.
        key: the configuration key the spec came from (``"hooks.rcpt"``), used in
            error messages.

    Returns:
        The callable object found.

    Raises:
        ConfigError: malformed spec; the module cannot be imported (the message
            includes the import error, e.g. ``hooks.rcpt: cannot import
            'mypkg.hooks': No module named 'mypkg'``); the module raised while
            being imported; an attribute is missing; the object is not callable.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"{key}: expected a 'package.module:function' string, got {spec!r}")
    module_name, sep, attr_path = spec.strip().partition(":")
    if not sep or not _DOTTED.match(module_name) or not _DOTTED.match(attr_path):
        raise ConfigError(f"{key}: expected 'package.module:function', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import {module_name!r}: {exc}") from exc
    except Exception as exc:  # the module body itself failed
        raise ConfigError(
            f"{key}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    parts = attr_path.split(".")
    for depth, part in enumerate(parts):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            where = ".".join(parts[:depth]) or "module"
            raise ConfigError(
                f"{key}: {module_name!r} has no attribute {'.'.join(parts[: depth + 1])!r}"
                + ("" if depth == 0 else f" ({where!r} has no {part!r})")
            ) from exc
    if not callable(obj):
        raise ConfigError(f"{key}: {spec!r} is not callable ({type(obj).__name__})")
    return obj  # type: ignore[no-any-return]
