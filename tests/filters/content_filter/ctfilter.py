#!/usr/bin/env python3
"""A ZMailer content filter for the tests, written from smtpserver(8)'s CONTENTFILTER
INTERFACE: say "#hungry", read a job file path, answer "RESULT TEXT", again until end of
file on stdin.

Usage: ctfilter.py MODE RECORD_DIR [ARG]

Every job: the file is copied to RECORD_DIR/<pid>-<n>.msg, its path and mode written to
RECORD_DIR/<pid>-<n>.info, a line goes to stderr. At start: RECORD_DIR/started-<pid>.

MODE:
  answer LINE     answer LINE ("\\r" in it becomes a CR character)
  malformed [LINE]  answer a line that is not "RESULT TEXT" (then LINE if given), then
                  wait for end of file on stdin and exit
  crash-once      the first job of the test: exit 3 without answering; later: "0 250 ..."
  hang-once       the first job of the test: never answer; later: "0 250 ..."
  barrier         wait until two filters have a job, then "0 250 2.6.0 served by <pid>"
"""

import os
import shutil
import sys
import time

mode, record = sys.argv[1], sys.argv[2]
arg = sys.argv[3] if len(sys.argv) > 3 else None
pid = os.getpid()
open(os.path.join(record, f"started-{pid}"), "w").close()
print(f"filter {pid} ready (mode {mode})", file=sys.stderr, flush=True)


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def first_time(marker: str) -> bool:
    try:
        os.close(os.open(os.path.join(record, marker), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


n = 0
while True:
    out("#hungry")
    path = sys.stdin.readline()
    if not path:
        break  # end of file: smtpgate is done with us
    path = path.rstrip("\n")
    n += 1
    job = os.path.join(record, f"{pid}-{n}")
    shutil.copyfile(path, job + ".msg")
    with open(job + ".info", "w") as f:
        f.write(f"{path}\n{os.stat(path).st_mode & 0o777:o}\n")
    print(f"job {n}: {path}", file=sys.stderr, flush=True)
    if mode == "answer":
        assert arg is not None
        out(arg.replace("\\r", "\r"))
    elif mode == "malformed":
        out("this is not an answer")
        if arg is not None:
            out(arg)
        sys.stdin.read()  # smtpgate closes our input
        break
    elif mode == "crash-once":
        if first_time("crashed"):
            os._exit(3)
        out(f"0 250 2.6.0 served by {pid}")
    elif mode == "hang-once":
        if first_time("hung"):
            time.sleep(3600)
        out(f"0 250 2.6.0 served by {pid}")
    elif mode == "barrier":
        open(os.path.join(record, f"arrived-{pid}"), "w").close()
        for _ in range(1200):
            if len([p for p in os.listdir(record) if p.startswith("arrived-")]) >= 2:
                out(f"0 250 2.6.0 served by {pid}")
                break
            time.sleep(0.05)
        else:
            out("-1 550 5.7.1 the other filter never got a job")
    else:
        sys.exit(f"unknown mode {mode}")
