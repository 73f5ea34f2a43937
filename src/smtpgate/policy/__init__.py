"""Policy checks: relay control (and later DNSBL, SPF/DKIM/DMARC, greylisting).

Entry points: :class:`RelayPolicy` (RFC 5321 §3.6 relay domains, local
networks, authenticated clients).
"""

from .relay import RelayPolicy, normalize_domain

__all__ = ["RelayPolicy", "normalize_domain"]
