"""Fixtures for the milter tests: a scripted milter, a findings recorder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from smtpgate.hooks import Stage

from .scripted_milter import ScriptedMilter


@pytest.fixture
def milters() -> Iterator[Callable[..., ScriptedMilter]]:
    started: list[ScriptedMilter] = []

    def start(*args: Any, **kwargs: Any) -> ScriptedMilter:
        m = ScriptedMilter(*args, **kwargs)
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


class Findings:
    """Records every transaction's findings (``plugin -> (result, details)``) at the
    end of the ``data`` stage and at ``quit`` (for refused transactions: ``rset``)."""

    def __init__(self) -> None:
        self.tx: list[dict[str, tuple[str, dict[str, Any]]]] = []
        self.session: list[dict[str, tuple[str, dict[str, Any]]]] = []

    def install(self, app: Any) -> None:
        def data(session: Any, transaction: Any) -> None:
            self.snap(transaction)

        def quit(session: Any) -> None:
            self.session.append({f.plugin: (f.result, dict(f.details))
                                 for f in session.results})

        app.hooks.register(Stage.DATA, data, priority=100)
        app.hooks.register(Stage.QUIT, quit)

    def snap(self, tx: Any) -> None:
        self.tx.append({f.plugin: (f.result, dict(f.details)) for f in tx.results})


@pytest.fixture
def findings() -> Findings:
    return Findings()
