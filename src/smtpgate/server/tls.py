"""Server-side TLS context for STARTTLS (RFC 3207) and implicit TLS listeners.

Entry point: :func:`server_tls_context`. Parameters follow nssmtpd (certificate chain
file with the key in it or separate, cafile, capath, ciphers). TLS 1.2 or later only.
"""

from __future__ import annotations

import ssl

from ..errors import ConfigError


def server_tls_context(
    certificate: str,
    key: str = "",
    *,
    cafile: str = "",
    capath: str = "",
    ciphers: str = "",
    min_version: str = "TLSv1.2",
) -> ssl.SSLContext:
    """Build an ``ssl.SSLContext`` for the server side.

    Args:
        certificate: path of a PEM file with the certificate chain (leaf first);
            the private key may be in the same file.
        key: path of a separate PEM private key, ``""`` when it is in ``certificate``.
        cafile / capath: CAs used to verify client certificates, which are
            requested but optional (``CERT_OPTIONAL``) when either is given.
        ciphers: OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are OpenSSL's).
        min_version: ``"TLSv1.2"`` or ``"TLSv1.3"``.

    Returns:
        A context with SSLv2/3, TLS 1.0 and 1.1 disabled, compression off.

    Raises:
        ConfigError: naming the ``tls.*`` key when a file cannot be loaded or the
            cipher string is invalid.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(certificate, key or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls.certificate: cannot load {certificate!r}: {exc}") from exc
    if ciphers:
        try:
            ctx.set_ciphers(ciphers)
        except ssl.SSLError as exc:
            raise ConfigError(f"tls.ciphers: invalid cipher list: {exc}") from exc
    if cafile or capath:
        try:
            ctx.load_verify_locations(cafile=cafile or None, capath=capath or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls.cafile/capath: cannot load: {exc}") from exc
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx
