#!/usr/bin/env bash
# (c) Start the NFS server VM in the background and wait until it serves.
#
# Prints the NFS port on stdout (the only stdout line) and writes
#   $RUN/env  :  NFSVM_NFS_ADDR=127.0.0.1:<port>  [NFSVM_CTRL_ADDR=127.0.0.1:<port>]
# The export is the NFSv4 pseudo-root "/" (a fresh, empty btrfs or xfs).
# Idempotent: if the VM is already up, prints its port and exits 0.
# Concurrent calls with the same $NFSVM_RUN are serialized by a lock file, so
# they share one VM.
#
#   start.sh [--keep-disk]
#
# --keep-disk: boot on the disk image a previous `stop.sh --keep-disk` left in
# $RUN (the export keeps its files, as after a server restart or power cut);
# without it, or when there is no image, the export is a fresh file system.
source "$(dirname "$0")/common.sh"

keep_disk=0
for a in "$@"; do
  case "$a" in
    --keep-disk) keep_disk=1 ;;
    *) die "usage: start.sh [--keep-disk]" ;;
  esac
done

[[ -f "$BUILD/initramfs.cpio" && -f "$BUILD/vmlinux" ]] || die "run build.sh first"
mkdir -p "$RUN"
exec 9>"$RUN/.lock"
flock 9
export NFSVM_LOCK_HELD=1   # for stop.sh, called below on failure

if vm_alive && [[ -f "$RUN/port" ]]; then
  log "already running (pid $(cat "$RUN/qemu.pid"))"
  cat "$RUN/port"
  exit 0
fi
rm -f "$RUN/qemu.pid" "$RUN/port" "$RUN/env" "$RUN/console.log"

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {
  local p=$1
  while ! port_free "$p"; do p=$((p + 1)); done
  echo "$p"
}
port=${NFSVM_PORT:-$(pick_port 20490)}
ctrl=""
[[ "$NFSVM_CTRL" != 1 ]] || ctrl=$(pick_port $((port + 1)))

# Fresh export filesystem on a sparse raw image (sub-second), unless asked to
# keep the one there.
disk="$RUN/disk.img"
if [[ $keep_disk == 1 && -f "$disk" ]]; then
  log "keeping the existing export disk $disk"
else
  rm -f "$disk"
  truncate -s "$NFSVM_DISK_SIZE" "$disk"
  case "$NFSVM_FS" in
    btrfs) mkfs=(mkfs.btrfs -q -f -K "$disk") ;;
    xfs)   mkfs=(mkfs.xfs -q -f -K -m reflink=1 "$disk") ;;
    *) die "NFSVM_FS must be btrfs or xfs" ;;
  esac
  out=$("${mkfs[@]}" 2>&1) || { echo "$out" >&2; die "${mkfs[0]} failed"; }
fi

# KVM only helps with hardware virtualization (vmx/svm). Some hosts expose a
# /dev/kvm that is a paravirtual nested hypervisor (e.g. kvm_pvm) on which a
# stock distribution kernel hangs right after "Probing EDD": use TCG there.
accel=$NFSVM_ACCEL
if [[ "$accel" == auto ]]; then
  if [[ -w /dev/kvm ]] && grep -qwE 'vmx|svm' /proc/cpuinfo; then accel=kvm; else accel=tcg; fi
fi
if [[ "$accel" == kvm ]]; then
  accel_opts=(-accel kvm -cpu "${NFSVM_CPU:-host}")
  cpus=${NFSVM_CPUS:-2}
else
  # Measured on a 2-core host: one vCPU is ~2x faster than two (the vCPU
  # threads compete with qemu's slirp thread and the client), and an old CPU
  # model (no AVX/ERMS for TCG to emulate) is ~2x faster than -cpu max.
  accel_opts=(-accel tcg,thread=multi -cpu "${NFSVM_CPU:-Nehalem}")
  cpus=${NFSVM_CPUS:-1}
fi

fwd="hostfwd=tcp:127.0.0.1:$port-:2049"
[[ -z "$ctrl" ]] || fwd+=",hostfwd=tcp:127.0.0.1:$ctrl-:2222"
opts="${NFSVM_EXPORT_OPTS:-}"

t0=$(date +%s.%N)
# The daemonized qemu must inherit neither our lock (fd 9) nor any pipe of
# the caller (a test harness waiting for its output would never see EOF):
# close every descriptor above 2 in a subshell, then exec qemu.
(
for fd in /proc/$BASHPID/fd/*; do
  fd=${fd##*/}
  if ((fd > 2)); then eval "exec $fd>&-"; fi
done
exec "$(qemu_bin)" \
  -name nfsvm \
  -machine q35 "${accel_opts[@]}" -smp "$cpus" -m "$NFSVM_MEM" \
  -nodefaults -no-user-config -display none -vga none -no-reboot \
  -L "$ROOT/usr/share/qemu" -L "$ROOT/usr/share/seabios" \
  -kernel "$BUILD/vmlinux" -initrd "$BUILD/initramfs.cpio" \
  -append "console=ttyS0 quiet panic=-1 nfsvm.fs=$NFSVM_FS nfsvm.threads=$NFSVM_THREADS nfsvm.ctrl=$NFSVM_CTRL${opts:+ nfsvm.opts=$opts} ${NFSVM_APPEND:-}" \
  -drive file="$disk",if=none,id=d0,format=raw,cache=unsafe,discard=unmap \
  -device virtio-blk-pci,drive=d0 \
  -netdev user,id=n0,restrict=on,"$fwd" \
  -device virtio-net-pci,netdev=n0,romfile= \
  -serial file:"$RUN/console.log" \
  -daemonize -pidfile "$RUN/qemu.pid"
) </dev/null >/dev/null 2>"$RUN/qemu.stderr" || {
  cat "$RUN/qemu.stderr" >&2
  die "qemu failed to start"
}

# NFS NULL procedure (program 100003, version 4) over TCP: proves knfsd
# answers through the forward (a bare TCP connect would not: slirp accepts
# connections on the host side even when nothing listens in the guest).
nfs_null_ok() {
  local r
  r=$( (exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
        printf '\x80\x00\x00\x28\x6e\x66\x73\x76\x00\x00\x00\x00\x00\x00\x00\x02\x00\x01\x86\xa3\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00' >&3
        timeout 2 head -c 28 <&3 | od -An -tx1 | tr -d ' \n') 2>/dev/null) || return 1
  # record mark, xid "nfsv", REPLY, MSG_ACCEPTED, null verifier, SUCCESS
  [[ "$r" == 80000018""6e667376""00000001""00000000""00000000""00000000""00000000 ]]
}

deadline=$(( $(date +%s) + NFSVM_TIMEOUT ))
until grep -q NFSVM-READY "$RUN/console.log" 2>/dev/null && nfs_null_ok; do
  if ! vm_alive || grep -q 'nfsvm-guest: FAILED' "$RUN/console.log" 2>/dev/null || (( $(date +%s) > deadline )); then
    log "server did not come up; console log:"
    tail -n 40 "$RUN/console.log" >&2 || true
    "$NFSVM_HERE/stop.sh" || true
    exit 1
  fi
  sleep 0.1
done
t1=$(date +%s.%N)

echo "$port" >"$RUN/port"
{
  echo "NFSVM_NFS_ADDR=127.0.0.1:$port"
  [[ -z "$ctrl" ]] || echo "NFSVM_CTRL_ADDR=127.0.0.1:$ctrl"
} >"$RUN/env"
log "ready in $(echo "$t1 - $t0" | bc 2>/dev/null || awk "BEGIN{print $t1-$t0}")s: nfs 127.0.0.1:$port${ctrl:+, guest shell 127.0.0.1:$ctrl}, accel $accel, pid $(cat "$RUN/qemu.pid")"
echo "$port"
