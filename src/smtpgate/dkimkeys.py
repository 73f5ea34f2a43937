"""DKIM signing keys: generating them (``smtpgate dkim keygen``) and loading them for the
``dkim`` plugin.

Entry points: :func:`generate_key`, :func:`load_key`, :class:`SigningKey`. Keys live in
``KEY_DIR/DOMAIN/SELECTOR.key`` (mode 0600): an RSA key as PEM (RFC 6376 §3.3.1, rsa-sha256),
an Ed25519 key as the base64 of its 32-byte seed, the form dkimpy signs with (RFC 8463).
The DNS record published for a key is ``SELECTOR._domainkey.DOMAIN TXT "v=DKIM1; k=...;
p=..."`` (RFC 6376 §3.6.1).
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from .errors import ConfigError

__all__ = ["SigningKey", "dns_record", "generate_key", "key_path", "load_key"]

_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key ready for dkimpy.

    Attributes:
        domain: the signing domain (``d=``).
        selector: the selector (``s=``).
        algorithm: ``b"rsa-sha256"`` or ``b"ed25519-sha256"`` (dkimpy's ``signature_algorithm``).
        private: the key as dkimpy takes it (PEM bytes, or the base64 Ed25519 seed).
    """

    domain: str
    selector: str
    algorithm: bytes
    private: bytes


def _check_name(domain: str, selector: str) -> None:
    labels = domain.rstrip(".").split(".")
    if len(labels) < 2 or not all(_LABEL.match(x) for x in labels):
        raise ConfigError(f"not a domain name: {domain!r}")
    if not all(_LABEL.match(x) for x in selector.split(".")):
        raise ConfigError(f"not a DKIM selector: {selector!r} (letters, digits, hyphens)")


def key_path(key_dir: str | os.PathLike[str], domain: str, selector: str) -> Path:
    """``KEY_DIR/DOMAIN/SELECTOR.key`` (the domain in lower case)."""
    return Path(key_dir) / domain.lower().rstrip(".") / f"{selector}.key"


def dns_record(domain: str, selector: str, algorithm: str, public: bytes) -> str:
    """The TXT record to publish, in zone-file form, split into strings of at most 255
    octets (RFC 1035 §3.3.14)."""
    value = f"v=DKIM1; k={algorithm}; p={base64.b64encode(public).decode('ascii')}"
    parts = [value[i : i + 255] for i in range(0, len(value), 255)]
    quoted = " ".join(f'"{p}"' for p in parts)
    return f"{selector}._domainkey.{domain.lower().rstrip('.')}. IN TXT {quoted}"


def generate_key(key_dir: str | os.PathLike[str], domain: str, selector: str, *,
                 algorithm: str = "rsa", bits: int = 2048,
                 overwrite: bool = False) -> tuple[Path, str]:
    """Create a signing key and return ``(file written, DNS TXT record to publish)``.

    Args:
        key_dir: the key directory (``KEY_DIR/DOMAIN/`` is created, mode 0700).
        domain / selector: what the key signs as (``d=``, ``s=``).
        algorithm: ``"rsa"`` (RSA-SHA256, RFC 6376) or ``"ed25519"`` (RFC 8463).
        bits: RSA key size (1024-4096; RFC 8301 requires at least 1024, 2048 advised).
        overwrite: replace an existing key file (else it is an error).

    Raises:
        ConfigError: a bad domain, selector, algorithm or size, or the file exists.
        OSError: the file cannot be written.
    """
    _check_name(domain, selector)
    path = key_path(key_dir, domain, selector)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path}: a key already exists (remove it first)")
    if algorithm == "rsa":
        if not 1024 <= bits <= 4096:
            raise ConfigError(f"RSA key size must be 1024-4096 bits, got {bits}")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    elif algorithm == "ed25519":
        ed = ed25519.Ed25519PrivateKey.generate()
        seed = ed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        private = base64.b64encode(seed) + b"\n"
        public = ed.public_key().public_bytes(serialization.Encoding.Raw,
                                              serialization.PublicFormat.Raw)
    else:
        raise ConfigError(f"DKIM key algorithm must be rsa or ed25519, got {algorithm!r}")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    os.replace(tmp, path)
    return path, dns_record(domain, selector, algorithm, public)


def load_key(key_dir: str | os.PathLike[str], domain: str, selector: str) -> SigningKey:
    """Read ``KEY_DIR/DOMAIN/SELECTOR.key`` (PEM: RSA; one base64 line: Ed25519 seed).

    Raises:
        ConfigError: the file is missing, unreadable or not a key.
    """
    path = key_path(key_dir, domain, selector)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the DKIM key: {exc.strerror or exc}") from None
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: not a usable PEM key: {exc}") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"{path}: a PEM DKIM key must be RSA")
        return SigningKey(domain.lower().rstrip("."), selector, b"rsa-sha256", data)
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise ConfigError(f"{path}: neither a PEM RSA key nor a base64 Ed25519 seed")
    return SigningKey(domain.lower().rstrip("."), selector, b"ed25519-sha256",
                      base64.b64encode(seed))
