"""Explain mode: the decision record and the dry run (issue 14)."""
