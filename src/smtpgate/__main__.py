"""``python -m smtpgate``: the same as the ``smtpgate`` command."""

import sys

from .cli import main

sys.exit(main())
