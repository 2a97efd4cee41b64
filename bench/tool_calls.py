"""Tool calls that validate: 50 sampled requests per forced choice through `minivllm serve`.

    python -m bench.tool_calls --json bench/results/tool_calls_cpu.json

The embedded model with the shipped tools template (examples/tool_chat_template_smollm2.jinja)
and the real `openai` client, temperature 1, a seed per request: tool_choice="required" and a
named function (both enforced by a grammar) must return tool_calls whose arguments validate
against the tool's JSON schema every time; a streamed call (greedy) must assemble to the
non-streamed one; examples/agent_loop.py must run to an answer.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jsonschema
import openai

from bench import records
from bench.server_proc import ServeProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(ROOT, "examples", "tool_chat_template_smollm2.jinja")
sys.path.insert(0, os.path.join(ROOT, "examples"))
from agent_loop import TOOLS  # noqa: E402  (the example's tools: one definition)

SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTIONS = ["What is the weather in Paris?", "Add 17 and 25.", "Is it cold in Oslo today?",
             "What's 3 plus 4?", "Weather in Tokyo, in fahrenheit please."]


def sampled(client, model: str, tool_choice, n: int) -> dict:
    """n requests at temperature 1: how many returned calls, how many validated."""
    counts = {"requests": n, "with_tool_calls": 0, "all_arguments_valid": 0, "finish": {}}
    for seed in range(n):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTIONS[seed % 5]}],
            tools=TOOLS, tool_choice=tool_choice, temperature=1.0, seed=seed, max_tokens=200)
        choice = reply.choices[0]
        counts["finish"][choice.finish_reason] = counts["finish"].get(choice.finish_reason,
                                                                      0) + 1
        calls = choice.message.tool_calls or []
        counts["with_tool_calls"] += bool(calls)
        try:
            for call in calls:
                jsonschema.validate(json.loads(call.function.arguments),
                                    SCHEMAS[call.function.name])
            counts["all_arguments_valid"] += bool(calls)
        except (ValueError, KeyError, jsonschema.ValidationError) as exc:
            counts.setdefault("invalid_examples", []).append(f"{calls}: {exc}"[:300])
    return counts


def streamed_matches(client, model: str) -> bool:
    named = {"type": "function", "function": {"name": "get_weather"}}
    kwargs = dict(model=model, messages=[{"role": "user", "content": QUESTIONS[0]}],
                  tools=TOOLS, tool_choice=named, temperature=0, max_tokens=200)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    parts: dict = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for call in chunk.choices[0].delta.tool_calls or []:
            entry = parts.setdefault(call.index, ["", ""])
            entry[0] += call.function.name or ""
            entry[1] += call.function.arguments or ""
    return [(n, json.loads(a)) for n, a in parts.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    srv = ServeProcess(["--dtype", "float32", "--chat-template", TEMPLATE,
                        "--tool-call-parser", "hermes"])
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        recs = []
        for name, choice in [("required", "required"),
                             ("named get_weather",
                              {"type": "function", "function": {"name": "get_weather"}})]:
            t0 = time.monotonic()
            counts = sampled(client, model, choice, args.requests)
            recs.append(records.record(
                f"tool_choice {name}: requests whose tool_calls all validate (temperature 1)",
                counts["all_arguments_valid"], "requests", seconds=time.monotonic() - t0,
                **counts))
        recs.append(records.record("a streamed named call assembles to the non-streamed one",
                                   float(streamed_matches(client, model)), "bool"))
        agent = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "agent_loop.py"),
                                "--url", srv.url + "/v1"], capture_output=True, text=True,
                               timeout=600)
        recs.append(records.record("examples/agent_loop.py exit code", agent.returncode, "rc",
                                   stdout=agent.stdout[-2000:], stderr=agent.stderr[-2000:]))
    finally:
        srv.stop()
    records.write(args.json, recs)


if __name__ == "__main__":
    main()
