"""The official `openai` client against `hymba serve` (run by tests/server.rs)."""
import sys

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

try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    raise SystemExit("expected a 404")
except openai.NotFoundError:
    pass

print("openai client: ok")
