"""``smtpgate util ...`` (issue 12, "CLI for administrators"; nssmtpd's ``ns_smtpd
encode|decode|checkemail|checkdomain``), each through a real ``python -m smtpgate``
subprocess: stdout bytes, one-line errors on stderr, exit codes. ``check-domain --dns``
asks a loopback DNS server (tests/delivery/dns_server.py) through ``[dns] nameservers``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import subprocess
import sys
from pathlib import Path

import pytest

from ..delivery.dns_server import DnsServer

SMTPGATE = [sys.executable, "-m", "smtpgate"]
ALL_BYTES = bytes(range(256)) * 3 + b"\r\n\n\r trailing space \t\n"


def run(*args: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*SMTPGATE, "util", *args], input=data, capture_output=True,
                          timeout=60)


def one_error(out: subprocess.CompletedProcess[bytes], code: int) -> str:
    err = out.stderr.decode()
    assert out.returncode == code, (out.returncode, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("smtpgate: "), err
    return lines[0]


# ---------------------------------------------------------------------- encode / decode

@pytest.mark.parametrize(("kind", "plain", "encoded"), [
    ("base64", b"foobar", b"Zm9vYmFy\n"),  # RFC 4648 §10 test vector
    ("base64", b"fo", b"Zm8=\n"),
    ("hex", b"foobar", b"666f6f626172\n"),  # RFC 4648 §10 (base16, lower case)
    # RFC 2045 §6.7, binary mode: the line break is encoded, a soft break ends the output
    ("qprint", "café = 1\tend \n".encode(), b"caf=C3=A9 =3D 1\tend =0A=\n"),
])
def test_known_vectors(kind: str, plain: bytes, encoded: bytes) -> None:
    out = run("encode", kind, data=plain)
    assert out.returncode == 0 and out.stdout == encoded and out.stderr == b""
    back = run("decode", kind, data=encoded)
    assert back.returncode == 0 and back.stdout == plain


@pytest.mark.parametrize("kind", ["base64", "hex", "qprint"])
def test_round_trip_is_binary_safe(kind: str) -> None:
    encoded = run("encode", kind, data=ALL_BYTES)
    assert encoded.returncode == 0
    assert encoded.stdout.isascii()
    assert all(len(line) <= 76 for line in encoded.stdout.splitlines()) or kind == "hex"
    decoded = run("decode", kind, data=encoded.stdout)
    assert decoded.returncode == 0 and decoded.stdout == ALL_BYTES


def test_base64_lines_are_mime_sized_and_match_the_stdlib() -> None:
    out = run("encode", "base64", data=ALL_BYTES)
    assert out.stdout == base64.encodebytes(ALL_BYTES)
    assert max(len(line) for line in out.stdout.splitlines()) == 76
    qp = run("encode", "qprint", data=ALL_BYTES).stdout
    assert qp == binascii.b2a_qp(ALL_BYTES, istext=False) + b"=\n"
    assert max(len(line) for line in qp.splitlines()) <= 76


def test_empty_input_gives_empty_output() -> None:
    for kind in ("base64", "hex", "qprint"):
        assert run("encode", kind).stdout == b""
        assert run("decode", kind).stdout == b""


@pytest.mark.parametrize(("kind", "data", "why"), [
    ("base64", b"Zm9v!mFy\n", "not base64"),
    ("base64", b"Zm9vY", "not base64"),
    ("hex", b"abc\n", "not hex"),
    ("hex", b"zz\n", "not hex"),
])
def test_bad_input_is_one_line_exit_2(kind: str, data: bytes, why: str) -> None:
    line = one_error(run("decode", kind, data=data), 2)
    assert f"util decode {kind}: standard input: {why}" in line


def test_unknown_kind_is_a_usage_error() -> None:
    out = run("encode", "rot13")
    assert out.returncode == 2 and b"invalid choice" in out.stderr


# ---------------------------------------------------------------------- check-email

@pytest.mark.parametrize(("address", "printed"), [
    ("user@example.com", "user@example.com"),
    ("<user@example.com>", "user@example.com"),
    ("<@relay.example:user@example.com>", "user@example.com"),  # source route dropped
    ('"john doe"@example.com', '"john doe"@example.com'),
    ("user@[192.0.2.1]", "user@[192.0.2.1]"),
    ("user@[IPv6:2001:db8::1]", "user@[IPv6:2001:db8::1]"),
    ("jörg@bücher.example", "jörg@bücher.example"),  # RFC 6531
])
def test_check_email_valid(address: str, printed: str) -> None:
    out = run("check-email", address)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == printed + "\n" and out.stderr == b""


@pytest.mark.parametrize(("address", "reason"), [
    ("user", "Bad recipient address syntax"),
    ("user@", "Bad recipient address syntax"),
    ("us er@example.com", "Bad recipient address syntax"),
    ("user@@example.com", "Bad recipient address syntax"),
    ("user@-bad-.example", "Bad recipient address syntax"),
    ("user@[192.0.2.300]", "Bad recipient address syntax"),
    ("x" * 65 + "@example.com", "Local part too long"),
    ("<user@example.com> SIZE=10", "Bad recipient address syntax"),
    ("", "Bad recipient address syntax"),
])
def test_check_email_invalid(address: str, reason: str) -> None:
    line = one_error(run("check-email", address), 1)
    assert "invalid address" in line and reason in line


# ---------------------------------------------------------------------- check-domain

@pytest.mark.parametrize("domain", ["example.com", "example.com.", "a-b.c0.example",
                                    "localhost", "bücher.example"])
def test_check_domain_syntax_valid(domain: str) -> None:
    out = run("check-domain", domain)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == domain.rstrip(".") + "\n"


@pytest.mark.parametrize("domain", ["exa_mple.com", "-a.example", "a..example", "[192.0.2.1]",
                                    "a" * 64 + ".example", "", "a b.example"])
def test_check_domain_syntax_invalid(domain: str) -> None:
    line = one_error(run("check-domain", "--", domain), 1)  # "--": "-a.example" is no option
    assert "invalid domain" in line


ZONE = {
    ("mx.test", "MX"): ["20 mx2.mx.test.", "10 mx1.mx.test."],
    ("mx1.mx.test", "A"): ["192.0.2.1"],
    ("mx1.mx.test", "AAAA"): ["2001:db8::1"],
    ("mx2.mx.test", "A"): ["192.0.2.2"],
    ("implicit.test", "A"): ["192.0.2.3"],
    ("nullmx.test", "MX"): ["0 ."],
    ("dangling.test", "MX"): ["10 nowhere.dangling.test."],
    ("nothing.test", "TXT"): ['"v=spf1 -all"'],
}


async def util_dns(tmp_path: Path, dns: DnsServer, *args: str) -> tuple[int, str, str]:
    conf = tmp_path / "dns.toml"
    conf.write_text(f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = 1\n'
                    'lifetime = 2\n')
    proc = await asyncio.create_subprocess_exec(
        *SMTPGATE, "util", "check-domain", "--dns", "-c", str(conf), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    assert b"Traceback" not in err
    return proc.returncode, out.decode(), err.decode()


async def test_check_domain_dns(tmp_path: Path) -> None:
    async with DnsServer(ZONE, servfail=["broken.test"]) as dns:
        code, out, err = await util_dns(tmp_path, dns, "mx.test")
        assert (code, err) == (0, "")
        assert out.splitlines() == ["10 mx1.mx.test 192.0.2.1 2001:db8::1",
                                    "20 mx2.mx.test 192.0.2.2"]

        code, out, err = await util_dns(tmp_path, dns, "implicit.test")
        assert (code, out) == (0, "0 implicit.test 192.0.2.3\n")  # RFC 5321 §5.1 implicit MX

        code, out, err = await util_dns(tmp_path, dns, "nullmx.test")
        assert code == 1 and err == "smtpgate: nullmx.test: null MX: the domain accepts no " \
                                    "mail (RFC 7505)\n"

        code, out, err = await util_dns(tmp_path, dns, "nowhere-at-all.test")
        assert code == 1 and "does not exist (NXDOMAIN)" in err and len(err.splitlines()) == 1

        code, out, err = await util_dns(tmp_path, dns, "nothing.test")
        assert code == 1 and "no MX and no A/AAAA record" in err

        code, out, err = await util_dns(tmp_path, dns, "dangling.test")
        assert code == 1 and out == "10 nowhere.dangling.test (no A/AAAA record)\n"
        assert err == "smtpgate: dangling.test: no mail host has an address\n"

        code, out, err = await util_dns(tmp_path, dns, "broken.test")
        assert code == 3 and err.startswith("smtpgate: broken.test: DNS lookup failed: ")
        assert len(err.splitlines()) == 1


def test_check_domain_dns_bad_config_is_exit_2(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text('[dns]\nnameservers = ["not an address"]\n')
    line = one_error(run("check-domain", "--dns", "-c", str(conf), "example.com"), 2)
    assert "dns.nameservers" in line and str(conf) in line
