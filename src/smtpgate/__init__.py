"""smtpgate: an ESMTP server and proxy with hooks, policy and content scanning.

Entry points: ``smtpgate serve`` (CLI, :mod:`smtpgate.cli`), :class:`smtpgate.app.Smtpgate`
(embedding), :mod:`smtpgate.hooks` (hook API). See README.md.
"""

__version__ = "0.1.0"
