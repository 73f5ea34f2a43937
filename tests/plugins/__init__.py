"""Tests of the plugin pipeline (issue 9): the example plugin of docs/plugins.md, every
stage over real sockets, built-ins replaced and reordered, ``smtpgate plugins``."""
