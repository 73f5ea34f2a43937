"""Fixtures for the whole suite: an in-process smtpgate on a free port (under each event
loop), capture deliveries, throw-away TLS certificates (trustme), a raw line-level SMTP
client."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import trustme

from smtpgate.app import Smtpgate

from .private_postfix import postfix  # noqa: F401  (the fixture, for every test)
from .support import Capture, RawClient, merge


@pytest.fixture
def capture() -> Capture:
    return Capture()


#: The event loops the server-level tests run under: the stdlib loop and uvloop, the one
#: production uses when it is installed (``server.use_uvloop``, default true).
LOOP_KINDS = ["asyncio", "uvloop"]

#: Test directories whose async tests run once per event loop (pytest-asyncio's loop
#: is then the one the test starts the server in).
_SERVER_LEVEL = ("server", "e2e", "queue", "ops")


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """pytest-asyncio hook (``pytest_asyncio_loop_factories``, pytest-asyncio >= 1.4,
    which deprecates overriding ``event_loop_policy``): the loops an async test runs in.

    Server-level tests (``tests/server``, ``tests/e2e``, ``tests/queue``, ``tests/ops``) run under
    both loops (ids ``[asyncio]`` / ``[uvloop]``) unless they use :func:`run_app`,
    which runs the server in its own thread and is parametrised itself; the others
    run under the stdlib loop only.
    """
    loops: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    parts = Path(str(item.path)).relative_to(Path(__file__).parent).parts
    uv = _uvloop_factory()
    if (parts and parts[0] in _SERVER_LEVEL and uv is not None
            and "run_app" not in getattr(item, "fixturenames", ())):
        loops["uvloop"] = uv
    return loops


if hasattr(getattr(pytest_asyncio, "plugin", None), "PytestAsyncioSpecs"):
    # Older pytest-asyncio has no such hook (pytest would refuse an unknown one):
    # there, async tests run under the stdlib loop only.
    pytest_asyncio_loop_factories = _loop_factories


@pytest.fixture(params=LOOP_KINDS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    """``"asyncio"`` or ``"uvloop"``: the event loop the server under test runs in
    (``server.use_uvloop``, honoured by :meth:`Smtpgate.start_thread`); skips the
    uvloop variant when uvloop is not installed."""
    kind = str(request.param)
    if kind == "uvloop" and _uvloop_factory() is None:
        pytest.skip("uvloop is not installed")
    return kind


@pytest.fixture
def run_app(tmp_path: Path, loop_kind: str) -> Iterator[Callable[..., Smtpgate]]:
    """Start smtpgate in a thread: ``run_app({"relay": {...}}, deliver=...)``.

    Parametrised over the event loops (:data:`LOOP_KINDS`, via :func:`loop_kind`):
    every test using it runs once with the stdlib loop and once with uvloop.
    """
    apps: list[Smtpgate] = []

    def start(cfg: dict[str, Any] | None = None, **kwargs: Any) -> Smtpgate:
        base = {
            "server": {"hostname": "mx.test", "listen": ["127.0.0.1:0"],
                       "use_uvloop": loop_kind == "uvloop"},
            "maildir": {"path": str(tmp_path / "mail")},
        }
        app = Smtpgate(merge(base, cfg or {}), **kwargs)
        app.start_thread()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop_thread(timeout=2)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def cert_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("mx.test", "localhost", "127.0.0.1")
    chain = d / "chain.pem"
    key = d / "key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    both = d / "both.pem"
    both.write_bytes(cert.private_key_pem.bytes() + chain.read_bytes())
    cafile = d / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    return {"chain": str(chain), "key": str(key), "both": str(both), "ca": str(cafile)}


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
def raw() -> Iterator[Callable[..., RawClient]]:
    clients: list[RawClient] = []

    def connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> RawClient:
        c = RawClient(port, host, timeout)
        clients.append(c)
        return c

    yield connect
    for c in clients:
        c.close()
