"""load_callable and the hooks plugin: real modules on disk, errors naming the key."""

from __future__ import annotations

import importlib
import pathlib
import sys
import textwrap
import uuid
from collections.abc import Iterator

import pytest

from smtpgate.envelope import Envelope, Recipient, SessionInfo
from smtpgate.errors import ConfigError
from smtpgate.hooks import Stage, Transaction, Verdict, load_callable

HOOKS_SOURCE = textwrap.dedent(
    """
    from smtpgate.hooks import reject, accept

    CONSTANT = 42

    def deny_rcpt(session, transaction, recipient):
        if recipient.address.startswith("bad"):
            return reject("No such user", code=550, enhanced="5.1.1")

    async def accept_rcpt(session, transaction, recipient):
        return accept()

    def tag(session, transaction):
        transaction.notes["tagged"] = True

    class Plugin:
        @staticmethod
        def check(session, transaction, recipient):
            return False

        class Inner:
            @classmethod
            def connect(cls, session):
                return None
    """
)


@pytest.fixture
def hookpkg(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh importable package ``<name>`` with ``hooks`` and ``broken`` modules."""
    name = f"hookpkg_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "hooks.py").write_text(HOOKS_SOURCE)
    (pkg / "broken.py").write_text("raise RuntimeError('module body failed')\n")
    (pkg / "needs_missing.py").write_text("import surely_not_installed_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield name
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def test_load_function_and_attribute_chains(hookpkg: str) -> None:
    func = load_callable(f"{hookpkg}.hooks:deny_rcpt", "hooks.rcpt")
    assert func.__name__ == "deny_rcpt"
    assert load_callable(f"{hookpkg}.hooks:Plugin.check", "k").__name__ == "check"
    assert load_callable(f"{hookpkg}.hooks:Plugin.Inner.connect", "k").__name__ == "connect"
    assert load_callable("os.path:join", "k") is __import__("os").path.join


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (
            "mypkg_does_not_exist.hooks:f",
            "hooks.rcpt: cannot import 'mypkg_does_not_exist.hooks'"
            ": No module named 'mypkg_does_not_exist'",
        ),
        ("{pkg}.nope:f", "hooks.rcpt: cannot import '{pkg}.nope': No module named '{pkg}.nope'"),
        ("{pkg}.needs_missing:f", "No module named 'surely_not_installed_xyz'"),
        ("{pkg}.broken:f", "hooks.rcpt: importing '{pkg}.broken' failed: RuntimeError"),
        ("{pkg}.hooks:missing", "hooks.rcpt: '{pkg}.hooks' has no attribute 'missing'"),
        ("{pkg}.hooks:Plugin.nope", "hooks.rcpt: '{pkg}.hooks' has no attribute 'Plugin.nope'"),
        ("{pkg}.hooks:CONSTANT", "hooks.rcpt: '{pkg}.hooks:CONSTANT' is not callable (int)"),
        ("{pkg}.hooks", "hooks.rcpt: expected 'package.module:function'"),
        ("{pkg}.hooks:", "hooks.rcpt: expected 'package.module:function'"),
        (":f", "hooks.rcpt: expected 'package.module:function'"),
        ("a b:c", "hooks.rcpt: expected 'package.module:function'"),
    ],
)
def test_load_errors_name_the_key(hookpkg: str, spec: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_callable(spec.format(pkg=hookpkg), "hooks.rcpt")
    assert len(info.value.problems) == 1
    problem = info.value.problems[0]
    assert problem.startswith("hooks.rcpt: ")
    assert fragment.format(pkg=hookpkg) in problem


async def test_hooks_plugin_registers_in_order(hookpkg: str) -> None:
    """The ``hooks`` plugin puts the [hooks] functions on their stages in list order."""
    from smtpgate.config import config_from_mapping
    from smtpgate.hooks import HookRunner
    from smtpgate.plugins import load_plugins

    runner = HookRunner(timeout=5)
    load_plugins(config_from_mapping({"hooks": {
        "rcpt": [f"{hookpkg}.hooks:deny_rcpt", f"{hookpkg}.hooks:accept_rcpt"],
        "data": f"{hookpkg}.hooks:tag",
    }}), runner)
    assert [h.name for h in runner.hooks(Stage.RCPT) if h.plugin == "hooks"] == [
        f"{hookpkg}.hooks:deny_rcpt",
        f"{hookpkg}.hooks:accept_rcpt",
    ]
    session = SessionInfo("S1", "127.0.0.1", 1234)
    txn = Transaction(Envelope("a@example.org"), "T1")
    bad = await runner.run("rcpt", session, txn, Recipient("bad@example.com"))
    assert str(bad.reply) == "550 5.1.1 No such user"
    good = await runner.run("rcpt", session, txn, Recipient("good@example.com"))
    assert good.verdict is Verdict.OK
    await runner.run("data", session, txn)
    assert txn.notes == {"tagged": True}
    assert not runner.has("connect")


def test_hooks_plugin_reports_every_unloadable_hook(hookpkg: str) -> None:
    from smtpgate.config import config_from_mapping
    from smtpgate.hooks import HookRunner
    from smtpgate.plugins import load_plugins

    with pytest.raises(ConfigError) as info:
        load_plugins(config_from_mapping({"hooks": {
            "rcpt": "mypkg_does_not_exist.hooks:f",
            "data": [f"{hookpkg}.hooks:tag", f"{hookpkg}.hooks:missing"],
        }}), HookRunner())
    keys = sorted(p.split(":", 1)[0] for p in info.value.problems)
    assert keys == ["hooks.data[1]", "hooks.rcpt"]
    assert "hooks.rcpt: cannot import 'mypkg_does_not_exist.hooks'" in str(info.value)
