#!/usr/bin/env bash
# Session 54's device call for branch gpu-q8 (Q8_0 weights on the card): main's build in
# .gpu/v/n, the branch's in .gpu/v/q. Every CUDA test of the branch, then bf16 against q8_0
# weights (and main's bf16 beside, for the GEMV's two new arguments) in alternating rounds.
set -u
for v in n q; do [ -f .gpu/v/$v/hymba ] || { tar xJf .gpu/shared.tar.xz -C .gpu/v/$v && xz -d .gpu/v/$v/*.xz && chmod +x .gpu/v/$v/hymba .gpu/v/$v/cuda-tests; }; done
export HYMBA_SHARED=$PWD/.gpu/v/n/shared
for d in /usr/local/cuda/lib64; do export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== tests"
timeout 200 .gpu/v/q/cuda-tests --test-threads=1 2>&1 | grep -E "^test .*(FAILED|ok)$|panicked|relative|test result:|max diff"
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
out += ["%s %.0f MB" % (k, b[k] / 1e6) for k in b if k == "weight_bytes_per_token" or "peak" in k]
print("  ".join(out))'
}
A="--device cuda --json --synthetic hymba-1.5b --kv-cache bf16 --prompt 512 --decode 32 --contexts 128,8192 --batch 1,2,16,64"
for r in 1 2; do
    printf "%-10s " main-bf16; timeout 100 .gpu/v/n/hymba bench $A 2>/dev/null | sum
    printf "%-10s " bf16; timeout 100 .gpu/v/q/hymba bench $A 2>/dev/null | sum
    printf "%-10s " q8_0; timeout 140 .gpu/v/q/hymba bench $A --quant q8_0 2>/dev/null | sum
done
timeout 100 .gpu/v/q/hymba bench ${A/--json/} --quant q8_0 2>&1 | tail -12
