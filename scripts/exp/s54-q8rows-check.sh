#!/usr/bin/env bash
# Session 54's fourth and fifth device calls (branch gpu-q8-rows): main's Q8_0 build in .gpu/v/q, the
# branch's in .gpu/v/s (one-row GEMV chunks of 16 quants, batches of 4-32 rows on the
# tensor-core rows kernel reading the quants in place). Every CUDA test, then rounds.
set -u
for v in q s; do [ -f .gpu/v/$v/hymba ] || { tar xJf .gpu/shared.tar.xz -C .gpu/v/$v && xz -d .gpu/v/$v/*.xz && chmod +x .gpu/v/$v/hymba .gpu/v/$v/cuda-tests; }; done
export HYMBA_SHARED=$PWD/.gpu/v/q/shared
for d in /usr/local/cuda/lib64; do export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== tests"
timeout 200 .gpu/v/s/cuda-tests --test-threads=1 2>&1 | grep -E "^test .*(FAILED|ok)$|panicked|relative|test result:|max diff"
sum() {
    python3 -c '
import json, sys
try:
    b = json.load(sys.stdin)
except Exception:
    print("no result"); sys.exit()
out = ["prefill %.0f" % b["prefill_tok_s"]] if b.get("prompt_tokens") else []
out += ["@%d %.1f" % (d["context"], d["tok_s"]) for d in b.get("decode", [])]
out += ["b%d %.0f" % (d["batch"], d["tok_s"]) for d in b.get("batched_decode", [])]
print("  ".join(out))'
}
A="--device cuda --json --synthetic hymba-1.5b --kv-cache bf16 --prompt 512 --decode 32 --contexts 128,8192 --batch 1,2,8,16,64"
for r in $(seq ${ROUNDS:-1}); do
    printf "%-10s " main-q8; timeout 120 .gpu/v/q/hymba bench $A --quant q8_0 2>/dev/null | sum
    printf "%-10s " new-q8; timeout 120 .gpu/v/s/hymba bench $A --quant q8_0 2>/dev/null | sum
    printf "%-10s " new-bf16; timeout 100 .gpu/v/s/hymba bench $A 2>/dev/null | sum
done
