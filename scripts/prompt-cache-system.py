#!/usr/bin/env python3
"""Two chats against a running `hymba serve` (standard library only) with one ~700-token system
prompt and different questions, each answered with one token: the second resumes after the
system turn that the first left in the prompt cache. Prints each one's tokens and time.

    python3 scripts/prompt-cache-system.py PORT
"""
import json, time, urllib.request, sys
port = int(sys.argv[1])
def post(body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    t = time.perf_counter(); r = json.load(urllib.request.urlopen(req)); return r, time.perf_counter() - t
system = {"role": "system", "content": " ".join(f"Rule {i}: answer politely and check the facts twice." for i in range(50))}
out = []
for q in ["What is the tallest mountain on Earth?", "Which river is the longest?"]:
    r, t = post({"messages": [system, {"role": "user", "content": q}], "max_tokens": 1, "temperature": 0})
    out.append(f"{r['usage']['prompt_tokens']} prompt tokens, {r['usage']['prompt_tokens_details']['cached_tokens']} cached, {t:.2f} s")
print("; ".join(out))
