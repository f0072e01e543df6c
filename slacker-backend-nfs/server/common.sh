# shellcheck shell=bash
# Shared settings for the knfsd-in-a-VM test server. Sourced by the other scripts.
#
# Build products live in a machine-wide cache OUTSIDE the repository, so they
# are reused between runs on the same machine and never committed:
#   $NFSVM_WORK  (default ${SLACKER_CACHE:-/var/cache/slacker}/nfsvm)
# The state of one running server (pid, port, console log, disk image) lives in
# a per-run directory, $NFSVM_RUN (default $NFSVM_WORK/run); give each
# concurrently running server its own NFSVM_RUN (and NFSVM_PORT if needed).
# Nothing is installed system-wide except a handful of shared libraries that
# qemu needs and the host tools listed in install.sh.

set -euo pipefail

NFSVM_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${NFSVM_WORK:-${SLACKER_CACHE:-/var/cache/slacker}/nfsvm}"
DEBS="$WORK/debs"        # downloaded .deb files
ROOT="$WORK/root"        # all .debs extracted here (a "sysroot", never chrooted into)
BUILD="$WORK/build"      # vmlinux + initramfs produced by build.sh
RUN="${NFSVM_RUN:-$WORK/run}"  # pid file, console log, port, env, disk image of a running server

# Tunables (environment overrides)
NFSVM_FS="${NFSVM_FS:-btrfs}"              # btrfs | xfs  (both reflink-capable)
NFSVM_DISK_SIZE="${NFSVM_DISK_SIZE:-16G}"  # sparse raw image, recreated on every start
NFSVM_MEM="${NFSVM_MEM:-1024}"             # guest RAM in MiB
NFSVM_CPUS="${NFSVM_CPUS:-}"              # vCPUs; empty = 1 under TCG, 2 under KVM
NFSVM_CPU="${NFSVM_CPU:-}"                # qemu -cpu model; empty = Nehalem (TCG) / host (KVM)
NFSVM_THREADS="${NFSVM_THREADS:-16}"       # knfsd threads (= max concurrently served RPCs)
NFSVM_PORT="${NFSVM_PORT:-}"               # host port for NFS (127.0.0.1); empty = first free from 20490
NFSVM_CTRL="${NFSVM_CTRL:-1}"              # 1 = also forward a guest root shell (for test assertions)
NFSVM_TIMEOUT="${NFSVM_TIMEOUT:-120}"      # seconds start.sh waits for readiness
NFSVM_ACCEL="${NFSVM_ACCEL:-auto}"         # auto | kvm | tcg

# Packages extracted (not installed) into $ROOT.
#  - kernel + firmware + qemu: run the VM without touching the host's qemu-utils/systemd
#  - everything else ends up inside the initramfs
GUEST_PKGS=(
  busybox-static nfs-kernel-server nfs-common btrfs-progs xfsprogs
  libc6 libtirpc3 libtirpc-common libwrap0 libevent-core-2.1-7 libsqlite3-0
  libblkid1 libuuid1 libcap2 libselinux1 libpcre2-8-0 libkeyutils1 libcom-err2
  libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libdevmapper1.02.1
  libudev1 liblzo2-2 libzstd1 zlib1g libtinfo6 libedit2 libbsd0 libmd0 liburcu8
  libinih1 libnsl2
)
QEMU_PKGS=(qemu-system-x86 qemu-system-common qemu-system-data seabios)

die() { echo "nfsvm: $*" >&2; exit 1; }
log() { echo "nfsvm: $*" >&2; }

kernel_version() {
  # The one kernel extracted into $ROOT (install.sh fetches exactly one).
  local d
  d=$(ls -1 "$ROOT/lib/modules" 2>/dev/null | head -n1)
  [[ -n "$d" ]] || die "no kernel in $ROOT; run install.sh first"
  echo "$d"
}

qemu_bin() { echo "$ROOT/usr/bin/qemu-system-x86_64"; }

# True if the qemu whose pid is in $RUN/qemu.pid is alive and is ours
# (pids get reused: check its command line).
vm_alive() {
  local pid
  pid=$(cat "$RUN/qemu.pid" 2>/dev/null) || return 1
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "-name nfsvm"
}
