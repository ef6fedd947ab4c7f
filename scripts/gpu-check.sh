#!/usr/bin/env bash
# The whole GPU check, one call of the device machine: the CUDA tests (parity with the official
# outputs and with the CPU engine), then `hymba bench --device cuda` (and short ones with Q8_0
# and Q4_0 weights), then `hymba serve --device cuda` against `generate` (scripts/gpu-serve-check.py),
# then a summary.
#
# Built on a machine with Rust, then carried with the working tree:
#   cargo build --release -p hymba-cli && cargo test --release -p hymba --test cuda --no-run
#   mkdir -p .gpu/shared/fixtures && cp -r ../shared/fixtures/* .gpu/shared/fixtures/
#   cp target/release/hymba .gpu/ && cp target/release/deps/cuda-<hash> .gpu/cuda-tests && strip .gpu/*
# Usage: bash scripts/gpu-check.sh [bench arguments...]
set -uo pipefail
DIR=${GPU_DIR:-.gpu}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export HYMBA_SHARED="$DIR/shared"
# NVRTC and cuBLAS: the toolkit's, else the pip wheels' (nvidia-cuda-nvrtc, nvidia-cublas).
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))' 2>/dev/null); do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader
echo "== tests"
"$DIR/cuda-tests" --test-threads=1 --nocapture 2>&1 | tee "$OUT/tests.log" | grep -E "^test |SKIPPED|panicked|relative|assert|result:"
tests=${PIPESTATUS[0]}
# The tests' prompts are short, so their scan runs in one pass: the prompt tests again with the
# chunked scan that longer prompts take.
echo "== prompt tests, the scan in chunks (HYMBA_CUDA_CHUNKED_SCAN=1)"
HYMBA_CUDA_CHUNKED_SCAN=1 "$DIR/cuda-tests" --test-threads=1 --nocapture prompt_shapes long_prompts matches_official batched 2>&1 |
    tee "$OUT/tests-chunked.log" | grep -E "^test |panicked|result:"
chunked=${PIPESTATUS[0]}
echo "== bench"
"$DIR/hymba" bench --device cuda --synthetic hymba-1.5b --json "$@" > "$OUT/bench.json" 2> "$OUT/bench.err"
bench=$?
tail -5 "$OUT/bench.err"
python3 - "$OUT/bench.json" <<'PY'
import json, sys
try:
    b = json.load(open(sys.argv[1]))
except Exception as e:
    print("bench: no result (%s)" % e); sys.exit()
print("device            ", b["device"])
print("copy bandwidth     %.0f GB/s, bf16 GEMM %.0f TFLOP/s" % (b["copy_bandwidth_gbs"], b["bf16_gemm_tflops"]))
print("prefill %5d tok   %.0f tok/s (%.1f%% of the GEMM rate)" % (b["prompt_tokens"], b["prefill_tok_s"], 100 * b["prefill_gemm_fraction"]))
for d in b["decode"]:
    print("decode @ %5d     %.1f tok/s (%.1f%% of the copy bandwidth)" % (d["context"], d["tok_s"], 100 * d["bandwidth_fraction"]))
one = next((d["tok_s"] for d in b["batched_decode"] if d["batch"] == 1), None)
for d in b["batched_decode"]:
    r = " (%.1fx batch 1)" % (d["tok_s"] / one) if one and d["batch"] != 1 else ""
    print("batch %4d        %.1f tok/s in all%s" % (d["batch"], d["tok_s"], r))
print("peak GPU memory    %.0f MB" % (b["gpu_peak_memory_bytes"] / 1e6))
PY
quant=0
for q in q8_0 q4_0; do
    echo "== bench $q (one row and a batch of 16)"
    "$DIR/hymba" bench --device cuda --synthetic hymba-1.5b --quant $q --kv-cache bf16 --prompt 16 \
        --decode 32 --contexts 128 --batch 1,16 --json > "$OUT/bench-$q.json" 2> "$OUT/bench-$q.err" || quant=1
    python3 - "$OUT/bench-$q.json" $q <<'PY'
import json, sys
q = sys.argv[2]
try:
    b = json.load(open(sys.argv[1]))
except Exception as e:
    print("bench %s: no result (%s)" % (q, e)); sys.exit()
d = b["decode"][0]
print("%s decode @ %d   %.1f tok/s (%.1f%% of the copy bandwidth, %.0f MB of weights a token)" % (
    q, d["context"], d["tok_s"], 100 * d["bandwidth_fraction"], b["weight_bytes_per_token"] / 1e6))
for d in b["batched_decode"]:
    print("%s batch %4d   %.1f tok/s in all" % (q, d["batch"], d["tok_s"]))
PY
done
echo "== serve (built-in model, against generate)"
"$DIR/hymba" serve --device cuda --port 8089 > "$OUT/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 60); do curl -s localhost:8089/v1/models > /dev/null 2>&1 && break; sleep 1; done
python3 "$(dirname "$0")/gpu-serve-check.py" http://127.0.0.1:8089 "$DIR/hymba" cuda
serve=$?
kill -TERM $pid; wait $pid || serve=1
echo "== summary: tests exit $tests (chunked scan $chunked), bench exit $bench, quantized benches exit $quant, serve exit $serve"
[ "$tests" = 0 ] && [ "$chunked" = 0 ] && [ "$bench" = 0 ] && [ "$quant" = 0 ] && [ "$serve" = 0 ]
