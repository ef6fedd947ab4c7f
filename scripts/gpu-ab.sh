#!/usr/bin/env bash
# Variants of the engine side by side in one call of the GPU machine: each variant's CUDA tests
# (or a filter of them), then rounds of `hymba bench`, the variants taking turns within each
# round so the card's swings fall on all of them alike, one line a run.
#
# A variant is NAME=DIR[:KERNELS][,VAR=VALUE...]: DIR holds a carried `hymba` and `cuda-tests`
# (as for scripts/gpu-check.sh); KERNELS, a kernels.cu to run instead of the built-in one
# (HYMBA_CUDA_KERNELS: a kernel-only change needs no build of its own); VAR=VALUE, variables
# set for its runs (a switch such as HYMBA_CUDA_NO_NORM_FOLD=1: one build, two variants).
# Usage: bash scripts/gpu-ab.sh [-r ROUNDS] [-t TEST_FILTER|-t none] VARIANT... -- BENCH_ARGS...
#   e.g. bash scripts/gpu-ab.sh -t cuda_decode main=.gpu/v/m new=.gpu/v/m:k_new.cu -- \
#        --synthetic hymba-1.5b --kv-cache bf16 --prompt 64 --decode 64 --contexts 128,8192 \
#        --batch 1,2,8,64 (BENCH_ARGS name the model: --synthetic or --model)
# DEVICE (default cuda) picks the bench's device, so the script can be tried on a CPU.
set -uo pipefail
ROUNDS=2
TESTS=
while getopts "r:t:" o; do
    case $o in
    r) ROUNDS=$OPTARG ;;
    t) TESTS=$OPTARG ;;
    *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
VARIANTS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    VARIANTS+=("$1")
    shift
done
[ "${1:-}" = "--" ] && shift
[ ${#VARIANTS[@]} -gt 0 ] || { echo "no variants (NAME=DIR[:KERNELS])" >&2; exit 2; }
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
# Runs the rest of the line as variant $1 would: its kernels, its shared files.
as() {
    local spec=${1#*=}
    local vars=()
    IFS=, read -r -a vars <<< "$spec"
    spec=${vars[0]}
    vars=("${vars[@]:1}")
    local dir=${spec%%:*} kernels=
    [ "$spec" != "$dir" ] && kernels=${spec#*:}
    shift
    if [ -n "$kernels" ]; then
        env HYMBA_SHARED="${HYMBA_SHARED:-$dir/shared}" HYMBA_CUDA_KERNELS="$kernels" "${vars[@]}" "$@"
    else
        env -u HYMBA_CUDA_KERNELS HYMBA_SHARED="${HYMBA_SHARED:-$dir/shared}" "${vars[@]}" "$@"
    fi
}
dir_of() { local spec=${1#*=}; spec=${spec%%,*}; echo "${spec%%:*}"; }
if [ "$TESTS" != none ]; then
    for v in "${VARIANTS[@]}"; do
        echo "== tests ${v%%=*}"
        as "$v" "$(dir_of "$v")/cuda-tests" --test-threads=1 $TESTS 2>&1 |
            grep -E "^test .*(FAILED|ok)$|panicked|relative|test result:" | grep -v " ok$"
    done
fi
echo "== bench $*"
for r in $(seq "$ROUNDS"); do
    for v in "${VARIANTS[@]}"; do
        printf "%-10s " "${v%%=*}"
        as "$v" "$(dir_of "$v")/hymba" bench --device "${DEVICE:-cuda}" --json "$@" 2>/dev/null | python3 -c '
import json, sys
try:
    b = json.load(sys.stdin)
except Exception:
    print("no result"); sys.exit()
out = []
if b.get("prompt_tokens"):
    out.append("prefill %.0f" % b["prefill_tok_s"])
out += ["@%d %.1f" % (d["context"], d["tok_s"]) for d in b.get("decode", [])]
out += ["b%d %.0f" % (d["batch"], d["tok_s"]) for d in b.get("batched_decode", [])]
print("  ".join(out))'
    done
done
