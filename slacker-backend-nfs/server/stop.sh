#!/usr/bin/env bash
# (d) Stop the NFS server VM started by start.sh, by the pid qemu wrote.
# Idempotent: exits 0 if it is not running. The disk image is deleted.
source "$(dirname "$0")/common.sh"

[[ -d "$RUN" ]] || exit 0
if [[ "${NFSVM_LOCK_HELD:-0}" != 1 ]]; then
  exec 9>"$RUN/.lock"
  flock 9
fi

pidf="$RUN/qemu.pid"
if [[ -f "$pidf" ]]; then
  pid=$(cat "$pidf")
  # Only signal the process if it is still our qemu (pids get reused).
  if vm_alive; then
    kill -TERM "$pid"
    for _ in $(seq 50); do [[ -e "/proc/$pid" ]] || break; sleep 0.1; done
    if [[ -e "/proc/$pid" ]]; then kill -KILL "$pid"; fi
    log "stopped pid $pid"
  fi
fi
rm -f "$pidf" "$RUN/port" "$RUN/env" "$RUN/disk.img" "$RUN/started-by-tests"
