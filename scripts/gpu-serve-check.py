"""`hymba serve` against `hymba generate` on one device (run by scripts/gpu-check.sh with cuda):
greedy, seeded temperature, min-p, top-p and top-k completions (tokens the serving engine has
picked where the logits are) give the generate command's text, streamed ones the same text, and
a request with a penalty (logits to the host) an answer. Usage: gpu-serve-check.py BASE_URL
HYMBA DEVICE"""
import json, subprocess, sys, urllib.request

base, hymba, device = sys.argv[1], sys.argv[2], sys.argv[3]

def post(path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=120).read().decode()

def complete(**kw):
    return json.loads(post("/v1/completions", dict(model=MODEL, prompt="And it came to pass", max_tokens=24, **kw)))

def generate(*args):
    out = subprocess.run([hymba, "generate", "--device", device, "--prompt", "And it came to pass", "--max-new-tokens", "24", *args],
                         capture_output=True, text=True, check=True).stdout
    return out

MODEL = json.loads(urllib.request.urlopen(base + "/v1/models").read())["data"][0]["id"]
ok = True
for name, kw, args in [("greedy", dict(temperature=0), []),
                       ("t=0.8 seed 7", dict(temperature=0.8, seed=7), ["--temperature", "0.8", "--seed", "7"]),
                       ("t=1.2 min_p 0.05 seed 3", dict(temperature=1.2, min_p=0.05, seed=3), ["--temperature", "1.2", "--min-p", "0.05", "--seed", "3"]),
                       ("t=0.9 top_p 0.9 seed 5", dict(temperature=0.9, top_p=0.9, seed=5), ["--temperature", "0.9", "--top-p", "0.9", "--seed", "5"]),
                       ("t=1 top_k 20 seed 4", dict(temperature=1.0, top_k=20, seed=4), ["--temperature", "1", "--top-k", "20", "--seed", "4"])]:
    c = complete(**kw)["choices"][0]["text"]
    g = generate(*args)
    same = g.startswith("And it came to pass" + c) or c in g
    print(f"{name}: serve {c!r}\n    generate {g.strip()!r}\n    {'same' if same else 'DIFFERENT'}")
    ok &= same
    stream = post("/v1/completions", dict(model=MODEL, prompt="And it came to pass", max_tokens=24, stream=True, **kw))
    text = "".join(json.loads(l[6:])["choices"][0]["text"] for l in stream.splitlines() if l.startswith("data: {"))
    print(f"    stream {'same' if text == c else 'DIFFERENT: ' + repr(text)}")
    ok &= text == c
c = complete(temperature=0.9, top_p=0.9, presence_penalty=0.5, seed=5)["choices"][0]
print("top_p 0.9, presence_penalty 0.5:", repr(c["text"]), c["finish_reason"])
print("serve check:", "ok" if ok else "FAILED")
sys.exit(0 if ok else 1)
