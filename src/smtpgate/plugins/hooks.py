"""Built-in plugin ``hooks``: the site's hook functions named in ``[hooks]``
(``connect = "mysite.hooks:check"``...), each on its stage at priority 0.

Entry point: :func:`register`. Each ``[hooks]`` key is a stage; its value one or a list
of ``"module:function"`` specs (see :mod:`smtpgate.hooks`). ``address_check`` is the
``address_check`` plugin's.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ConfigError
from ..hooks import Stage, load_callable
from . import Option, PluginRegistry

PRIORITY = 0
OPTIONS: dict[str, Option] = {}


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    """Import every ``[hooks]`` function and register it on its stage.

    Raises:
        ConfigError: every spec that cannot be imported (naming ``hooks.STAGE``).
    """
    problems: list[str] = []
    loaded: list[tuple[Stage, str, Callable[..., object]]] = []
    for stage_name, specs in registry.config.hooks.by_point().items():
        if stage_name == "address_check":
            continue
        for i, spec in enumerate(specs):
            key = f"hooks.{stage_name}" + (f"[{i}]" if len(specs) > 1 else "")
            try:
                loaded.append((Stage(stage_name), spec, load_callable(spec, key)))
            except ConfigError as exc:
                problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)  # every unloadable hook at once
    for stage, spec, func in loaded:
        registry.runner.register(
            stage, func, priority=registry.priority, name=spec, timeout=registry.timeout,
            on_error=registry.on_error, plugin=registry.name,
        )
        registry.stages.append(stage)
