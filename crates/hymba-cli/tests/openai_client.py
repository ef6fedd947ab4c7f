"""The official `openai` client against `hymba serve` (run by tests/server.rs)."""
import json
import sys
import urllib.request

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="k")

models = client.models.list()
model = models.data[0].id

c = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=5, temperature=0)
assert c.choices[0].finish_reason in ("length", "stop"), c
assert c.usage.completion_tokens >= 1, c

text = ""
for chunk in client.completions.create(model=model, prompt="The quick brown fox", max_tokens=5, temperature=0, stream=True):
    text += chunk.choices[0].text
assert text == c.choices[0].text, (text, c.choices[0].text)

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0
)
assert chat.choices[0].message.role == "assistant", chat

lp = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
)
assert len(lp.choices[0].logprobs.content) == 3, lp
assert all(len(c.top_logprobs) == 2 for c in lp.choices[0].logprobs.content), lp

streamed = ""
for chunk in client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0, stream=True
):
    if chunk.choices and chunk.choices[0].delta.content:
        streamed += chunk.choices[0].delta.content
assert streamed == chat.choices[0].message.content, (streamed, chat.choices[0].message.content)

# OpenAI's penalties and biases pass through the client; the usage chunk ends a stream.
p = client.completions.create(
    model=model, prompt="The quick brown fox", max_tokens=5, temperature=0, frequency_penalty=1.0, presence_penalty=0.5
)
assert p.usage.completion_tokens == 5 or p.choices[0].finish_reason == "stop", p
root = sys.argv[1].rsplit("/v1", 1)[0]
req = urllib.request.Request(root + "/tokenize", data=json.dumps({"prompt": "Hello world"}).encode(), headers={"Content-Type": "application/json", "Authorization": "Bearer k"})
world = json.load(urllib.request.urlopen(req))["tokens"][-1]
b = client.completions.create(model=model, prompt="The", max_tokens=2, temperature=0, logit_bias={str(world): 100})
assert b.choices[0].text == " world world", b
chunks = list(client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=3, temperature=0, stream=True,
    stream_options={"include_usage": True},
))
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1, chunks[-1]

try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    raise SystemExit("expected a 404")
except openai.NotFoundError:
    pass

print("openai client: ok")
