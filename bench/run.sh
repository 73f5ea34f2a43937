#!/usr/bin/env bash
# smtpgate benchmark: smtpgate vs aiosmtpd under Postfix's smtp-source, loopback only;
# then queue mode vs proxy mode, and clamd in the data phase (see bench/README.md).
# Installs what is missing (Debian postfix without configuration, clamav-daemon when SCAN
# is on, aiosmtpd, uvloop, the project), runs bench/bench.py, prints the table and writes
# bench/results/latest.txt.
# Environment: ROUNDS (7), MESSAGES (10000), SCENARIOS (a,b,c), EXTRAS (1; 0 = only
# smtpgate and aiosmtpd, 2 = also aiosmtpd+uvloop), QUEUE (1; 0 = no queue family),
# SCAN (1; 0 = no clamd family), FAMILY_ROUNDS (5), QUEUE_MESSAGES (4000),
# SCAN_MESSAGES (5000), LAT_MESSAGES (200), QUEUE_DIR (/var/tmp), CLAMD_THREADS (10),
# MEM_CONNS (1000), MEM_ROUNDS (3), QUIET_WAIT (60 s), PROFILE (0; 1 = py-spy smtpgate
# under scenarios a and c, and the queue and clamd rows under a), TIME_LIMIT (1200 s), PYTHON.
# PERF=1 runs bench/perf.py instead (issue 13: discard and queue mode vs aiosmtpd, workers 1
# vs 2, the 50 MiB memory probe; see bench/METHOD.md), without the clamd install.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
PY="${PYTHON:-python3}"
export PATH="$PATH:/usr/sbin:/usr/local/sbin"
export ROUNDS="${ROUNDS:-7}" MESSAGES="${MESSAGES:-10000}"

die() { echo "bench/run.sh: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- Postfix's smtp-source / smtp-sink (Debian package postfix, no mail system configured)
if ! command -v smtp-source >/dev/null || ! command -v smtp-sink >/dev/null; then
    command -v apt-get >/dev/null || die "smtp-source missing and no apt-get: install Postfix"
    echo "installing postfix (for smtp-source/smtp-sink) ..." >&2
    echo "postfix postfix/main_mailer_type select No configuration" | as_root debconf-set-selections
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
    command -v smtp-source >/dev/null || die "postfix installed but smtp-source not found"
fi

# --- clamd for the scan family (Debian clamav-daemon; nothing is started by the install,
# bench/clamd_proc.py runs a private clamd with its own config and database)
clamd_found() { command -v clamd >/dev/null || [ -x /usr/sbin/clamd ]; }
if [ "${PERF:-0}" = 0 ] && [ "${SCAN:-1}" != 0 ] && ! clamd_found; then
    command -v apt-get >/dev/null || die "clamd missing and no apt-get: install ClamAV or SCAN=0"
    echo "installing clamav-daemon (for the scan family) ..." >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clamav-daemon >/dev/null
    clamd_found || die "clamav-daemon installed but clamd not found"
fi

# --- Python side: the project, aiosmtpd (latest), uvloop; py-spy only for PROFILE=1
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
"$PY" -c 'import smtpgate' 2>/dev/null || pip_install -e "$root"
"$PY" -c 'import aiosmtpd' 2>/dev/null || pip_install aiosmtpd
"$PY" -c 'import uvloop' 2>/dev/null || pip_install uvloop
if [ "${PROFILE:-0}" != 0 ] && ! command -v py-spy >/dev/null; then
    pip_install py-spy
fi
"$PY" -c 'import smtpgate, aiosmtpd, uvloop' || die "Python packages still missing"

# 1,000 idle connections need as many descriptors in the client and in the servers.
ulimit -n 8192 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" -ge 1100 ] || echo "warning: ulimit -n is $(ulimit -n); MEM_CONNS may fail" >&2

mkdir -p "$here/results"
cd "$root"
# Hard bound on the whole run; bench.py stops its servers on SIGTERM.
script="$here/bench.py"
[ "${PERF:-0}" = 0 ] || script="$here/perf.py"
exec timeout --signal=TERM --kill-after=30 "${TIME_LIMIT:-1200}" "$PY" "$script"
