#!/usr/bin/env bash
# Where a decode step's time goes, under Nsight Systems over replayed CUDA graphs (each graph
# node traced): per kernel its time a step, each stream's busy time, the main stream's idle
# time inside a step and between steps, the host's driver calls a step, and one step's kernels
# in order with their start offsets (session 38 read
# the mixer's ~18 µs a layer of small kernels off this). On the GPU machine nsys is the copy
# inside Nsight Compute; its importer needs libdw.so.1 and libelf.so.1, which that machine
# lacks: on the build machine `apt-get download libdw1 libelf1 libbz2-1.0 liblzma5`, unpack
# them (`dpkg-deb -x`) and carry the .so files in $GPU_DIR/lib. Binaries carried as for
# scripts/gpu-check.sh.
# Usage: bash scripts/gpu-timeline.sh [context (default 128)] [batch (default 1)]
# PREFILL=N: instead, one timed prefill of N tokens: its span, the time the card had no kernel
# running and its longest gaps, each stream's busy time, and how long the two branches' streams
# ran kernels at once (session 59; not yet run on a card).
set -uo pipefail
DIR=${GPU_DIR:-.gpu}
CTX=${1:-128}
BATCH=${2:-1}
OUT=${OUT:-/tmp/gpu-timeline}
mkdir -p "$OUT"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
NSYS=$(command -v nsys || ls /opt/nvidia/nsight-compute/*/host/target-linux-x64/nsys 2>/dev/null | head -1)
[ -n "$NSYS" ] || { echo "nsys not found"; exit 1; }
export LD_LIBRARY_PATH="$PWD/$DIR/lib:$LD_LIBRARY_PATH"
if [ -n "${PREFILL:-}" ]; then
    ARGS=(--prompt "$PREFILL" --decode 1 --contexts 16 --batch 1)
else
    ARGS=(--prompt 16 --decode 48 --contexts "$CTX" --batch "$BATCH")
fi
"$NSYS" profile -t cuda --cuda-graph-trace=node -o "$OUT/steps" --force-overwrite true \
    "$DIR/hymba" bench --device cuda --synthetic hymba-1.5b --kv-cache bf16 "${ARGS[@]}" \
    > "$OUT/nsys.log" 2>&1 || { tail -5 "$OUT/nsys.log"; exit 1; }
"$NSYS" export -t sqlite -o "$OUT/steps.sqlite" --force-overwrite true "$OUT/steps.nsys-rep" > /dev/null 2>&1 \
    || { echo "nsys export failed (libdw.so.1 on LD_LIBRARY_PATH?)"; exit 1; }
if [ -n "${PREFILL:-}" ]; then
    grep -E "prefill" "$OUT/nsys.log"
    python3 - "$OUT/steps.sqlite" <<'PY'
import collections, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
names = dict(db.execute("select id, value from StringIds"))
ks = [(s, e, st, names[n]) for s, e, st, n in db.execute(
    "select start, end, streamId, shortName from CUPTI_ACTIVITY_KIND_KERNEL order by start")]
# Steps start with their embedding kernel; the bench prefills the prompt twice (the first
# untimed) after the model's meta prefix, then the short context: the timed prefill is the later
# of the two steps with the most kernel time.
starts = [i for i, k in enumerate(ks) if k[3].startswith("embed")] + [len(ks)]
steps = [ks[a:b] for a, b in zip(starts, starts[1:])]
work = lambda s: sum(k[1] - k[0] for k in s)
two = sorted(sorted(range(len(steps)), key=lambda i: -work(steps[i]))[:2])
sel = steps[two[-1]]
t0, t1 = sel[0][0], max(k[1] for k in sel)
iv = sorted((k[0], k[1]) for k in sel)
busy, (cs, ce), gaps = 0, iv[0], []
for a, b in iv[1:]:
    if a > ce:
        busy += ce - cs
        gaps.append((a - ce, ce, a))
        cs, ce = a, b
    else:
        ce = max(ce, b)
busy += ce - cs
print("timed prefill: %d kernels, %.2f ms from the first kernel's start to the last's end" % (len(sel), (t1 - t0) / 1e6))
print("a kernel running %.2f ms, none %.2f ms (%d gaps; %.2f ms in gaps over 5 µs); kernel time summed %.2f ms" % (
    busy / 1e6, (t1 - t0 - busy) / 1e6, len(gaps), sum(g[0] for g in gaps if g[0] > 5000) / 1e6, work(sel) / 1e6))
ev = sorted([(k[0], 1) for k in sel] + [(k[1], -1) for k in sel])
n, last, both = 0, t0, 0
for t, d in ev:
    if n >= 2:
        both += t - last
    n, last = n + d, t
print("two kernels or more at once: %.2f ms" % (both / 1e6))
by = collections.Counter()
for k in sel:
    by[k[2]] += k[1] - k[0]
for st, v in by.most_common():
    print("stream %s: kernels %.2f ms" % (st, v / 1e6))
ends = {k[1]: k[3] for k in sel}
for g, a, b in sorted(gaps, reverse=True)[:10]:
    after = next(k[3] for k in sel if k[0] >= b)
    print("  gap %7.1f µs after %-28s before %s" % (g / 1e3, ends.get(a, "?")[:28], after[:28]))
PY
    exit
fi
python3 - "$OUT/steps.sqlite" <<'PY'
import collections, sqlite3, statistics, sys
db = sqlite3.connect(sys.argv[1])
names = dict(db.execute("select id, value from StringIds"))
ks = [(s, e, st, names[n]) for s, e, st, n in db.execute(
    "select start, end, streamId, shortName from CUPTI_ACTIVITY_KIND_KERNEL order by start")]
# A step starts with its embedding kernel. The bench decodes one sequence at the context first,
# then the batch: the steps timed are those of the last kernel count that ten steps or more share
# (a batch's steps have more kernels than one row's, and as many as one row's at batch 1).
starts = [i for i, k in enumerate(ks) if k[3].startswith("embed")]
steps = [ks[a:b] for a, b in zip(starts, starts[1:])]
counts = collections.Counter(len(s) for s in steps)
n = next((len(s) for s in reversed(steps) if counts[len(s)] >= 10), None)
sel = [s for s in steps if len(s) == n][2:-2]
if not sel:
    sys.exit("too few steps of one shape")
print("%d steps of %d kernels; a step's span %.1f µs (median)" % (
    len(sel), n, statistics.median(s[-1][1] - s[0][0] for s in sel) / 1e3))
per, busy = collections.defaultdict(list), collections.defaultdict(list)
for s in sel:
    d, b = collections.defaultdict(float), collections.defaultdict(float)
    for st, en, stream, name in s:
        d[name] += en - st
        b[stream] += en - st
    for k, v in d.items(): per[k].append(v)
    for k, v in b.items(): busy[k].append(v)
for k, v in sorted(per.items(), key=lambda kv: -statistics.median(kv[1])):
    c = sum(1 for x in sel[0] if x[3] == k)
    m = statistics.median(v) / 1e3
    print("%-28s %8.1f µs a step, %4d calls, %6.2f µs a call" % (k[:28], m, c, m / c))
for k, v in busy.items():
    print("stream %s busy %.1f µs a step" % (k, statistics.median(v) / 1e3))
main = collections.Counter(x[2] for x in sel[0]).most_common(1)[0][0]
idle = [sum(max(0, b[0] - a[1]) for a, b in zip(m, m[1:]))
        for m in ([x for x in s if x[2] == main] for s in sel)]
print("main stream idle inside a step: %.1f µs" % (statistics.median(idle) / 1e3))
# Between steps of that shape: the card idle from a step's last kernel to the next one's first
# (the token's way back to the host, the host's work, the next graph's launch).
between = [b[0][0] - max(x[1] for x in a) for a, b in zip(steps, steps[1:]) if len(a) == n == len(b)]
print("between steps: %.1f µs (median), a step from first start to next first start %.1f µs" % (
    statistics.median(between) / 1e3,
    statistics.median(b[0][0] - a[0][0] for a, b in zip(steps, steps[1:]) if len(a) == n == len(b)) / 1e3))
# The host's side of such a step: its driver calls (median count and time a step), and the card
# idle from the embedding's end to the next kernel (the graph's first, where the step replays one).
import bisect
api = [(s, e, names.get(i, str(i))) for s, e, i in db.execute(
    "select start, end, nameId from CUPTI_ACTIVITY_KIND_RUNTIME order by start")]
at = [x[0] for x in api]
calls, took, gap = collections.defaultdict(list), collections.defaultdict(list), []
pairs = [(a, b) for a, b in zip(steps, steps[1:]) if len(a) == n == len(b)][2:-2]
for a, b in pairs:
    c, t = collections.Counter(), collections.Counter()
    for s, e, name in api[bisect.bisect_left(at, a[0][0]):bisect.bisect_left(at, b[0][0])]:
        c[name] += 1
        t[name] += e - s
    for name in set(c) | set(calls):
        calls[name].append(c[name])
        took[name].append(t[name])
    gap.append(a[1][0] - a[0][1])
print("host calls a step (count, µs), embedding to next kernel %.1f µs:" % (statistics.median(gap) / 1e3))
for name in sorted((k for k in took if statistics.median(calls[k]) > 0), key=lambda k: -statistics.median(took[k])):
    print("  %-28s %4d %8.1f" % (name[:28], statistics.median(calls[name]), statistics.median(took[name]) / 1e3))
s0 = sel[len(sel) // 2]
print("one step's first kernels (start offset, duration µs, stream, kernel):")
for st, en, stream, name in s0[:40]:
    print("  %8.2f %6.2f  s%-3s %s" % ((st - s0[0][0]) / 1e3, (en - st) / 1e3, stream, name[:40]))
PY
