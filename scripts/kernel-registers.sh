#!/usr/bin/env bash
# Registers, spills and static shared memory of each CUDA kernel for sm_90, on a machine with no
# GPU: NVRTC compiles kernels.cu to PTX as the backend does (same options), then ptxas assembles
# it with -v. At 256 threads a block, a kernel over 64 registers holds fewer than four blocks a
# multiprocessor (session 48's in_proj fold: 80 registers, three blocks, a slower GEMV).
# NVRTC and ptxas come from the `nvidia-cuda-nvrtc` and `nvidia-cuda-nvcc` wheels:
#   python3 -m pip download --no-deps --only-binary=:all: "nvidia-cuda-nvrtc==13.0.*" \
#       "nvidia-cuda-nvcc==13.0.*" -d /tmp/cu && (cd /tmp/cu && for f in *.whl; do unzip -qo "$f" -d x; done)
#   CUDA_WHEELS=/tmp/cu/x bash scripts/kernel-registers.sh 'gemv_.*_1$'
# Usage: bash scripts/kernel-registers.sh [kernel regex] [kernels.cu]
set -euo pipefail
PATTERN=${1:-.}
# CUDA_ARCH=90a: as the backend compiles for an H100 / H200 (the warpgroup-MMA attention).
ARCH=${CUDA_ARCH:-90}
SRC=${2:-$(dirname "$0")/../crates/hymba/src/backend/cuda/kernels.cu}
LIB=${CUDA_WHEELS:-/tmp/cu/x}/nvidia/cu13/lib
PTXAS=${CUDA_WHEELS:-/tmp/cu/x}/nvidia/cu13/bin/ptxas
[ -e "$LIB/libnvrtc.so.13" ] && [ -x "$PTXAS" ] || { echo "no NVRTC or ptxas under ${CUDA_WHEELS:-/tmp/cu/x} (see the header)" >&2; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
LD_LIBRARY_PATH="$LIB:${LD_LIBRARY_PATH:-}" python3 - "$LIB/libnvrtc.so.13" "$SRC" "$TMP/k.ptx" "$ARCH" <<'PY'
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
prog = ctypes.c_void_p()
src = open(sys.argv[2], "rb").read()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"hymba_kernels.cu", 0, None, None) == 0
opts = (ctypes.c_char_p * 1)(("--gpu-architecture=compute_" + sys.argv[4]).encode())
ok = lib.nvrtcCompileProgram(prog, 1, opts) == 0
n = ctypes.c_size_t()
if not ok:
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    sys.exit("the kernels do not compile:\n" + log.value.decode())
lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
ptx = ctypes.create_string_buffer(n.value)
lib.nvrtcGetPTX(prog, ptx)
open(sys.argv[3], "wb").write(ptx.value)
PY
"$PTXAS" -arch=sm_$ARCH -v "$TMP/k.ptx" -o "$TMP/k.cubin" 2> "$TMP/v.txt"
python3 - "$TMP/v.txt" "$PATTERN" <<'PY'
import re, sys
rows, name, spill = [], None, (0, 0)
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '([^']+)'", line)
    if m:
        name, spill = m.group(1), (0, 0)
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        spill = (int(m.group(1)), int(m.group(2)))
    m = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", line)
    if m and name:
        rows.append((name, int(m.group(1)), spill, int(m.group(2))))
        name = None
print("%-40s %9s %14s %9s" % ("kernel", "registers", "spills (st/ld)", "smem"))
for name, regs, (st, ld), smem in sorted(rows):
    if re.search(sys.argv[2], name):
        print("%-40s %9d %8d / %-5d %9d" % (name, regs, st, ld, smem))
PY
