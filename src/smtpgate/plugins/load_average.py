"""Built-in plugin ``load_average``: refuse new sessions while the machine is overloaded
(ZMailer ``-L maxloadaver``).

Entry point: :func:`register`. Above ``[server] max_load_average`` (1-minute load
average) a new client gets ``421 4.3.2`` instead of the greeting and is disconnected
(RFC 5321 §3.8). Option ``loadavg_file`` (default ``/proc/loadavg``) names where the
figure is read.
"""

from __future__ import annotations

from ..envelope import SessionInfo
from ..hooks import HookResult, Verdict
from ..policy.loadavg import LoadAverage, parse_proc_loadavg
from ..reply import Reply
from . import Option, PluginRegistry, nonnegative

PRIORITY = -100
OPTIONS = {
    "loadavg_file": Option(str, default="/proc/loadavg",
                           help="file in /proc/loadavg format to read the load from"),
    "max_load_average": Option(float, default=0.0,
                               check=nonnegative,
                               help="limit; 0 takes [server] max_load_average"),
}

OVERLOADED = Reply(421, "4.3.2", "System overloaded, try again later")


def reader(path: str) -> LoadAverage:
    """A cached reader of the 1-minute load average from ``path`` (``/proc/loadavg``)."""

    def read() -> float:
        with open(path) as fh:
            return parse_proc_loadavg(fh.read())

    return LoadAverage(read)


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    """Register the connect hook."""
    own, path = options["max_load_average"], options["loadavg_file"]
    assert isinstance(own, float) and isinstance(path, str)
    limit = own or registry.config.server.max_load_average
    load = reader(path)
    refused = HookResult(Verdict.DENYSOFT_DISCONNECT, OVERLOADED)

    def connect(session: SessionInfo) -> HookResult | None:
        return refused if load.over(limit) else None

    registry.on("connect", connect)
