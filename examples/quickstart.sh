#!/usr/bin/env bash
# README's first command, after the install: start `minivllm serve` in the background with its
# log in a file, wait for /health (up to $WAIT seconds; on failure print the log's tail), ask
# one chat question at temperature 0 (the same answer every run), print the answer, stop the
# server (it drains and exits). To run the server in the foreground instead: `minivllm serve`.
set -euo pipefail
PORT=${PORT:-8000}
WAIT=${WAIT:-300}
LOG=${LOG:-${TMPDIR:-/tmp}/minivllm-serve.log}
URL=http://127.0.0.1:$PORT

minivllm serve --port "$PORT" >"$LOG" 2>&1 &
SERVER=$!
# However this script ends, the server stops with it (SIGINT: drain, then exit).
trap 'kill -INT $SERVER 2>/dev/null && wait $SERVER || true' EXIT

echo "minivllm serve (pid $SERVER) is starting; its log: $LOG"
for ((waited = 0; ; waited++)); do
    if curl -sf "$URL/health" >/dev/null; then
        break
    fi
    if ! kill -0 "$SERVER" 2>/dev/null || ((waited >= WAIT)); then
        echo "the server did not come up within ${waited} s; the end of $LOG:" >&2
        tail -n 20 "$LOG" >&2
        exit 1
    fi
    sleep 1
done

curl -sS --fail-with-body "$URL/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "messages": [{"role": "user", "content": "What is the capital of France?"}],
  "max_tokens": 32, "temperature": 0}'
echo
