"""Building the chain: the built-in plugins a configuration implies, then ``[[plugin]]``.

Entry point: :func:`build_chain`. Built-ins come from the existing sections (``[relay]``
adds ``relay``, ``[[helo_rule]]`` adds ``helo_rules``, ``[[scanner]]`` adds ``scanners``,
``[hooks]`` adds ``hooks``...) at their documented default priorities; a ``[[plugin]]
use = NAME`` table with a built-in's name configures (or with ``enabled = false``
removes) that built-in instead of adding a second one.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..hooks import HookRunner, Stage
from . import OptionError, PluginRegistry, validate_options

if TYPE_CHECKING:
    from ..config import Config, PluginConfig

log = logging.getLogger("smtpgate.plugins")

__all__ = ["BUILTINS", "Builtin", "PlannedPlugin", "build_chain", "plan_chain"]


@dataclass(frozen=True, slots=True)
class Builtin:
    """A shipped check that the configuration adds without a ``[[plugin]]`` table.

    Attributes:
        name: the short name (``use = NAME``) and module ``smtpgate.plugins.NAME``.
        implied: whether a configuration implies it (e.g. ``[[scanner]]`` present).
        section: where its settings live, for error messages and docs.
    """

    name: str
    implied: Callable[[Config], bool]
    section: str


BUILTINS: tuple[Builtin, ...] = (
    Builtin("load_average", lambda c: c.server.max_load_average > 0,
            "[server] max_load_average"),
    Builtin("helo_rules", lambda c: bool(c.helo_rules), "[[helo_rule]]"),
    Builtin("free_space", lambda c: c.delivery_mode == "queue", "[queue] min_free_space"),
    Builtin("relay", lambda c: True, "[relay]"),
    Builtin("address_check", lambda c: bool(c.hooks.address_check), "[hooks] address_check"),
    Builtin("tarpit", lambda c: c.server.tarpit_initial > 0, "[server] tarpit_*"),
    Builtin("scanners", lambda c: bool(c.scanners), "[[scanner]]"),
    Builtin("hooks", lambda c: bool(c.hooks.by_point()), "[hooks]"),
)
"""The built-ins in the order they are added (which, within a priority, is run order)."""


@dataclass(frozen=True, slots=True)
class PlannedPlugin:
    """One plugin on the planned chain.

    Attributes:
        name: display name.
        module: the module path imported.
        where: how to name it in errors (``plugin[2]`` or ``[relay]``).
        table: its ``[[plugin]]`` table, ``None`` for a built-in added by default.
    """

    name: str
    module: str
    where: str
    table: PluginConfig | None


def plan_chain(config: Config) -> list[PlannedPlugin]:
    """The plugins ``config`` puts on the chain, in registration order (nothing imported).

    Raises:
        ConfigError: two ``[[plugin]]`` tables use the same built-in.
    """
    explicit: dict[str, PluginConfig] = {}
    problems: list[str] = []
    for table in config.plugins:
        if table.use and any(b.name == table.use for b in BUILTINS):
            if table.use in explicit:
                problems.append(f"plugin[{table.index}].use: {table.use!r} already "
                                f"configured by plugin[{explicit[table.use].index}]")
            explicit[table.use] = table
    if problems:
        raise ConfigError(problems)
    plan: list[PlannedPlugin] = []
    for builtin in BUILTINS:
        module = f"smtpgate.plugins.{builtin.name}"
        chosen = explicit.get(builtin.name)
        if chosen is not None:
            if chosen.enabled:
                plan.append(PlannedPlugin(chosen.display_name, module,
                                          f"plugin[{chosen.index}]", chosen))
        elif builtin.implied(config):
            plan.append(PlannedPlugin(builtin.name, module, builtin.section, None))
    for table in config.plugins:
        if not table.enabled or (table.use and table.use in explicit):
            continue
        module = table.module or f"smtpgate.plugins.{table.use.replace('-', '_')}"
        plan.append(PlannedPlugin(table.display_name, module, f"plugin[{table.index}]", table))
    return plan


def build_chain(config: Config, runner: HookRunner) -> dict[str, object]:
    """Import and register every planned plugin into ``runner``.

    Returns:
        The objects the plugins provided (``registry.provide``).

    Raises:
        ConfigError: every problem: a module that cannot be imported or has no
            ``register``, a bad option (``plugin[N].KEY: ...``), a ``register`` that
            raised, or relay control removed with nothing else deciding at ``rcpt``
            (an open relay) without ``allow_open_relay = true``.
    """
    problems: list[str] = []
    provides: dict[str, object] = {}
    rcpt_deciders = 0  # plugins at rcpt that can stand in for relay control
    relay_table = next((t for t in config.plugins if t.use == "relay" and not t.enabled), None)
    allow_open = False
    for t in config.plugins:
        if t.use != "relay" or "allow_open_relay" not in t.options:
            continue
        value = t.options["allow_open_relay"]
        if not isinstance(value, bool):
            problems.append(f"plugin[{t.index}].allow_open_relay: must be true or false, "
                            f"got {value!r}")
        elif t.enabled and value:
            problems.append(f"plugin[{t.index}].allow_open_relay: only meaningful with "
                            "enabled = false (relay control is on)")
        else:
            allow_open = allow_open or value
    for planned in plan_chain(config):
        try:
            module = _import(planned)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        table = planned.table
        given: Mapping[str, object] = table.options if table is not None else {}
        if planned.module == "smtpgate.plugins.relay" and "allow_open_relay" in given:
            given = {k: v for k, v in given.items() if k != "allow_open_relay"}
        registry = PluginRegistry(
            runner=runner, name=planned.name, config=config,
            priority=_default_priority(module, table),
            timeout=table.timeout if table is not None else None,
            on_error=table.on_error if table is not None else "tempfail",
        )
        try:
            schema = getattr(module, "OPTIONS", None)
            options: dict[str, Any] = (validate_options(schema, given) if schema is not None
                                       else dict(given))
            module.register(registry, options)
        except OptionError as exc:
            key = f".{exc.key}" if exc.key else ""
            problems.append(f"{planned.where}{key}: {exc.message}")
            continue
        except ConfigError as exc:
            problems.extend(f"{planned.where}: {p}" if table is not None else p
                            for p in exc.problems)
            continue
        except Exception as exc:
            log.debug("register() of plugin %s raised", planned.name, exc_info=True)
            problems.append(f"{planned.where}: plugin {planned.name!r}: register() failed: "
                            f"{type(exc).__name__}: {exc}")
            continue
        provides.update(registry.provides)
        if Stage.RCPT in registry.stages and registry.decides_relay:
            rcpt_deciders += 1
    if relay_table is not None and not allow_open and not rcpt_deciders and not problems:
        problems.append(f"plugin[{relay_table.index}]: relay control is disabled and no "
                        "other plugin decides at rcpt: this would be an open relay; set "
                        "allow_open_relay = true in that [[plugin]] table if that is what "
                        "you want")
    if problems:
        raise ConfigError(problems)
    return provides



def _default_priority(module: ModuleType, table: PluginConfig | None) -> int:
    """The table's ``priority`` when it sets one, else the module's ``PRIORITY``, else 0."""
    if table is not None and table.priority_set:
        return table.priority
    value = getattr(module, "PRIORITY", 0)
    return int(value) if isinstance(value, int) else 0


def _import(planned: PlannedPlugin) -> ModuleType:
    try:
        module = importlib.import_module(planned.module)
    except ImportError as exc:
        what = "no shipped plugin" if planned.module.startswith("smtpgate.plugins.") and \
            planned.table is not None and planned.table.use else "cannot import"
        raise ConfigError(f"{planned.where}: {what} {planned.module!r}: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"{planned.where}: importing {planned.module!r} raised "
                          f"{type(exc).__name__}: {exc}") from None
    if not callable(getattr(module, "register", None)):
        raise ConfigError(f"{planned.where}: {planned.module!r} has no register(registry, "
                          "options) function")
    return module
