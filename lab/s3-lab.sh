#!/usr/bin/env bash
# A real S3-compatible server for the off-site tests: s3s-fs (the s3s crate's file-system
# server), on 127.0.0.1 only, storing every object as a plain file under its data folder, so a
# test can look at exactly what the server keeps (and flip a byte in it).
# SPDX-License-Identifier: AGPL-3.0-or-later
#
# Usage: lab/s3-lab.sh start | stop | status | env
#   start    start the server if it is not running (idempotent), create the bucket folder,
#            wait until it answers (bounded)
#   stop     stop the server this script started
#   status   exit 0 when it runs
#   env      print the environment the tests and the CLI use (export lines)
# Installed by scripts/install-deps.sh (`cargo install s3s-fs`, cached in $S3_ROOT_BIN).
# Data: /var/lib/vm-backup-lab/s3/data/<bucket>/…; pid and log: /var/lib/vm-backup-lab/s3/.
set -euo pipefail

LAB=${VMB_LAB_ROOT:-/var/lib/vm-backup-lab}/s3
BIN=${VMB_S3S_FS:-/var/cache/vm-backup-lab/s3s-fs/bin/s3s-fs}
PORT=${VMB_S3_PORT:-9414}
BUCKET=${VMB_S3_BUCKET:-vmb-offsite}
ACCESS=vmb-lab-access
SECRET=vmb-lab-secret-0123456789
PIDFILE=$LAB/s3s-fs.pid

die() { echo "s3-lab: ERROR: $*" >&2; exit 1; }

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

answers() { curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$PORT/" ; }

case "${1:-}" in
  start)
    [ -x "$BIN" ] || die "$BIN missing: run scripts/install-deps.sh"
    mkdir -p "$LAB/data/$BUCKET"
    if ! running; then
      # setsid: the server outlives the shell that started it, and is not in its process group.
      setsid "$BIN" --host 127.0.0.1 --port "$PORT" --access-key "$ACCESS" --secret-key "$SECRET" \
        "$LAB/data" >"$LAB/s3s-fs.log" 2>&1 < /dev/null &
      echo $! >"$PIDFILE"
    fi
    for _ in $(seq 1 50); do
      answers && { echo "s3-lab: s3s-fs on http://127.0.0.1:$PORT (pid $(cat "$PIDFILE")), bucket $BUCKET"; exit 0; }
      running || { tail -5 "$LAB/s3s-fs.log" >&2; die "s3s-fs exited"; }
      sleep 0.2
    done
    die "s3s-fs does not answer on port $PORT after 10 s (see $LAB/s3s-fs.log)"
    ;;
  stop)
    if running; then
      pid=$(cat "$PIDFILE")
      kill "$pid"
      for _ in $(seq 1 25); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
    echo "s3-lab: stopped"
    ;;
  status)
    running && answers
    ;;
  env)
    echo "export VMB_S3_ENDPOINT=http://127.0.0.1:$PORT"
    echo "export VMB_S3_BUCKET=$BUCKET"
    echo "export VMB_S3_DATA=$LAB/data/$BUCKET"
    echo "export AWS_ACCESS_KEY_ID=$ACCESS"
    echo "export AWS_SECRET_ACCESS_KEY=$SECRET"
    ;;
  *)
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
