#!/usr/bin/env bash
# Installs what slacker-backend-rbd's test cluster and build need (Debian bookworm: ceph
# 16.2.15, librbd 1.16). Idempotent: installs only what is missing (~21 s on a fresh
# machine, 52 MiB download). Root only.
set -euo pipefail
PKGS=(ceph-mon ceph-mgr ceph-osd ceph-common librbd-dev libclang-dev uuid-runtime bc)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  [ "$(id -u)" = 0 ] || { echo "SKIPPED: not root, cannot install ${missing[*]}" >&2; exit 77; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
fi
