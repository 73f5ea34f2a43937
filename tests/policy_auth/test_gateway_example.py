"""docs/policy.md's complete inbound gateway is a configuration smtpgate starts, with every
plugin of the issue on the chain in the documented order."""

from __future__ import annotations

import tomllib
from pathlib import Path

from smtpgate.app import Smtpgate
from smtpgate.dkimkeys import generate_key

DOC = Path(__file__).resolve().parents[2] / "docs" / "policy.md"


def example() -> str:
    text = DOC.read_text().split("\n## A complete inbound gateway\n", 1)[1]
    return text.split("```toml\n", 1)[1].split("```", 1)[0]


def test_the_gateway_example_starts(tmp_path: Path) -> None:
    text = example()
    for path in ("/var/spool/smtpgate-frozen", "/var/spool/smtpgate-dmarc",
                 "/var/spool/smtpgate", "/var/lib/smtpgate", "/etc/smtpgate/dkim"):
        text = text.replace(path, str(tmp_path / path.strip("/").replace("/", "_")))
    cfg = tomllib.loads(text)
    cfg["server"]["listen"] = ["127.0.0.1:0"]
    for table in cfg["plugin"]:
        if table["use"] == "policy-db":
            (tmp_path / "policy.toml").write_text('["192.0.2.0/24"]\nfulltrustnet = true\n')
            table["file"] = str(tmp_path / "policy.toml")
    (tmp_path / "var_lib_smtpgate").mkdir()
    generate_key(tmp_path / "etc_smtpgate_dkim", "example.org", "s1", bits=1024)
    app = Smtpgate(cfg)
    rcpt = [h.plugin for h in app.hooks.hooks("rcpt")]
    assert rcpt.index("policy-db") < rcpt.index("relay") < rcpt.index("dnsbl") \
        < rcpt.index("greylist")
    data = [h.plugin for h in app.hooks.hooks("data")]
    for name in ("dkim", "arc", "dmarc", "authentication-results"):
        assert name in data
