"""What the plugins found: a store shared along the chain (Haraka's ``transaction.results``).

Entry point: :class:`Results`, kept as ``transaction.results`` (per transaction) and
``session.results`` (per connection). A plugin records its finding with
:meth:`Results.add`; a later plugin reads it with :meth:`Results.get` (DMARC reads what
SPF and DKIM found); the transaction log line shows :meth:`Results.summary`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Finding", "Results"]

Detail = str | int | float | bool | None | list[str] | tuple[str, ...]
"""A value a plugin may attach to its finding (kept simple: it ends up in logs and headers)."""


@dataclass(slots=True)
class Finding:
    """One plugin's finding.

    Attributes:
        plugin: the plugin's name (``"spf"``, ``"relay"``).
        result: a short word: ``"pass"``, ``"fail"``, ``"spam"``, ``"clean"``, ...
        details: anything else the plugin wants to share (``score=5.2``, ``domain=...``).
    """

    plugin: str
    result: str
    details: dict[str, Detail] = field(default_factory=dict)

    def text(self) -> str:
        """``plugin=result`` plus ``key=value`` details, for log lines and headers."""
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in self.details.items())
        return f"{self.plugin}={self.result}" + (f" ({extra})" if extra else "")


def _fmt(value: Detail) -> str:
    if isinstance(value, list | tuple):
        return ",".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class Results:
    """Findings of the plugins, in the order they were recorded; one per plugin name
    (a later :meth:`add` for the same plugin replaces the earlier one)."""

    __slots__ = ("_findings",)

    def __init__(self) -> None:
        self._findings: dict[str, Finding] = {}

    def add(self, plugin: str, result: str, **details: Detail) -> Finding:
        """Record what ``plugin`` found.

        Args:
            plugin: the plugin's name.
            result: a short word (``"pass"``, ``"fail"``, ``"none"``, ``"spam"``...).
            details: extra facts (numbers, strings, lists of strings).

        Returns:
            The stored :class:`Finding`.
        """
        finding = Finding(plugin, result, dict(details))
        self._findings.pop(plugin, None)
        self._findings[plugin] = finding
        return finding

    def get(self, plugin: str) -> Finding | None:
        """The finding of ``plugin``, ``None`` when it recorded nothing."""
        return self._findings.get(plugin)

    def __contains__(self, plugin: object) -> bool:
        return plugin in self._findings

    def __iter__(self) -> Iterator[Finding]:
        return iter(list(self._findings.values()))

    def __len__(self) -> int:
        return len(self._findings)

    def __bool__(self) -> bool:
        return bool(self._findings)

    def summary(self) -> str:
        """Every finding as ``plugin=result (details)``, ``"; "``-separated; ``"-"`` if none."""
        return "; ".join(f.text() for f in self._findings.values()) or "-"

    def __repr__(self) -> str:
        return f"Results({self.summary()})"
