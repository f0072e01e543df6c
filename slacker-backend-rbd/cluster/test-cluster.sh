#!/usr/bin/env bash
# Used by the crate's tests: makes sure the shared test cluster is installed and running
# (one per machine, in $CEPH_DIR, default /tmp/slacker-rbd-cluster; concurrent test binaries
# serialize on a lock file) and prints its settings (SLACKER_RBD_MON=..., ...).
# Exit 77 with "SKIPPED: <why>" on stderr when it cannot run here (not root, no apt).
# The cluster is left running for the next test binary; `.ci/test` stops it at the end,
# by hand: `CEPH_DIR=... bash stop.sh --purge`.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export CEPH_DIR=${CEPH_DIR:-/tmp/slacker-rbd-cluster}
if [ "$(id -u)" != 0 ]; then echo "SKIPPED: the Ceph test cluster needs root" >&2; exit 77; fi
if ! command -v ceph-mon >/dev/null || ! command -v ceph-osd >/dev/null; then
  command -v apt-get >/dev/null || { echo "SKIPPED: no ceph-mon and no apt-get" >&2; exit 77; }
  bash "$HERE/install.sh" >&2
fi
mkdir -p "$(dirname "$CEPH_DIR")"
# -o: the daemons start.sh launches must not inherit (and so hold) the lock
exec flock -o "$CEPH_DIR.lock" bash "$HERE/start.sh"
