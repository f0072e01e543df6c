#!/usr/bin/env bash
# (d) Stop the NFS server VM started by start.sh, by the pid qemu wrote.
# Idempotent: exits 0 if it is not running. The disk image is deleted, unless
#
#   stop.sh --keep-disk
#
# keeps it for `start.sh --keep-disk`. qemu is stopped with SIGTERM, which
# ends the guest at once (no shutdown): for the export this is a power cut,
# what the guest had not written to the image is lost.
source "$(dirname "$0")/common.sh"

keep_disk=0
for a in "$@"; do
  case "$a" in
    --keep-disk) keep_disk=1 ;;
    *) die "usage: stop.sh [--keep-disk]" ;;
  esac
done

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
rm -f "$pidf" "$RUN/port" "$RUN/env" "$RUN/started-by-tests"
[[ $keep_disk == 1 ]] || rm -f "$RUN/disk.img"
