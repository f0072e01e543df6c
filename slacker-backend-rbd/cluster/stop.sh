#!/usr/bin/env bash
# slacker-backend-rbd test cluster: stop the daemons started by start.sh (by their recorded PIDs only). Idempotent.
#   stop.sh          -> stop daemons, keep data (start.sh restarts them on the same data)
#   stop.sh --purge  -> also delete $CEPH_DIR (mon store, OSD block file, logs)
set -uo pipefail
CEPH_DIR=${CEPH_DIR:-/tmp/slacker-rbd-cluster}
# running PID: exists and is not a zombie (pid 1 here reaps orphans only after ~1-2 s)
running() { local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1; [ "$st" != Z ] && [ "$st" != X ]; }
for name in osd mgr mon; do
  pf=$CEPH_DIR/run/$name.pid
  [ -f "$pf" ] || continue
  pid=$(cat "$pf")
  if running "$pid"; then
    t0=$(date +%s%N)
    kill -TERM "$pid"
    for i in $(seq 1 100); do running "$pid" || break; sleep 0.05; done
    if running "$pid"; then kill -KILL "$pid"; echo "$name ($pid) needed SIGKILL"; fi
    echo "stopped $name ($pid) in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  fi
  rm -f "$pf"
done
if [ "${1:-}" = --purge ]; then rm -rf "$CEPH_DIR"; echo "purged $CEPH_DIR"; fi
