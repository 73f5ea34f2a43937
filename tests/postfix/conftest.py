"""Fixtures of the milter and policy tests: a site plugin on sys.path (the private
Postfix instance is the suite-wide ``postfix`` fixture, tests/private_postfix.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

SITE_PLUGIN = '''\
"""A site plugin, as an administrator would write it (docs/plugins.md)."""

from smtpgate.hooks import reject


def register(registry, options):
    def mail(session, transaction):
        if transaction.mail_from == "spam@bad.example":
            return reject("Go away, says the site plugin", code=550, enhanced="5.7.1")
        return None

    def rcpt(session, transaction, recipient):
        if recipient.address == "blocked@example.com":
            return reject("Blocked by the site plugin", code=550, enhanced="5.7.1")
        return None

    def data(session, transaction):
        transaction.add_header("X-Site-Check", f"passed client={session.peer_ip}")
        for r in list(transaction.recipients):
            if r.address.startswith("drop@"):
                transaction.delete_recipient(r.address)
        if transaction.get_header("Subject") == "change me":
            transaction.set_header("Subject", "changed by smtpgate")
        return None

    registry.on("mail", mail)
    registry.on("rcpt", rcpt)
    registry.on("data", data)
'''


@pytest.fixture
def site_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The module name of a site plugin written into a directory on ``sys.path``."""
    (tmp_path / "site_rules.py").write_text(SITE_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "site_rules"
