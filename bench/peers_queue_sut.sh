#!/usr/bin/env bash
# SUT_CMD for the shared rig's peers.sh: smtpgate in queue mode (fsync on) relaying to a
# Postfix smtp-sink, all on 127.0.0.1. Usage (see bench/METHOD.md):
#   SUT_NAME=smtpgate-queue SUT_CMD="/work/main/bench/peers_queue_sut.sh {port}" ./peers.sh
# Starts `smtp-sink -c` on a free port as a child, writes a config into a fresh directory
# under QUEUE_DIR (/var/tmp; spool included), then execs `smtpgate serve` in the foreground,
# so the sink is in the served process's tree (peers.sh stops the whole tree).
# MODE=discard gives the discard row instead (no sink, no spool).
set -euo pipefail
port="${1:?usage: peers_queue_sut.sh PORT}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-$root/.venv/bin/python}"
export PATH="$PATH:/usr/sbin"
dir="$(mktemp -d "${QUEUE_DIR:-/var/tmp}/smtpgate-peers-XXXXXX")"
cfg="$dir/smtpgate.toml"
cat >"$cfg" <<TOML
[server]
hostname = "bench.local"
listen = ["127.0.0.1:$port"]
max_connections = 5000
max_connections_per_ip = 5000
[log]
level = "WARNING"
TOML
if [ "${MODE:-queue}" = discard ]; then
    printf '[relay]\nurl = "discard:"\n' >>"$cfg"
else
    sink_port="$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    user=(); [ "$(id -u)" = 0 ] && user=(-u nobody)
    smtp-sink "${user[@]}" -m 2000 "127.0.0.1:$sink_port" 1024 >"$dir/sink.log" 2>&1 &
    printf '[relay]\nurl = "smtp://127.0.0.1:%s"\n[queue]\npath = "%s/spool"\nfsync = true\n' \
        "$sink_port" "$dir" >>"$cfg"
fi
exec "$py" -m smtpgate serve -c "$cfg"
