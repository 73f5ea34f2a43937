#!/usr/bin/env bash
# Installs what smtpgate needs on a fresh Debian machine (idempotent, quiet when done before):
#   - Debian packages used by the tests and the benchmark: postfix (smtp-sink/smtp-source,
#     installed WITHOUT configuring a mail system), swaks, openssl, and the content scanners
#     the tests start on private ports: spamassassin + spamc (spamd), clamav-daemon +
#     clamav-testfiles (clamd), rspamd (+ redis-server for its Bayes), haproxy (PROXY tests),
#     and the external filters the filter tests run (opendkim, opendmarc, clamav-milter, spamass-milter, postgrey,
#     postfix-policyd-spf-python), and headless Chromium + chromedriver (admin page tests);
#   - a virtualenv in .venv with smtpgate installed editable, plus the test/uvloop extras.
# Usage: scripts/setup.sh [--no-apt]
set -euo pipefail
cd "$(dirname "$0")/.."

want_apt=1
[ "${1:-}" = "--no-apt" ] && want_apt=0

if [ "$want_apt" = 1 ]; then
  missing=()
  command -v swaks >/dev/null 2>&1 || missing+=(swaks)
  [ -x /usr/sbin/smtp-sink ] || missing+=(postfix)
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  command -v spamassassin >/dev/null 2>&1 || missing+=(spamassassin)
  command -v spamd >/dev/null 2>&1 || missing+=(spamd)
  command -v spamc >/dev/null 2>&1 || missing+=(spamc)
  command -v clamd >/dev/null 2>&1 || missing+=(clamav-daemon)
  [ -d /usr/share/clamav-testfiles ] || missing+=(clamav-testfiles)
  command -v rspamd >/dev/null 2>&1 || missing+=(rspamd)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
  # external filters (docs/filters.md): milters and Postfix policy servers
  command -v opendkim >/dev/null 2>&1 || missing+=(opendkim opendkim-tools)
  command -v opendmarc >/dev/null 2>&1 || missing+=(opendmarc)
  command -v clamav-milter >/dev/null 2>&1 || missing+=(clamav-milter)
  command -v spamass-milter >/dev/null 2>&1 || missing+=(spamass-milter)
  command -v postgrey >/dev/null 2>&1 || missing+=(postgrey)
  [ -x /usr/bin/policyd-spf ] || missing+=(postfix-policyd-spf-python)
  # the admin web page's browser tests (docs/operations.md): headless Chromium + its driver
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
  if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    $SUDO apt-get update -qq
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
      -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.smtpgate-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing smtpgate and its test dependencies into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[test,uvloop]"
  touch "$stamp"
fi
