#!/usr/bin/env python3
"""Where the containerd pair's pull and run time goes, phase by phase.

Joins three records of one HelloBench run of the `containerd` pair:

- results.json (`--out`): every pull / run step's start ("started at N ns (unix)" in its
  notes) and its duration as ctr saw it;
- containerd's debug log (`<work>/containerd-pair/containerd/containerd.log`, written with
  `SLACKER_CONTAINERD_LOG_LEVEL=debug`): content writes, snapshot RPCs, container and task
  events, with timestamps;
- HelloBench's stderr with `SLACKER_TIMING=1`: the snapshotter's per-step timings
  (`step="prepare: clone" us=...`).

Prints, per path, the median of each phase over every image and repetition (seconds),
and the snapshotter's steps (median, milliseconds). Standard library only.

    SLACKER_TIMING=1 SLACKER_CONTAINERD_LOG_LEVEL=debug \\
      slacker-hellobench --paths containerd-overlayfs,containerd-slacker --no-dedup \\
      --reps 3 --work /tmp/hb --out /tmp/hb-out 2> /tmp/hb.err
    python3 hellobench/tools/ctr-breakdown.py /tmp/hb-out/results.json \\
      /tmp/hb/containerd-pair/containerd/containerd.log /tmp/hb.err
"""

import json
import re
import statistics
import sys
from datetime import datetime, timezone

TS = re.compile(r'time="(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d+)Z"')
MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')
TOPIC = re.compile(r"topic=(\S+)")
STEP = re.compile(r'^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d+)Z\s+DEBUG\s+step="([^"]+)" us=(\d+)')


def ns_of(date, frac):
    t = datetime.strptime(date, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return int(t.timestamp()) * 10**9 + int(frac.ljust(9, "0")[:9])


def containerd_events(path):
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            m, g = TS.search(line), MSG.search(line)
            if not m or not g:
                continue
            msg = g.group(1)
            t = TOPIC.search(line)
            if msg == "event published" or msg == "event forwarded":
                msg = t.group(1) if t else msg
            out.append((ns_of(m.group(1), m.group(2)), msg))
    return out


def first(events, lo, hi, msg, after=None):
    """Time of the first event `msg` in [lo, hi] (and not before `after`)."""
    for t, m in events:
        if lo <= t <= hi and m == msg and (after is None or t >= after):
            return t
    return None


def nth(events, lo, hi, msg, n):
    seen = [t for t, m in events if lo <= t <= hi and m == msg]
    return seen[n] if len(seen) > n else None


def phases(marks, start, end):
    """Durations between consecutive marks (name, time); a missing mark merges into the next."""
    out, prev = {}, start
    for name, t in marks + [("end", end)]:
        if t is None:
            continue
        out[name] = (t - prev) / 1e9
        prev = t
    return out


def pull_phases(ev, t0, t1):
    w1 = first(ev, t0, t1, "(*service).Write started")
    w2 = nth(ev, t0, t1, "(*service).Write started", 1)
    img = first(ev, t0, t1, "create image")
    stat = first(ev, t0, t1, "stat snapshot", img)
    prep = first(ev, t0, t1, "prepare snapshot", img)
    prep_done = first(ev, t0, t1, "/snapshot/prepare", prep)
    applied = first(ev, t0, t1, "diff applied", prep)
    com = first(ev, t0, t1, "commit snapshot", prep)
    com_done = first(ev, t0, t1, "/snapshot/commit", com)
    return phases(
        [
            ("ctr start + resolve", w1),
            ("manifest fetch + store", w2),
            ("config + layer fetch + store, image record", img),
            ("unpack set-up (ctr)", stat),
            ("stat chain", prep),
            ("Prepare (extract)", prep_done),
            ("apply (mount, untar, unmount)", applied),
            ("to Commit", com),
            ("Commit", com_done),
        ],
        t0,
        t1,
    )


def run_phases(ev, t0, t1):
    prep = first(ev, t0, t1, "prepare snapshot")
    prep_done = first(ev, t0, t1, "/snapshot/prepare", prep)
    m1 = first(ev, t0, t1, "get snapshot mounts", prep_done)
    created = first(ev, t0, t1, "/containers/create", prep_done)
    task = first(ev, t0, t1, "/tasks/create", created)
    start = first(ev, t0, t1, "/tasks/start", task)
    return phases(
        [
            ("ctr start, image, stat", prep),
            ("Prepare (container)", prep_done),
            ("to Mounts", m1),
            ("spec: temp mount of the rootfs (ctr), container record", created),
            ("task create: rootfs mount, shim, runc create", task),
            ("task start", start),
        ],
        t0,
        t1,
    )


def started(step):
    for n in step.get("notes", []):
        m = re.match(r"started at (\d+) ns", n)
        if m:
            return int(m.group(1))
    return None


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    results = json.load(open(sys.argv[1]))
    ev = containerd_events(sys.argv[2])
    steps = []
    if len(sys.argv) > 3:
        with open(sys.argv[3], errors="replace") as f:
            for line in f:
                m = STEP.match(line.strip())
                if m:
                    steps.append((ns_of(m.group(1), m.group(2)), m.group(3), int(m.group(4))))
    for p in results["paths"]:
        if not p["path"].startswith("containerd-"):
            continue
        acc = {"pull": {}, "run": {}}
        totals = {"pull": [], "run": []}
        windows = []
        for img in p["images"]:
            for rep in img["reps"]:
                for kind, fn in (("pull", pull_phases), ("run", run_phases)):
                    s = rep.get(kind)
                    if not s:
                        continue
                    t0 = started(s["step"])
                    if t0 is None:
                        continue
                    parts = dict(s["step"].get("parts", []))
                    secs = parts.get("ctr run until ready", s["secs"])
                    t1 = t0 + int(secs * 1e9)
                    windows.append((kind, t0, t1))
                    totals[kind].append(secs)
                    for k, v in fn(ev, t0, t1).items():
                        acc[kind].setdefault(k, []).append(v)
        print(f"## {p['path']}")
        for kind in ("pull", "run"):
            if not totals[kind]:
                continue
            print(f"{kind}: median {statistics.median(totals[kind]):.3f} s over {len(totals[kind])} steps")
            for k, v in acc[kind].items():
                print(f"  {k:58s} {statistics.median(v):.3f} s  (n={len(v)}, max {max(v):.3f})")
        by = {}
        for t, name, us in steps:
            for kind, lo, hi in windows:
                if lo <= t <= hi:
                    by.setdefault((kind, name), []).append(us / 1000)
        if by:
            print("  snapshotter steps (median ms):")
            for (kind, name), v in sorted(by.items()):
                print(f"    {kind:4s} {name:34s} {statistics.median(v):8.1f} ms  (n={len(v)})")
        print()


if __name__ == "__main__":
    main()
