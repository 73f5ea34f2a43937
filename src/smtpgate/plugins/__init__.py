"""The plugin pipeline: every check, built-in or yours, is a plugin on one chain per stage.

Entry points: :class:`PluginRegistry` (what ``register(registry, options)`` receives),
:class:`Option` and :class:`OptionError` (declaring and refusing options),
:func:`load_plugins` (building the chain from a configuration, see :mod:`.loader`).
The model is Haraka's ``plugins.js`` (a plugin registers hooks; every hook answers
CONT/OK/DENY/DENYSOFT/DISCONNECT; per-plugin timeout; results shared between plugins)
and Postfix's restriction lists (in order, first decisive result wins). docs/plugins.md
is the guide.

A plugin is a module with::

    OPTIONS = {"blocked_senders": Option(list, default=[], items=str)}   # optional

    def register(registry, options):
        registry.on("mail", check_sender)

and is enabled with a ``[[plugin]]`` table (``module = "mysite.checks"``, or ``use = NAME``
for one shipped in :mod:`smtpgate.plugins`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..hooks import HookRunner, Stage

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["REQUIRED", "Option", "OptionError", "PluginRegistry", "load_plugins", "nonnegative",
           "one_of", "positive"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default of an :class:`Option` that must be given in the ``[[plugin]]`` table."""

OptionValue = str | int | float | bool | list[Any] | dict[str, Any]
"""What a TOML value can be (strings, numbers, booleans, arrays, tables)."""


class OptionError(Exception):
    """Raised by a plugin's ``register`` (or an :class:`Option` check) for a bad option;
    reported as the configuration error ``plugin[N].KEY: message``.

    Args:
        key: the option's name (``""`` for the table as a whole).
        message: what is wrong, e.g. ``"must be an e-mail address, got 'x'"``.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


def positive(value: float) -> str | None:
    """An :class:`Option` check: the number must be > 0."""
    return None if value > 0 else "must be > 0"


def nonnegative(value: float) -> str | None:
    """An :class:`Option` check: the number must be >= 0."""
    return None if value >= 0 else "must be >= 0"


def one_of(*choices: str) -> Callable[[str], str | None]:
    """An :class:`Option` check: the string must be one of ``choices`` (refused with
    ``"A|B|C"``)."""
    def check(value: str) -> str | None:
        return None if value in choices else "|".join(choices)
    return check


@dataclass(frozen=True, slots=True)
class Option:
    """One option a plugin accepts (a module's ``OPTIONS = {"name": Option(...)}``).

    Attributes:
        kind: ``str``, ``int``, ``float`` (ints accepted), ``bool``, ``list`` or ``dict``.
        default: the value when the table leaves it out; :data:`REQUIRED` makes it
            mandatory. A list or dict default is copied for each plugin.
        items: for ``list``: the type of every element (``str``, ``int``...).
        check: called with the typed value; returns ``None`` (fine) or the reason it is
            refused (``"must be > 0"``).
        help: one line for ``smtpgate plugins`` and docs.
    """

    kind: type
    default: Any = REQUIRED
    items: type | None = None
    check: Callable[[Any], str | None] | None = None
    help: str = ""

    def validate(self, key: str, value: object) -> Any:
        """The value if it fits, else :class:`OptionError` naming ``key``.

        Raises:
            OptionError: wrong type, wrong element type, or refused by :attr:`check`.
        """
        if not _is(value, self.kind):
            raise OptionError(key, f"must be {_kind_name(self.kind)}, got {value!r}")
        if self.kind is list and self.items is not None:
            assert isinstance(value, list)
            for i, item in enumerate(value):
                if not _is(item, self.items):
                    raise OptionError(f"{key}[{i}]", f"must be {_kind_name(self.items)}, "
                                                     f"got {item!r}")
        if self.kind is float and isinstance(value, int):
            value = float(value)
        if self.check is not None:
            why = self.check(value)
            if why:
                raise OptionError(key, why)
        return value


def _is(value: object, kind: type) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _kind_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "an array", dict: "a table"}.get(kind, kind.__name__)


def validate_options(
    schema: Mapping[str, Option], given: Mapping[str, object]
) -> dict[str, Any]:
    """Check ``given`` against ``schema``; fill defaults.

    Raises:
        OptionError: an unknown key (with the closest known name), a missing required
            option, or a value :meth:`Option.validate` refuses.
    """
    import difflib

    for key in given:
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else (
                f" (known: {', '.join(sorted(schema))})" if schema else " (it takes none)")
            raise OptionError(key, f"unknown option{hint}")
    out: dict[str, Any] = {}
    for key, option in schema.items():
        if key in given:
            out[key] = option.validate(key, given[key])
        elif option.default is REQUIRED:
            raise OptionError(key, "required")
        else:
            default = option.default
            out[key] = list(default) if isinstance(default, list) else (
                dict(default) if isinstance(default, dict) else default)
    return out


@dataclass(slots=True)
class PluginRegistry:
    """What a plugin's ``register(registry, options)`` receives: the way onto the chain.

    Attributes:
        name: the plugin's display name (``[[plugin]] name``, else ``use``/``module``).
        config: the whole configuration (read-only); built-in plugins read their
            sections from it (``[relay]``, ``[[helo_rule]]``...).
        priority: the default priority of this plugin's hooks (-100..100).
        timeout: the default seconds per hook call (``None``: ``[hooks] timeout``).
        on_error: ``"tempfail"`` or ``"accept"`` for this plugin's hooks.
        provides: objects the plugin offers the application (the relay plugin offers
            its :class:`~smtpgate.policy.RelayPolicy` as ``"relay"`` for run-time changes).
        decides_relay: whether this plugin's ``rcpt`` hooks may let a recipient through
            that relay control would refuse (its OK skips the rest of the chain). The
            open-relay guard (relay control disabled) needs one such plugin; a plugin
            that only ever refuses, or only records, sets it to False in ``register``.
    """

    runner: HookRunner
    name: str
    config: Config
    priority: int = 0
    timeout: float | None = None
    on_error: str = "tempfail"
    provides: dict[str, object] = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)
    decides_relay: bool = True

    def path(self, value: str) -> str:
        """A file or directory option as a path: ``~`` expanded, and a relative path taken
        relative to the configuration file's directory (the current directory for a
        configuration that did not come from a file), as ``[maildir] path`` is."""
        path = os.path.expanduser(value)
        if os.path.isabs(path) or not path:
            return path
        source = self.config.source
        base = os.getcwd() if source.startswith("<") else \
            os.path.dirname(os.path.abspath(source))
        return os.path.join(base, path)

    def on(
        self,
        stage: Stage | str,
        func: Callable[..., Any],
        *,
        priority: int | None = None,
        timeout: float | None = None,
        blocking: bool = False,
    ) -> None:
        """Register ``func`` (``def`` or ``async def``) for ``stage``.

        Args:
            stage: a :class:`~smtpgate.hooks.Stage` or its name (``"rcpt"``); the
                signature per stage is documented in docs/plugins.md and
                :mod:`smtpgate.plugins.stages`.
            func: the hook; returns ``None`` (CONT), a verdict helper's result
                (``accept``/``reject``/``tempfail``/``drop``), a
                :class:`~smtpgate.hooks.HookResult` or a :class:`~smtpgate.reply.Reply`.
            priority: -100..100, lower runs first; default: the plugin's.
            timeout: seconds per call; default: the plugin's, else ``[hooks] timeout``.
            blocking: run a sync hook in a worker thread (it does blocking I/O).

        Raises:
            ValueError: unknown stage, bad timeout, ``blocking`` with ``async def``.
            TypeError: ``func`` is not callable.
        """
        st = Stage(stage)
        self.runner.register(
            st, func,
            priority=self.priority if priority is None else priority,
            name=f"{self.name}:{getattr(func, '__name__', 'hook')}",
            blocking=blocking,
            timeout=self.timeout if timeout is None else timeout,
            on_error=self.on_error,
            plugin=self.name,
        )
        self.stages.append(st)

    def provide(self, key: str, value: object) -> None:
        """Offer ``value`` to the application under ``key`` (see :attr:`provides`)."""
        self.provides[key] = value


def load_plugins(config: Config, runner: HookRunner) -> dict[str, object]:
    """Build the chain for ``config`` into ``runner``: the built-in plugins the
    configuration implies, then the ``[[plugin]]`` tables (see :mod:`.loader`).

    Returns:
        What the plugins provided to the application (``"relay"``: the relay policy).

    Raises:
        ConfigError: every problem, each naming ``plugin[N].KEY`` (or the section of a
            built-in), e.g. an unknown option or a plugin whose ``register`` raised.
    """
    from .loader import build_chain

    return build_chain(config, runner)
