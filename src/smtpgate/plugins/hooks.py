"""Built-in plugin ``hooks``: the site's hook functions named in ``[hooks]``
(``connect = "mysite.hooks:check"``...), each on its stage at priority 0.

Entry point: :func:`register`. Each ``[hooks]`` key is a stage; its value one or a list
of ``"module:function"`` specs (see :mod:`smtpgate.hooks`). ``address_check`` is the
``address_check`` plugin's.
"""

from __future__ import annotations

from ..hooks import Stage, load_callable
from . import Option, PluginRegistry

PRIORITY = 0
OPTIONS: dict[str, Option] = {}


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    """Import every ``[hooks]`` function and register it on its stage.

    Raises:
        ConfigError: a spec that cannot be imported (naming ``hooks.STAGE``).
    """
    for stage_name, specs in registry.config.hooks.by_point().items():
        if stage_name == "address_check":
            continue
        stage = Stage(stage_name)
        for spec in specs:
            registry.runner.register(
                stage, load_callable(spec, f"hooks.{stage_name}"),
                priority=registry.priority, name=spec, timeout=registry.timeout,
                on_error=registry.on_error, plugin=registry.name,
            )
            registry.stages.append(stage)
