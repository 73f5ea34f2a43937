"""Content scanners: clients for spamd, rspamd, clamd and Sophos SAVDI (SSSP).

Entry points: :class:`~smtpgate.scanners.base.Scanner`, :class:`ScanResult` and the
clients in the submodules.
"""

from .base import Scanner, ScanResult, SpamLearner, open_scanner_connection, parse_scanner_address

__all__ = [
    "ScanResult",
    "Scanner",
    "SpamLearner",
    "open_scanner_connection",
    "parse_scanner_address",
]
