"""Load hooks named in the configuration as ``"package.module:function"`` strings.

Entry points: :func:`load_callable` (one spec) and :func:`runner_from_config` (a whole
``[hooks]`` table → :class:`~smtpgate.hooks.runner.HookRunner`). Every problem becomes a
:class:`~smtpgate.errors.ConfigError` naming the configuration key.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConfigError
from .runner import HookRunner
from .verdict import Stage

__all__ = ["load_callable", "runner_from_config"]

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


def runner_from_config(hooks: Mapping[str, str | list[str]], timeout: float) -> HookRunner:
    """Build a runner from a ``{stage: spec | [spec, ...]}`` mapping.

    Example configuration (TOML)::

        [hooks]
        rcpt = ["mysite.hooks:check_rcpt", "mysite.hooks:quota"]
        data = "mysite.hooks:scan"

    Hooks of one stage run in list order (priority 0). Every problem is collected
    first and reported in one :class:`ConfigError`; list items are named
    ``hooks.rcpt[1]``.

    Args:
        hooks: stage name (``"connect"``, ``"helo"``, ``"mail"``, ``"rcpt"``,
            ``"data"``, ``"quit"``, ``"error"``) to one spec or a list of specs.
        timeout: per-hook timeout in seconds, > 0.

    Returns:
        A :class:`HookRunner` with the hooks registered.

    Raises:
        ConfigError: unknown stage names, malformed values, hooks that cannot be
            loaded, or a non-positive timeout (all reported at once).
    """
    problems: list[str] = []
    loaded: list[tuple[Stage, Callable[..., Any], str]] = []
    stages = ", ".join(s.value for s in Stage)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout > 0:
        problems.append(f"hooks.timeout: must be a positive number of seconds, got {timeout!r}")
    for stage_name, value in hooks.items():
        key = f"hooks.{stage_name}"
        try:
            stage = Stage(stage_name)
        except ValueError:
            problems.append(f"{key}: unknown hook stage (expected one of {stages})")
            continue
        if isinstance(value, str):
            items: list[tuple[str, object]] = [(key, value)]
        elif isinstance(value, list | tuple):
            items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        else:
            problems.append(f"{key}: expected a string or a list of strings, got {value!r}")
            continue
        for item_key, spec in items:
            if not isinstance(spec, str):
                problems.append(f"{item_key}: expected a 'package.module:function' string")
                continue
            try:
                loaded.append((stage, load_callable(spec, item_key), spec))
            except ConfigError as exc:
                problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    runner = HookRunner(timeout=float(timeout))
    for stage, func, spec in loaded:
        runner.register(stage, func, name=spec.strip())
        log.debug("hook registered stage=%s hook=%s", stage.value, spec)
    return runner
