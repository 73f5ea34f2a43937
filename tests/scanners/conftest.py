"""Scanner daemons for the whole session: each starts once (private config, loopback)."""

from .clamd_fixture import clamd_server  # noqa: F401
from .rspamd_fixture import rspamd_server  # noqa: F401
from .spamd_fixture import spamd_server_fixture  # noqa: F401
