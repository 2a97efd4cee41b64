#!/usr/bin/env bash
# A walk through the HTTP API with curl. Start the server first:  minivllm serve
set -euo pipefail
URL=${URL:-http://127.0.0.1:8000}

echo "# health and the model list"
curl -s "$URL/health"; echo
curl -s "$URL/v1/models"; echo

echo "# a chat completion"
curl -s "$URL/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "messages": [{"role": "user", "content": "What is the capital of France?"}],
  "max_tokens": 32, "temperature": 0}'; echo

echo "# the same, streamed: one SSE chunk per token (-N: print as it arrives)"
curl -sN "$URL/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "messages": [{"role": "user", "content": "Count from one to five."}],
  "max_tokens": 32, "temperature": 0, "stream": true,
  "stream_options": {"include_usage": true}}'

echo "# a completion with logprobs, n=2 seeded samples and vLLM extras (top_k, min_p)"
curl -s "$URL/v1/completions" -H 'Content-Type: application/json' -d '{
  "prompt": "Once upon a time", "max_tokens": 16, "n": 2, "seed": 7,
  "temperature": 0.8, "top_k": 40, "min_p": 0.05, "logprobs": 2}'; echo

echo "# tokenizer endpoints"
curl -s "$URL/tokenize" -H 'Content-Type: application/json' -d '{"prompt": "Hello world"}'; echo
curl -s "$URL/detokenize" -H 'Content-Type: application/json' -d '{"tokens": [19556, 905]}'; echo

echo "# errors come in OpenAI's shape"
curl -s "$URL/v1/completions" -H 'Content-Type: application/json' -d '{"prompt": "hi", "top_p": 2}'; echo

echo "# Prometheus metrics (first lines)"
# awk, not head: head would close the pipe early, and pipefail would fail the script on it
curl -s "$URL/metrics" | awk '/^minivllm:/ && n++ < 12'
