#!/usr/bin/env bash
# slacker-backend-rbd's test cluster (adapted from the measured reference in the project's
# notes). Start (or bootstrap) a throw-away single-node Ceph cluster: 1 mon, 1 mgr, 1 bluestore OSD
# on a sparse file. No systemd, no cephadm, no kernel modules. Idempotent:
#   - nothing there      -> mkfs everything, start daemons
#   - data there, daemons dead -> just start the dead daemons
#   - everything running -> only wait for readiness
# Env: CEPH_DIR (default /tmp/slacker-rbd-cluster), OSD_SIZE (default 8G),
#      OSD_MEMORY_TARGET (bytes, default 1 GiB), CEPH_AUTH (none|cephx, default cephx),
#      MON_PORT (default 3300; use another one to run a second cluster side by side),
#      MON_IP (default 127.0.0.1) and PUBLIC_NET (default 127.0.0.0/8): the address the
#      daemons listen on, e.g. a bridge address clients in network namespaces can reach,
#      WAIT_CLEAN=1 (also wait until the mgr reports all PGs active+clean)
# Clients: export CEPH_CONF=$CEPH_DIR/ceph.conf  (rbd, rados, ceph, librados/librbd all honour it)
# The last lines on stdout are the settings the tests read:
#   SLACKER_RBD_MON=127.0.0.1:3300 (other ports: [v2:ip:port,v1:ip:port+1])
#   SLACKER_RBD_KEYRING=<file>  CEPH_DIR=<dir>
set -euo pipefail

CEPH_DIR=${CEPH_DIR:-/tmp/slacker-rbd-cluster}
OSD_SIZE=${OSD_SIZE:-8G}
OSD_MEMORY_TARGET=${OSD_MEMORY_TARGET:-1073741824}
CEPH_AUTH=${CEPH_AUTH:-cephx}
MON_PORT=${MON_PORT:-3300}          # msgr2 port; msgr1 port = 6789 for the default, else MON_PORT+1
MON_V1_PORT=$([ "$MON_PORT" = 3300 ] && echo 6789 || echo $((MON_PORT + 1)))
MON_IP=${MON_IP:-127.0.0.1}
PUBLIC_NET=${PUBLIC_NET:-127.0.0.0/8}
CONF=$CEPH_DIR/ceph.conf
export CEPH_CONF=$CONF
T0=$(date +%s.%N)
ts() { printf '[%6.2fs] %s\n' "$(echo "$(date +%s.%N) - $T0" | bc)" "$*" >&2; }

# alive NAME: the recorded pid is a live (not zombie / not exiting) ceph daemon. A SIGKILLed OSD
# can linger for a second or more (as zombie, reaped by pid 1), so wait for it to go away.
alive() {
  local pf=$CEPH_DIR/run/$1.pid pid st i
  [ -f "$pf" ] || return 1
  pid=$(cat "$pf")
  for i in $(seq 1 100); do
    st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    case $st in
      Z|X|x) sleep 0.1 ;;                                    # dying: wait until it is gone
      *) grep -q "ceph-" "/proc/$pid/cmdline" 2>/dev/null; return $? ;;
    esac
  done
  return 1
}

# launch NAME BINARY ARGS...: run daemon in foreground mode (-f) in its own session, log to file.
launch() {
  local name=$1; shift
  if alive "$name"; then ts "$name already running (pid $(cat "$CEPH_DIR/run/$name.pid"))"; return; fi
  setsid "$@" -f -c "$CONF" </dev/null >>"$CEPH_DIR/log/$name.stdout" 2>&1 &
  echo $! >"$CEPH_DIR/run/$name.pid"
  ts "started $name pid $!"
}

mkdir -p "$CEPH_DIR"/{run,log,mon,mgr,osd}

if [ ! -f "$CONF" ]; then
  FSID=$(uuidgen)
  if [ "$CEPH_AUTH" = cephx ]; then
    AUTH="auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $CEPH_DIR/keyring"
  else
    AUTH="auth cluster required = none
auth service required = none
auth client required = none
auth supported = none"
  fi
  cat >"$CONF" <<EOF
[global]
fsid = $FSID
mon initial members = a
mon host = [v2:$MON_IP:$MON_PORT,v1:$MON_IP:$MON_V1_PORT]
public network = $PUBLIC_NET
ms bind ipv6 = false
$AUTH
run dir = $CEPH_DIR/run
admin socket = $CEPH_DIR/run/\$cluster-\$name.asok
log file = $CEPH_DIR/log/\$cluster-\$name.log
log to stderr = false
err to stderr = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd pool default pg num = 16
osd pool default pgp num = 16
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
mon allow pool delete = true
# default 1.0 s: every self-managed snap create/remove (an OSDMap change) then takes ~1 s
paxos propose interval = 0.01
paxos min wait = 0.001
mon osd full ratio = 0.97
mon osd backfillfull ratio = 0.96
mon osd nearfull ratio = 0.95
[client]
# default 10 s: after an OSD restart a client keeps sending to the dead instance's address until
# the op is 'laggy' and it fetches a fresh OSDMap -> every OSD restart stalls clients ~10 s
objecter timeout = 1
[mon]
mon data = $CEPH_DIR/mon/\$cluster-\$id
[mgr]
mgr data = $CEPH_DIR/mgr/\$cluster-\$id
keyring = $CEPH_DIR/mgr/\$cluster-\$id/keyring
[osd]
osd data = $CEPH_DIR/osd/\$cluster-\$id
keyring = $CEPH_DIR/osd/\$cluster-\$id/keyring
osd objectstore = bluestore
bluestore block create = true
bluestore block size = $(numfmt --from=iec "$OSD_SIZE")
bluestore fsck on mount = false
osd memory target = $OSD_MEMORY_TARGET
osd crush update on start = true
EOF
  ts "wrote $CONF (fsid $FSID, auth $CEPH_AUTH)"
fi
FSID=$(awk '/^fsid/ {print $3}' "$CONF")

# ---- mon ----
if [ ! -f "$CEPH_DIR/mon/ceph-a/store.db/CURRENT" ]; then
  rm -rf "$CEPH_DIR/mon/ceph-a"
  MONKEY=()
  if [ "$CEPH_AUTH" = cephx ]; then
    ceph-authtool --create-keyring "$CEPH_DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$CEPH_DIR/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    MONKEY=(--keyring "$CEPH_DIR/keyring")
  fi
  monmaptool --create --fsid "$FSID" --addv a "[v2:$MON_IP:$MON_PORT,v1:$MON_IP:$MON_V1_PORT]" "$CEPH_DIR/monmap" >/dev/null
  ceph-mon -c "$CONF" --mkfs -i a --monmap "$CEPH_DIR/monmap" "${MONKEY[@]}"
  ts "mon mkfs done"
fi
launch mon ceph-mon -i a

# wait for mon quorum
ok=0
for i in $(seq 1 120); do
  ceph -s --connect-timeout 2 >/dev/null 2>&1 && { ok=1; break; }; sleep 0.25
done
[ $ok = 1 ] || { echo "mon not answering:" >&2; tail -20 "$CEPH_DIR/log/ceph-mon.a.log" >&2; exit 1; }
ts "mon answering"
ceph config set mon auth_allow_insecure_global_id_reclaim false >/dev/null 2>&1 || true
# clone format 2 (parents need no protect; snapshots with clones can be removed) needs
# every client to speak mimic or later
ceph osd set-require-min-compat-client mimic --yes-i-really-mean-it >/dev/null 2>&1 || true

# ---- mgr ----
if [ ! -d "$CEPH_DIR/mgr/ceph-x" ]; then
  mkdir -p "$CEPH_DIR/mgr/ceph-x"
  if [ "$CEPH_AUTH" = cephx ]; then
    ceph auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' -o "$CEPH_DIR/mgr/ceph-x/keyring"
  fi
fi
launch mgr ceph-mgr -i x

# ---- osd ----
if [ ! -f "$CEPH_DIR/osd/ceph-0/fsid" ] || ! grep -q . "$CEPH_DIR/osd/ceph-0/whoami" 2>/dev/null; then
  rm -rf "$CEPH_DIR/osd/ceph-0"; mkdir -p "$CEPH_DIR/osd/ceph-0"
  OSD_UUID=$(uuidgen)
  # a half-made osd.0 from an interrupted earlier run would make 'osd new' hand out id 1
  ceph osd purge 0 --yes-i-really-mean-it >/dev/null 2>&1 || true
  # pools whose only OSD was wiped can never go active again: drop them (recreated below)
  for pool in $(ceph osd pool ls 2>/dev/null); do
    ceph osd pool rm "$pool" "$pool" --yes-i-really-really-mean-it >/dev/null 2>&1 || true
  done
  if [ "$CEPH_AUTH" = cephx ]; then
    ceph-authtool --create-keyring "$CEPH_DIR/osd/ceph-0/keyring" --gen-key -n osd.0 >/dev/null
    KEY=$(ceph-authtool -p -n osd.0 "$CEPH_DIR/osd/ceph-0/keyring")
    echo "{\"cephx_secret\": \"$KEY\"}" >"$CEPH_DIR/osd/ceph-0/secret.json"
    ID=$(ceph osd new "$OSD_UUID" -i "$CEPH_DIR/osd/ceph-0/secret.json")
  else
    ID=$(ceph osd new "$OSD_UUID")
  fi
  [ "$ID" = 0 ] || { echo "unexpected osd id $ID" >&2; exit 1; }
  ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" >>"$CEPH_DIR/log/osd-mkfs.log" 2>&1 \
    || { echo "osd mkfs failed:" >&2; tail -20 "$CEPH_DIR/log/ceph-osd.0.log" >&2; exit 1; }
  ts "osd mkfs done (block file $(du -h --apparent-size "$CEPH_DIR/osd/ceph-0/block" | cut -f1) sparse, $(du -h "$CEPH_DIR/osd/ceph-0/block" | cut -f1) allocated)"
fi
launch osd ceph-osd -i 0

# ---- readiness ----
# The mon may still list a SIGKILLed osd.0 as "up"; the real test is a write that the OSD commits
# (rados blocks until the PG is active). The mgr's PG view lags by up to ~5 s, so it is only
# waited for with WAIT_CLEAN=1.
ok=0
for i in $(seq 1 240); do
  ceph osd dump 2>/dev/null | grep -q '^osd.0 up *in' && { ok=1; break; }; sleep 0.25
done
[ $ok = 1 ] || { echo "osd.0 not up:" >&2; tail -20 "$CEPH_DIR/log/ceph-osd.0.log" >&2; exit 1; }
ts "osd.0 up+in (per osdmap)"
if ! ceph osd pool ls 2>/dev/null | grep -qx rbd; then
  ceph osd pool create rbd 16 16 >/dev/null 2>&1 || true
  ceph osd pool set rbd size 1 --yes-i-really-mean-it >/dev/null 2>&1 || true
  rbd pool init rbd
  ts "pool rbd created + rbd pool init"
fi
if ! echo ready | timeout 180 rados -p rbd put __ready -; then
  echo "NOT READY: a 1-object write did not commit within 180 s" >&2; ceph -s >&2; exit 1
fi
rados -p rbd rm __ready
ts "READY (object write committed)"
if [ "${WAIT_CLEAN:-0}" = 1 ]; then
  for i in $(seq 1 240); do
    ST=$(ceph pg stat 2>/dev/null || true)
    if echo "$ST" | grep -q 'active+clean' && ! echo "$ST" | grep -qE 'peering|creating|unknown|inactive|activating|down|stale|recover|degraded'; then break; fi
    sleep 0.25
  done
  ts "mgr reports: $ST"
fi
echo "export CEPH_CONF=$CONF" >&2
# A bare ip:port is taken as msgr2 only for 3300: for any other port name both protocols (with
# a bare 127.0.0.1:3615, a client with a refused key timed out instead of failing EACCES).
if [ "$MON_PORT" = 3300 ]; then echo "SLACKER_RBD_MON=$MON_IP:$MON_PORT"
else echo "SLACKER_RBD_MON=[v2:$MON_IP:$MON_PORT,v1:$MON_IP:$MON_V1_PORT]"; fi
if [ "$CEPH_AUTH" = cephx ]; then echo "SLACKER_RBD_KEYRING=$CEPH_DIR/keyring"; else echo "SLACKER_RBD_KEYRING="; fi
echo "CEPH_DIR=$CEPH_DIR"
