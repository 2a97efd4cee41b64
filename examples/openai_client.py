"""The official `openai` package against minivllm. Start the server first:  minivllm serve

    pip install openai        # not part of minivllm's own install (the test extra has it)
    python examples/openai_client.py [--url URL]   # default: $OPENAI_BASE_URL, else
                                                   # http://127.0.0.1:8000/v1
"""
import argparse
import os

import openai


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=os.environ.get("OPENAI_BASE_URL",
                                                  "http://127.0.0.1:8000/v1"))
    ap.add_argument("--api-key", default="unused")  # needed when serve runs with --api-key
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.url, api_key=args.api_key)
    model = client.models.list().data[0].id

    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32, temperature=0)
    print("chat:", reply.choices[0].message.content)
    print("usage:", reply.usage)

    print("streamed: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write a haiku about the sea."}],
        max_tokens=48, temperature=0.7, seed=1, stream=True)
    for chunk in stream:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()

    comp = client.completions.create(model=model, prompt="The three primary colours are",
                                     max_tokens=16, temperature=0, logprobs=2,
                                     extra_body={"top_k": 20})
    print("completion:", comp.choices[0].text)
    print("first token logprobs:", comp.choices[0].logprobs.top_logprobs[0])


if __name__ == "__main__":
    main()
