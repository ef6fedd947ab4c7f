#!/usr/bin/env bash
# Per-kernel figures of decode steps under Nsight Compute (ncu), on the GPU machine: each kernel
# alone (ncu serialises them), its time, the bytes it read from memory and their rate, its
# registers and how many of its blocks fit a multiprocessor. What found that the decode GEMVs ran
# at a third of the memory's pace (session 24). Binaries carried as for scripts/gpu-check.sh.
# Usage: bash scripts/gpu-profile.sh [kernel regex (default: all)] [launches to skip] [count]
# SECTIONS=1: instead, Nsight Compute's own report of the matching launches (speed of light,
# warp stalls, schedulers, occupancy): why a kernel takes its time, not only how long.
set -uo pipefail
DIR=${GPU_DIR:-.gpu}
REGEX=${1:-.}
SKIP=${2:-300}
COUNT=${3:-40}
export HYMBA_SHARED="$DIR/shared"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu not found"; exit 1; }
if [ -n "${SECTIONS:-}" ]; then
    HYMBA_CUDA_PROFILE=1 "$NCU" --clock-control none -k "regex:$REGEX" --launch-skip "$SKIP" \
        --launch-count "$COUNT" --section SpeedOfLight --section WarpStateStats \
        --section SchedulerStats --section Occupancy --section LaunchStats "$DIR/hymba" bench \
        --device cuda --synthetic hymba-1.5b --kv-cache bf16 --prompt 16 --decode 4 --contexts 128 \
        --batch "${BATCH:-1}" 2>/dev/null | grep -vE "^==PROF==|^\s*$|^ *-+ *-+"
    exit
fi
CSV=$(mktemp)
M=gpu__time_duration.sum,dram__bytes_read.sum,launch__registers_per_thread,launch__occupancy_limit_registers
# HYMBA_CUDA_PROFILE keeps steps out of CUDA graphs, so each launch is seen by its kernel's name.
HYMBA_CUDA_PROFILE=1 "$NCU" --clock-control none -k "regex:$REGEX" --launch-skip "$SKIP" \
    --launch-count "$COUNT" --metrics "$M" --csv "$DIR/hymba" bench --device cuda \
    --synthetic hymba-1.5b --kv-cache bf16 --prompt 16 --decode 4 --contexts 128 \
    --batch "${BATCH:-1}" 2>/dev/null >"$CSV"
python3 - "$CSV" <<'PY'
import csv, collections, sys
rows = list(csv.reader(open(sys.argv[1])))
try:
    hdr = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
except StopIteration:
    sys.exit("ncu gave no kernel rows")
h = rows[hdr]
ki, mi, vi = h.index("Kernel Name"), h.index("Metric Name"), h.index("Metric Value")
by = collections.OrderedDict()
for r in rows[hdr + 1:]:
    by.setdefault((r[0], r[ki]), {})[r[mi]] = float(r[vi].replace(",", ""))
print("%-24s %8s %9s %7s %5s %9s" % ("kernel", "µs", "MB read", "TB/s", "regs", "blocks/SM"))
for (i, k), m in by.items():
    t, b = m["gpu__time_duration.sum"], m["dram__bytes_read.sum"]
    print("%-24s %8.1f %9.2f %7.2f %5d %9d" % (k[:24], t / 1e3, b / 1e6, b / t / 1e3,
          m["launch__registers_per_thread"], m["launch__occupancy_limit_registers"]))
PY
rm -f "$CSV"
