"""smtpgate.testing, the pytest plugin for users (issue 14)."""
