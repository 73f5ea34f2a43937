#!/usr/bin/env bash
# Quick start: set up (first run only) and run smtpgate on its embedded default:
# listens on 127.0.0.1:2525 and stores every accepted message in ./smtpgate-mail (Maildir).
# Extra arguments go to `smtpgate serve` (e.g. -c smtpgate.toml, --listen 0.0.0.0:25).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh" --no-apt
exec "$here/.venv/bin/smtpgate" serve "$@"
