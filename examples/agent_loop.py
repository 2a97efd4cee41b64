"""A tool-using agent loop with the `openai` package against minivllm: the model asks for a
tool, this script runs it and sends the result back, until the model answers in words.
Start the server with the tools template first:

    minivllm serve --chat-template examples/tool_chat_template_smollm2.jinja \
        --tool-call-parser hermes
    pip install openai
    python examples/agent_loop.py [--url URL] ["a question"]   # URL: $OPENAI_BASE_URL, else
                                                               # http://127.0.0.1:8000/v1

The first turn forces a call (tool_choice="required": a grammar makes the arguments valid
against the tool's schema); later turns let the model choose ("auto"), within --max-turns.
"""
import argparse
import os
import json

import openai

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "The sum of two integers",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"], "additionalProperties": False}}},
]


def run_tool(name: str, arguments: dict) -> str:
    """The tools themselves (stand-ins: a fixed forecast, real arithmetic)."""
    if name == "get_weather":
        degrees = 18 if arguments["unit"] == "celsius" else 64
        return f"{arguments['city']}: {degrees} degrees {arguments['unit']}, sunny"
    if name == "add":
        return str(arguments["a"] + arguments["b"])
    return f"unknown tool {name}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("question", nargs="?", default="What is the weather in Paris?")
    ap.add_argument("--url", default=os.environ.get("OPENAI_BASE_URL",
                                                  "http://127.0.0.1:8000/v1"))
    ap.add_argument("--api-key", default="unused")
    ap.add_argument("--max-turns", type=int, default=3)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.url, api_key=args.api_key)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": args.question}]
    for turn in range(args.max_turns):
        reply = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, max_tokens=128, temperature=0,
            tool_choice="required" if turn == 0 else "auto")
        message = reply.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls:
            print("answer:", message.content)
            return
        for call in message.tool_calls:
            result = run_tool(call.function.name, json.loads(call.function.arguments))
            print(f"tool {call.function.name}({call.function.arguments}) -> {result}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                           tool_choice="none", max_tokens=64, temperature=0)
    print("answer:", reply.choices[0].message.content)


if __name__ == "__main__":
    main()
