#!/usr/bin/env python3
"""K prompts of N random token ids sent at once to a running `hymba serve` (standard library
only), each answered with one token: prints when all were answered, the first answer's time and
the mean.

    python3 scripts/concurrent-prompts.py PORT N K
"""
import json, time, urllib.request, random, sys, threading
port = int(sys.argv[1]); n = int(sys.argv[2]); k = int(sys.argv[3])
def one(seed, out):
    r = random.Random(seed); p = [1] + [r.randrange(100, 30000) for _ in range(n - 1)]
    body = {"prompt": p, "max_tokens": 1, "temperature": 0}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    t = time.perf_counter(); json.load(urllib.request.urlopen(req)); out[seed] = time.perf_counter() - t
out = {}; t0 = time.perf_counter()
ths = [threading.Thread(target=one, args=(s, out)) for s in range(k)]
[t.start() for t in ths]; [t.join() for t in ths]
tot = time.perf_counter() - t0
print(f"{k} x {n} tokens: all in {tot:.2f} s ({k*n/tot:.1f} tok/s), first answer {min(out.values()):.2f} s, mean {sum(out.values())/k:.2f} s")
