#!/usr/bin/env bash
# Set up (Debian packages + .venv) and run the whole test suite, then the static checks.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/protocol -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export MAIL_CORPUS=${MAIL_CORPUS:-$(cd .. && pwd)/shared/corpus}
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$#" -eq 0 ]; then
  echo "--- ruff" && .venv/bin/ruff check src tests || status=1
  echo "--- mypy --strict" && .venv/bin/mypy || status=1
fi
exit $status
