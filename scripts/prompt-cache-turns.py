#!/usr/bin/env python3
"""Turns against a running `hymba serve` (standard library only): a prompt of N random token ids
answered with one token, then the same ids and 40 more, as a conversation's next turn would send,
then the first prompt again, as a regenerated answer would. Prints each one's time and how many
prompt tokens the server resumed from its prompt cache.

    python3 scripts/prompt-cache-turns.py PORT N
"""
import json
import random
import sys
import time
import urllib.request

port, n = int(sys.argv[1]), int(sys.argv[2])


def post(body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    t = time.perf_counter()
    r = json.load(urllib.request.urlopen(req))
    return r, time.perf_counter() - t


random.seed(0)
first = [1] + [random.randrange(100, 30000) for _ in range(n - 1)]
_, t1 = post({"prompt": first, "max_tokens": 1, "temperature": 0})
nxt = first + [random.randrange(100, 30000) for _ in range(40)]
r, t2 = post({"prompt": nxt, "max_tokens": 1, "temperature": 0})
cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
r3, t3 = post({"prompt": first, "max_tokens": 1, "temperature": 0})
again = r3["usage"]["prompt_tokens_details"]["cached_tokens"]
print(f"turn 1: {n} prompt tokens, {t1:.2f} s; turn 2: {len(nxt)} prompt tokens, {cached} cached, {t2:.2f} s; "
      f"turn 1 again: {again} cached, {t3:.2f} s")
