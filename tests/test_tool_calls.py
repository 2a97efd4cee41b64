"""Tool calling (server/tool_calls.py): the hermes parser and the streamed splitter on their
own, then through a real `minivllm serve` of the embedded model with the shipped tools
template and the real `openai` client: "required" and a named function enforced by a grammar
(arguments validate against the schema, sampled at temperature 1), a streamed call assembling
to the same, a two-turn conversation with a tool result, "auto" parsed, and the 400s.
(50 sampled calls per choice: bench/tool_calls.py.)"""
from __future__ import annotations

import json
import os

import pytest

from minivllm.server.tool_calls import ToolCalls, parse_hermes

jsonschema = pytest.importorskip("jsonschema", reason="the test extra installs jsonschema")
pytest.importorskip("xgrammar", reason="forced tool choices need xgrammar "
                    "(pip install --no-deps xgrammar==0.2.9 apache-tvm-ffi)")
openai = pytest.importorskip("openai", reason="the test extra installs openai")

TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "examples",
                        "tool_chat_template_smollm2.jinja")
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                           "description": "Current weather in a city"}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                           "parameters": {
                                               "type": "object",
                                               "properties": {"a": {"type": "integer"},
                                                              "b": {"type": "integer"}},
                                               "required": ["a", "b"],
                                               "additionalProperties": False}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_hermes_blocks_become_calls_and_the_rest_stays_content():
    text = ('Let me check.<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
            '</tool_call><tool_call>{not json}</tool_call>')
    content, calls = parse_hermes(text)
    assert content == "Let me check.<tool_call>{not json}</tool_call>"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("add", {"a": 1, "b": 2})]
    assert parse_hermes("no calls here") == ("no calls here", [])


def test_streamed_auto_text_splits_at_any_chunk_boundary():
    """Content streams up to a call's opening tag, even one cut across chunks; a call is sent
    whole once its block closes; what follows streams again."""
    text = 'Hi <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call> done'
    for size in (1, 2, 5, 13, len(text)):
        tools, content, calls = ToolCalls("auto", "hermes"), "", []
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            delta = tools.delta(0, piece, last, text[:sum(map(len, pieces[:k + 1]))])
            content += delta.get("content", "")
            calls += delta.get("tool_calls", [])
        assert content == "Hi  done", size
        assert [c["function"]["name"] for c in calls] == ["add"] and calls[0]["index"] == 0
        assert tools.called(0)


@pytest.fixture(scope="module")
def served():
    from bench.server_proc import ServeProcess

    srv = ServeProcess(["--dtype", "float32", "--num-blocks", "512", "--chat-template", TEMPLATE,
                        "--tool-call-parser", "hermes"])
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def oai(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_calls_validate_against_their_schema(oai, choice):
    """Sampled at temperature 1, every call parses and its arguments validate."""
    tool_choice = "required" if choice == "required" else \
        {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(4):
        resp = oai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                           tool_choice=tool_choice, temperature=1.0, seed=seed,
                                           max_tokens=160)
        choice_ = resp.choices[0]
        assert choice_.finish_reason == "tool_calls", choice_
        calls = _calls(choice_.message)
        assert calls and choice_.message.content is None
        for name, arguments in calls:
            jsonschema.validate(arguments, SCHEMAS[name])
        if choice == "named":
            assert [n for n, _ in calls] == ["get_weather"]


def test_a_streamed_call_assembles_to_the_same(oai):
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = oai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named,
                                        temperature=0, max_tokens=160)
    parts, finish = {}, None
    for chunk in oai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                             tool_choice=named, temperature=0, max_tokens=160,
                                             stream=True):
        for call in chunk.choices[0].delta.tool_calls or []:
            entry = parts.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(p["name"], json.loads(p["arguments"])) for p in parts.values()] == \
        _calls(whole.choices[0].message)


def test_two_turns_with_a_tool_result_complete(oai):
    first = oai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                        tool_choice="required", temperature=0, max_tokens=160)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    second = oai.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                         tool_choice="none", temperature=0, max_tokens=24)
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    auto = oai.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                       tool_choice="auto", temperature=0, max_tokens=48)
    message = auto.choices[0].message  # parsed: calls that parse, or content
    assert message.content or message.tool_calls
    for name, arguments in _calls(message) if message.tool_calls else []:
        assert name in SCHEMAS and isinstance(arguments, dict)


def test_bad_tool_requests_are_a_400_naming_the_problem(oai, served):
    bad = [({"tool_choice": {"type": "function", "function": {"name": "fly"}}}, "fly"),
           ({"tools": [{"type": "function"}]}, "tools[0]"),
           ({"tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format")]
    for extra, named in bad:
        body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 4, **extra}
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(**body)
        assert named in str(err.value), (extra, err.value)


def test_a_template_without_tools_is_a_400_naming_it(embedded_gguf):
    """The model's own template never reads `tools`: a request with tools is refused, naming
    the template; with tool_choice "none" the tools are not shown and the request goes on."""
    from minivllm.sampling_params import SamplingParams
    from minivllm.server.protocol import APIError, ChatCompletionRequest
    from minivllm.server.tool_calls import plan
    from minivllm.tokenizer import Tokenizer

    own = Tokenizer.from_gguf(embedded_gguf)
    req = ChatCompletionRequest(messages=ASK, tools=TOOLS)
    with pytest.raises(APIError) as err:
        plan(req, SamplingParams(), own, "the model's chat template", "hermes")
    assert "the model's chat template cannot show tools" in str(err.value)
    none = ChatCompletionRequest(messages=ASK, tools=TOOLS, tool_choice="none")
    assert plan(none, SamplingParams(), own, "the model's chat template", None)[:2] == \
        (None, None)
