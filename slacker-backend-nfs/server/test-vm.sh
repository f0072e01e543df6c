#!/usr/bin/env bash
# Shares one server VM between test processes; used by tests/support/mod.rs.
#
#   test-vm.sh acquire PID   Make sure the VM of $NFSVM_RUN is up for test
#                            process PID: installs/builds first if needed
#                            (root only), starts it if it is not running, and
#                            registers PID as a user. Prints the env lines of
#                            start.sh plus NFSVM_RUN=... on stdout.
#                            Exit 77 (with "SKIPPED: reason" on stderr) when
#                            this machine cannot run the VM.
#   test-vm.sh watch         (internal) Runs detached. Once no registered test
#                            process is alive for $NFSVM_IDLE_STOP seconds
#                            (default 5), stops the VM -- but only if a test
#                            started it ($RUN/started-by-tests). A VM started
#                            by hand (start.sh) is reused and left running.
source "$(dirname "$0")/common.sh"

skip() { echo "SKIPPED: $*" >&2; exit 77; }

# Start time of a process (field 22 of /proc/PID/stat): pid + start time
# identify a process even when pids get reused.
proc_start() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  s=${s##*) }
  set -- $s
  echo "${20}"
}

live_users() {
  local f p n=0
  for f in "$RUN"/users/*; do
    [[ -e "$f" ]] || continue
    p=${f##*/}
    if [[ "$(proc_start "$p" || true)" == "$(cat "$f" 2>/dev/null)" ]]; then
      n=$((n + 1))
    else
      rm -f "$f"
    fi
  done
  echo "$n"
}

acquire() {
  local pid=$1
  [[ -n "$pid" && -e "/proc/$pid" ]] || die "usage: test-vm.sh acquire PID"
  if [[ ! -f "$BUILD/vmlinux" || ! -f "$BUILD/initramfs.cpio" || ! -x "$(qemu_bin)" ]]; then
    [[ $EUID -eq 0 ]] || skip "the NFS test VM is not built and this is not root (run server/install.sh and server/build.sh as root)"
    command -v apt-get >/dev/null || skip "no apt-get: server/install.sh needs Debian"
    mkdir -p "$WORK" || skip "cannot create $WORK"
    log "installing and building the test VM in $WORK (first run on this machine)"
    (
      flock 8
      "$NFSVM_HERE/install.sh" && "$NFSVM_HERE/build.sh"
    ) 8>"$WORK/.setup.lock" >&2 || skip "server/install.sh or server/build.sh failed (see above)"
  fi
  mkdir -p "$RUN/users" || skip "cannot create $RUN"
  exec 7>"$RUN/.tests.lock"
  flock 7
  if ! vm_alive; then
    "$NFSVM_HERE/start.sh" >/dev/null 7>&- || die "start.sh failed"
    touch "$RUN/started-by-tests"
  fi
  proc_start "$pid" >"$RUN/users/$pid"
  if [[ -f "$RUN/started-by-tests" ]]; then
    # At most one watcher runs (it holds $RUN/.watcher.lock); extra ones exit.
    setsid -f "$NFSVM_HERE/test-vm.sh" watch </dev/null >>"$RUN/watcher.log" 2>&1 7>&- 8>&- 9>&-
  fi
  cat "$RUN/env"
  echo "NFSVM_RUN=$RUN"
}

watch() {
  exec 6>"$RUN/.watcher.lock"
  flock -n 6 || exit 0
  local idle=0
  log "watcher $$: stops the VM when no test process is left"
  while sleep 1; do
    if ! vm_alive; then
      log "watcher $$: VM gone, exiting"
      break
    fi
    if (( $(live_users) > 0 )); then
      idle=0
      continue
    fi
    idle=$((idle + 1))
    (( idle >= ${NFSVM_IDLE_STOP:-5} )) || continue
    exec 7>"$RUN/.tests.lock"
    flock 7
    if (( $(live_users) == 0 )); then
      if [[ -f "$RUN/started-by-tests" ]]; then
        log "watcher $$: no test process left, stopping the VM"
        "$NFSVM_HERE/stop.sh" 7>&-
      fi
      break
    fi
    exec 7>&-
    idle=0
  done
}

case "${1:-}" in
  acquire) acquire "${2:-}" ;;
  watch) watch ;;
  *) die "usage: test-vm.sh acquire PID | watch" ;;
esac
