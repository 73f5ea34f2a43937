"""smtpgate's chain served to a real Postfix: milter and policy listeners (issue 14)."""
