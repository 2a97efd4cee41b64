"""Tool calling in chat completions: what a request's `tools` and `tool_choice` ask of the
engine, and the model's text turned back into OpenAI `tool_calls`, whole or streamed.

- `"none"` (or no tools): plain chat; the tools are not shown to the model.
- `"auto"`: the tools are rendered into the prompt by the chat template and the model writes
  what it likes; a tool-call parser (`--tool-call-parser hermes`: `<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>` blocks) takes the calls out of the text; text that does not
  parse stays content.
- `"required"` and a named function: the output is constrained by a JSON-schema grammar (the
  structured-outputs path), so it always parses and the arguments always validate: a named
  function's output is its arguments object; "required"'s is an array of one to (with
  parallel_tool_calls) as many `{"name", "arguments"}` calls as there are tools, one schema
  branch per tool (as vLLM constrains them).
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from minivllm.sampling_params import SamplingParams, StructuredOutputsParams
from minivllm.server.protocol import APIError, ChatCompletionRequest
from minivllm.tokenizer import Tokenizer

PARSERS = ("hermes",)
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


def plan(req: ChatCompletionRequest, params: SamplingParams, tokenizer: Tokenizer,
         template_name: str, parser: Optional[str]
         ) -> tuple[Optional[list[dict]], Optional["ToolCalls"], SamplingParams]:
    """What a chat request's tools ask: (the tools to render into the prompt, the response's
    tool mode, the sampling params with the grammar a forced choice needs)."""
    functions = check_tools(req.tools or [])
    choice = resolve_choice(req.tool_choice, functions)
    if choice == "none":
        return None, None, params
    if not tokenizer.renders_tools:
        raise APIError(400, f"{template_name} cannot show tools to the model (it never reads "
                            "`tools`); start the server with --chat-template FILE, e.g. "
                            "examples/tool_chat_template_smollm2.jinja", param="tools")
    if choice == "auto" and parser is None:
        raise APIError(400, "tool_choice \"auto\" needs a tool-call parser: start the server "
                            "with --tool-call-parser hermes (or ask for \"required\" or a "
                            "named function, enforced by a grammar)", param="tool_choice")
    forced = forced_output(choice, functions, req.parallel_tool_calls is not False)
    if forced is not None:
        if params.structured_outputs is not None:
            raise APIError(400, f"tool_choice {choice!r} is enforced by its own grammar: leave "
                                "out response_format and structured outputs",
                           param="tool_choice")
        params = dataclasses.replace(params, structured_outputs=forced)
    return req.tools, ToolCalls(choice, parser), params


def check_tools(tools: list[dict]) -> dict[str, dict]:
    """Each function tool's parameters schema by name; a malformed `tools` is a 400."""
    functions: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or \
                not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                                "{\"name\": ..., \"parameters\": {...}}}", param="tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                           param="tools")
        if fn["name"] in functions:
            raise APIError(400, f"tools name {fn['name']!r} twice", param="tools")
        functions[fn["name"]] = params
    return functions


def resolve_choice(tool_choice: Union[None, str, dict], functions: dict[str, dict]) -> str:
    """"none" | "auto" | "required" | the named function's name; a choice naming no listed
    tool, or any other value, is a 400."""
    if tool_choice is None:
        return "auto" if functions else "none"
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not functions:
            raise APIError(400, "tool_choice \"required\" needs tools", param="tool_choice")
        return tool_choice
    name = (tool_choice.get("function") or {}).get("name") \
        if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise APIError(400, "tool_choice must be \"none\", \"auto\", \"required\" or "
                            "{\"type\": \"function\", \"function\": {\"name\": ...}}",
                       param="tool_choice")
    if name not in functions:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools "
                            f"({', '.join(functions) or 'none'})", param="tool_choice")
    return name


def forced_output(choice: str, functions: dict[str, dict],
                  parallel: bool = True) -> Optional[StructuredOutputsParams]:
    """The grammar that enforces a "required" or named choice (None for "none"/"auto"):
    "required" makes one call, or with `parallel` (OpenAI's parallel_tool_calls) up to one per
    tool, so that a model cannot call on until its length runs out."""
    if choice in ("none", "auto"):
        return None
    if choice != "required":
        return StructuredOutputsParams(json=functions[choice])
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, params in functions.items()]
    return StructuredOutputsParams(json={"type": "array", "minItems": 1,
                                         "maxItems": len(calls) if parallel else 1,
                                         "items": calls[0] if len(calls) == 1 else
                                         {"anyOf": calls}})


def _call(name: str, arguments: Any) -> dict:
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def parse_hermes(text: str) -> tuple[str, list[dict]]:
    """(content, calls) of a model's text: each `<tool_call>` block holding a JSON object with
    a string "name" is a call; everything else, unparsable blocks included, stays content."""
    content, calls, at = [], [], 0
    while (start := text.find(_OPEN, at)) != -1:
        end = text.find(_CLOSE, start)
        if end == -1:
            break
        try:
            obj = json.loads(text[start + len(_OPEN):end])
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            content.append(text[at:start])
            calls.append(_call(obj["name"], obj.get("arguments", {})))
        else:
            content.append(text[at:end + len(_CLOSE)])
        at = end + len(_CLOSE)
    content.append(text[at:])
    return "".join(content).strip() if calls else "".join(content), calls


@dataclass
class ToolCalls:
    """One chat request's tool mode: turns each sequence's text into (content, tool_calls)
    for the whole body, and its deltas into streamed content and tool-call deltas."""

    choice: str  # "auto" (parsed with parser) | "required" | a function name
    parser: Optional[str] = None
    _sent: dict[int, int] = field(default_factory=dict)  # auto: text streamed, per sequence
    _held: dict[int, str] = field(default_factory=dict)  # its text not yet streamed

    def message(self, text: str) -> tuple[Optional[str], list[dict]]:
        """A finished sequence's content and calls."""
        if self.choice == "auto":
            content, calls = parse_hermes(text)
            return (content or None) if calls else content, calls
        try:
            value = json.loads(text)
        except ValueError:  # cut by max_tokens mid-JSON: what there is stays content
            return text, []
        if self.choice == "required":
            return None, [_call(c["name"], c["arguments"]) for c in value]
        return None, [_call(self.choice, value)]

    def called(self, index: int) -> bool:
        """Whether sequence `index` has streamed a tool call."""
        return self._sent.get(index, 0) > 0

    def delta(self, index: int, delta_text: str, finished: bool, text: str) -> dict:
        """The streamed delta of sequence `index` given its new text (and, when finished, its
        whole text): content as it comes, tool calls once each is complete."""
        if self.choice != "auto":
            if not finished:
                return {}
            content, calls = self.message(text)
            self._sent[index] = len(calls)
            return _tool_delta(calls) if calls else {"content": content}
        held = self._held.get(index, "") + delta_text
        if finished:
            content, calls = parse_hermes(held)
            self._held[index] = ""
            out = _tool_delta(calls, self._sent.get(index, 0)) if calls else {}
            self._sent[index] = self._sent.get(index, 0) + len(calls)
            if content:
                out["content"] = content
            return out
        # Stream content up to a call's opening tag (or what may be the start of one).
        cut = held.find(_OPEN)
        if cut == -1:
            cut = len(held)
            for k in range(min(len(_OPEN) - 1, len(held)), 0, -1):
                if _OPEN.startswith(held[-k:]):
                    cut = len(held) - k
                    break
        out: dict = {}
        if cut and _CLOSE not in held[:cut]:
            out["content"] = held[:cut]
            held = held[cut:]
        if _CLOSE in held:  # a whole block: parse it now, keep what follows
            end = held.index(_CLOSE) + len(_CLOSE)
            content, calls = parse_hermes(held[:end])
            held = held[end:]
            if calls:
                out.update(_tool_delta(calls, self._sent.get(index, 0)))
                self._sent[index] = self._sent.get(index, 0) + len(calls)
            elif content:
                out["content"] = out.get("content", "") + content
        self._held[index] = held
        return out


def _tool_delta(calls: list[dict], first: int = 0) -> dict:
    return {"tool_calls": [dict(call, index=first + i) for i, call in enumerate(calls)]}
