"""``smtpgate config show``: the effective configuration as a TOML file (like ``postconf``).

Entry point: :func:`render_config`. Every key of every section is printed with its
effective value, defaults included; a key whose value differs from the default ends with
a ``# default: VALUE`` comment (``postconf -n`` is ``show -n``: only those keys). The text
is TOML (toml.io v1.0.0) that ``smtpgate check-config`` accepts and that loads into the
same configuration: relative paths are printed resolved (absolute), as smtpgate uses them.
A key whose value is unset (``None``, e.g. ``server.limit_exceptions``) has no TOML form
and is printed as a comment.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from . import __version__
from .config import (
    Config,
    ListenAddress,
    ListenerConfig,
    PluginConfig,
    ScannerConfig,
    config_from_mapping,
)

__all__ = ["render_config", "toml_value"]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_SECTION_ORDER = ("server", "tls", "auth", "relay", "maildir", "hooks", "log", "admin",
                  "capture", "delivery", "queue", "dns")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name, ensure_ascii=False)


def toml_value(value: Any) -> str:
    """``value`` as a TOML value (strings as basic strings, tuples and lists as arrays,
    mappings as inline tables, :class:`ListenAddress` as its ``host:port`` string).

    Raises:
        TypeError: ``None`` or a type TOML cannot represent.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, ListenAddress):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(str(k))} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _line(key: str, value: Any, default: Any, *, compare: bool, only_changed: bool) -> str | None:
    changed = compare and value != default
    if only_changed and not changed:
        return None
    if value is None:
        return f"# {key} is unset (default)" if not changed else f"# {key} is unset"
    text = f"{_key(key)} = {toml_value(value)}"
    if changed:
        shown = "(unset)" if default is None else toml_value(default)
        text += f"  # default: {shown}"
    return text


def _table(header: str, obj: Any, default: Any, only_changed: bool,
           always: tuple[str, ...] = ()) -> list[str]:
    lines: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        line = _line(f.name, value, getattr(default, f.name), compare=True,
                     only_changed=only_changed and f.name not in always)
        if line is not None:
            lines.append(line)
    if not lines and only_changed:
        return []
    return [header, *lines, ""]


def _plugin(plugin: PluginConfig, only_changed: bool) -> list[str]:
    lines = ["[[plugin]]"]
    base = PluginConfig(index=plugin.index)
    for key in ("module", "use", "name", "priority", "timeout", "on_error", "enabled"):
        value = getattr(plugin, key)
        if key in ("module", "use") and not value:
            continue
        if key == "priority" and not plugin.priority_set:
            continue
        identity = key in ("module", "use")
        line = _line(key, value, getattr(base, key), compare=not identity,
                     only_changed=only_changed and not identity)
        if line is not None:
            lines.append(line)
    lines.extend(f"{_key(str(k))} = {toml_value(v)}" for k, v in plugin.options.items())
    return [*lines, ""]


def render_config(cfg: Config, *, only_changed: bool = False) -> str:
    """The effective configuration ``cfg`` as TOML text.

    Args:
        cfg: the loaded configuration (:func:`smtpgate.config.load_config`).
        only_changed: print only the keys that differ from the defaults (``postconf -n``);
            ``[[scanner]]``, ``[[listener]]``, ``[[plugin]]`` and ``[[helo_rule]]`` tables
            are always printed (with their identifying keys).

    Returns:
        TOML text; changed keys end with ``# default: VALUE``.
    """
    source = cfg.source
    if source and not source.startswith("<"):
        base_dir = os.path.dirname(os.path.abspath(source))
        defaults = config_from_mapping({}, base_dir=base_dir)
    else:
        defaults = Config.default()
    lines = [
        f"# smtpgate {__version__}: effective configuration of {source}",
        "# (every key with its value; '# default: X' ends a key set to another value)"
        if not only_changed else "# (only the keys set to a value other than the default)",
        "",
    ]
    for name in _SECTION_ORDER:
        lines += _table(f"[{name}]", getattr(cfg, name), getattr(defaults, name), only_changed)
    for scanner in cfg.scanners:
        lines += _table("[[scanner]]", scanner, ScannerConfig(type=scanner.type),
                        only_changed, always=("type", "address")) or ["[[scanner]]", ""]
    for listener in cfg.listeners:
        lines += _table("[[listener]]", listener, ListenerConfig(address=listener.address),
                        only_changed, always=("address",))
    for rule in cfg.helo_rules:
        lines += ["[[helo_rule]]", *(f"{_key(str(k))} = {toml_value(v)}"
                                     for k, v in rule.items()), ""]
    for plugin in cfg.plugins:
        lines += _plugin(plugin, only_changed)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"
