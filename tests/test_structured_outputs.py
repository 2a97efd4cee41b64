"""Structured outputs (xgrammar): every door, the engine's grammar state, the oracle.

One offline engine and one `minivllm serve` for the module; small max_tokens. The oracle is
transformers with the same weights, masked by xgrammar's own logits processor built from the
Hugging Face tokenizer: greedy tokens must match."""
from __future__ import annotations

import itertools
import json
import os
import re

import jsonschema
import numpy as np
import pytest

from minivllm import LLM, SamplingParams, StructuredOutputsParams

xgrammar = pytest.importorskip("xgrammar", reason="structured outputs need xgrammar (pip "
                               "install --no-deps xgrammar==0.2.9 apache-tvm-ffi)")

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]},
                                  "maxItems": 2}},
          "required": ["name", "age", "pets"]}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def greedy(max_tokens: int = 48, **spec) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**spec))


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_num_seqs=8)


@pytest.mark.parametrize("spec, fragment", [
    ({}, "exactly one of"),
    ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
    ({"json": "{not json"}, "json is not valid JSON"),
    ({"json": [1]}, "JSON schema object"),
    ({"choice": []}, "choice must be a non-empty list"),
    ({"grammar": ""}, "grammar must be a non-empty string"),
])
def test_bad_spec_shapes_are_refused_on_entry(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        StructuredOutputsParams(**spec)


def test_each_kind_holds_its_output(llm):
    """json schema, regex, choice, EBNF grammar, json_object: finished outputs conform."""
    cases = [({"json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON)),
             ({"regex": r"[0-9]{3}-[0-9]{4}"},
              lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t) or pytest.fail(t)),
             ({"choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")
              or pytest.fail(t)),
             ({"grammar": 'root ::= "(" [a-z]+ ("," [a-z]+)? ")"'},
              lambda t: re.fullmatch(r"\([a-z]+(,[a-z]+)?\)", t) or pytest.fail(t)),
             ({"json_object": True}, lambda t: isinstance(json.loads(t), dict)
              or pytest.fail(t))]
    outs = llm.chat([ASK] * len(cases), [greedy(**spec) for spec, _ in cases], use_tqdm=False)
    for (spec, check), out in zip(cases, outs):
        completion = out.outputs[0]
        if completion.finish_reason == "stop" or not {"json", "json_object"} & spec.keys():
            assert completion.finish_reason == "stop", (spec, completion.text)  # short ones
            check(completion.text)
    assert not llm.engine.grammars.matchers and not llm.engine.grammars.waiting


def test_sampled_rows_are_masked_whole(llm):
    """Sampling draws from every token the mask leaves, so a row's whole mask must hold:
    sampled outputs match the regex."""
    pattern = r"[0-9]{3}-[0-9]{4}"
    params = [SamplingParams(temperature=1.5, seed=seed, max_tokens=16,
                             structured_outputs=StructuredOutputsParams(regex=pattern))
              for seed in range(8)]
    outs = llm.chat([ASK] * len(params), params, use_tqdm=False)
    for out in outs:
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        assert re.fullmatch(pattern, completion.text), completion.text
    assert len({out.outputs[0].text for out in outs}) > 1  # sampled, not all the argmax


def test_greedy_matches_transformers_under_the_same_grammar(llm):
    """The oracle: transformers, same weights, xgrammar's own HF logits processor over a
    tokenizer info built from the Hugging Face tokenizer (not ours): the same greedy tokens."""
    import torch
    import transformers
    from xgrammar.contrib.hf import LogitsProcessor

    from minivllm.loader.embedded import embedded_gguf_path
    path = embedded_gguf_path()
    kwargs = dict(gguf_file=os.path.basename(path))
    hf_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), dtype=torch.float32, **kwargs).eval()
    info = xgrammar.TokenizerInfo.from_huggingface(hf_tok, vocab_size=49152, stop_token_ids=[2])
    compiler = xgrammar.GrammarCompiler(info)
    tok = llm.get_tokenizer()
    prompt = tok.encode(tok.apply_chat_template(ASK))
    for spec, compiled in [({"json": PERSON}, compiler.compile_json_schema(
                                json.dumps(PERSON), any_whitespace=False)),
                           ({"regex": r"(Paris|Lyon) is in [A-Z][a-z]+\."},
                            compiler.compile_regex(r"(Paris|Lyon) is in [A-Z][a-z]+\."))]:
        got = llm.generate([prompt], greedy(32, **spec), use_tqdm=False)[0].outputs[0].token_ids
        with torch.no_grad():
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=2, pad_token_id=2,
                                 logits_processor=[LogitsProcessor(compiled)])
        assert got == ids[0, len(prompt):].tolist(), spec


def test_a_grammar_that_does_not_compile_fails_only_its_request(llm):
    """The compile error names the problem; the request beside it finishes; nothing is left
    waiting, and the engine goes on."""
    engine = llm.engine
    good = engine.add_request(10_001, [1, 2, 3], greedy(8, choice=["a", "b"]))
    engine.add_request(10_002, [1, 2, 3], greedy(8, regex="a["))
    engine.add_request(10_003, [1, 2, 3], greedy(8, grammar='root ::= "x" | '))
    failed, finished = {}, set()
    while engine.has_unfinished():
        out = engine.step()
        failed.update(engine.take_failed())
        finished.update(out.owners[out.finish != 0].tolist())
    assert finished == {good.owner}
    assert "regex does not compile" in failed[10_002] and "Unclosed '['" in failed[10_002]
    assert "grammar does not compile" in failed[10_003] and "line 1" in failed[10_003]
    with pytest.raises(ValueError, match="regex does not compile"):
        llm.generate("hi", greedy(regex="(a"), use_tqdm=False)
    assert not engine.grammars.waiting and not engine.grammars.matchers


def test_unconstrained_rows_beside_constrained_ones_are_unchanged(llm):
    """A mixed batch masks only the constrained rows: the others give the tokens they give
    alone; a batch without constraints builds no masks at all."""
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["The capital of France is"], plain, use_tqdm=False)
    mixed = llm.generate(["The capital of France is"] * 2,
                         [plain, greedy(12, regex="[A-Z]{12}")], use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert re.fullmatch("[A-Z]{12}", mixed[1].outputs[0].text)


def test_async_scheduling_and_preemption_give_the_same_constrained_outputs(llm):
    """Under async scheduling (a token computed after a stop is discarded before any matcher
    sees it) and a KV budget that preempts, constrained outputs equal the synchronous ones."""
    params = [greedy(24, json=PERSON), greedy(24, regex="[a-z ]+"), greedy(24, choice=["no"]),
              greedy(20, json_object=True)] * 2
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Describe person {i} as "
                                                                    "JSON."}])
               for i in range(len(params))]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    other = LLM(dtype="float32", max_num_seqs=8, async_scheduling=True, block_size=4,
                num_blocks=44)  # prompts of 10 blocks: four fit, and they preempt as they grow
    other.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)
    assert other.engine.grammars.masks(np.arange(8)) is None  # no grammar: no masks
    got = [o.outputs[0].token_ids for o in other.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert other.engine.scheduler.num_preemptions > 0
    assert not other.engine.grammars.matchers and other.engine.allocator.num_used_blocks == 0
    # An abort between calls, while a masked step waits to be sampled: the others go on.
    engine, tokens = other.engine, {}
    for i in range(4):
        engine.add_request(500 + i, tok.encode(prompts[i]), params[i])
    for calls in itertools.count():
        out = engine.step()
        for owner, token in zip(out.owners.tolist(), out.token_ids.tolist()):
            tokens.setdefault(owner, []).append(token)
        if calls == 5:
            assert engine.abort_request(501)
        if not engine.has_unfinished():
            break
    assert [tokens[500], tokens[502], tokens[503]] == [want[0], want[2], want[3]]
    assert len(tokens[501]) < len(want[1])
    assert not engine.grammars.matchers and engine.allocator.num_used_blocks == 0


# ---- the OpenAI server and the ZeroMQ endpoint of one `minivllm serve` ----------------------
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from bench.server_proc import ServeProcess

    zmq_endpoint = f"ipc://{tmp_path_factory.mktemp('zmq')}/engine"
    srv = ServeProcess(["--dtype", "float32", "--num-blocks", "512",
                        "--zmq-endpoint", zmq_endpoint])
    srv.zmq_endpoint = zmq_endpoint
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def oai(served):
    openai = pytest.importorskip("openai", reason="the test extra installs openai")
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)


def test_openai_parse_returns_the_pydantic_object(oai):
    """The openai package's own helper: response_format=<pydantic model> (a strict
    json_schema) comes back parsed."""
    from typing import Literal

    from pydantic import BaseModel

    class Pet(BaseModel):
        name: str
        kind: Literal["cat", "dog", "fish"]
        age: int

    completion = oai.chat.completions.parse(
        model=MODEL, response_format=Pet, max_tokens=48, temperature=0,
        messages=[{"role": "user", "content": "Describe a pet as JSON."}])
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Pet)


def test_every_door_constrains_the_output(oai):
    """response_format json_object, vLLM's structured_outputs and its older guided_* fields,
    on chat and completions, streamed too."""
    ask = [{"role": "user", "content": "Answer briefly."}]
    doors = [({"response_format": {"type": "json_object"}},
              lambda t: isinstance(json.loads(t), dict)),
             ({"extra_body": {"structured_outputs": {"regex": "[0-9]{4}"}}},
              lambda t: re.fullmatch("[0-9]{4}", t)),
             ({"extra_body": {"structured_outputs": {"choice": ["left", "right"]}}},
              lambda t: t in ("left", "right")),
             ({"extra_body": {"structured_outputs": {"grammar": 'root ::= "ab" [c-e]'}}},
              lambda t: re.fullmatch("ab[c-e]", t)),
             ({"extra_body": {"guided_json": PERSON}},
              lambda t: jsonschema.validate(json.loads(t), PERSON) or True),
             ({"extra_body": {"guided_regex": "[A-Z]{3}"}}, lambda t: re.fullmatch("[A-Z]{3}", t)),
             ({"extra_body": {"guided_choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
             ({"extra_body": {"guided_grammar": 'root ::= "x" | "y"'}}, lambda t: t in "xy")]
    for kwargs, check in doors:
        out = oai.chat.completions.create(model=MODEL, messages=ask, max_tokens=64,
                                          temperature=0, **kwargs).choices[0]
        assert out.finish_reason == "stop" and check(out.message.content), (kwargs, out)
    text = oai.completions.create(model=MODEL, prompt="Pick one:", max_tokens=8,
                                  extra_body={"guided_choice": ["red", "blue"]}).choices[0].text
    assert text in ("red", "blue")
    stream = oai.chat.completions.create(model=MODEL, messages=ask, max_tokens=8, stream=True,
                                         extra_body={"guided_regex": "(yes|no)!"})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) in \
        ("yes!", "no!")
    import httpx
    gauge = re.search(r'^minivllm:num_requests_waiting_for_grammar\{engine="0"\} (\S+)$',
                      httpx.get(str(oai.base_url.join("/metrics"))).text, re.M)
    assert gauge and float(gauge.group(1)) == 0  # the state has a gauge; nothing waits now


@pytest.mark.parametrize("body, fragment", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "blah"}}}},
     'Unsupported type "blah"'),
    ({"guided_json": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}},
     "#/uniqueItems is not supported"),
    ({"guided_regex": "a["}, "regex does not compile: Regex parsing error"),
    ({"structured_outputs": {"grammar": 'root ::= "a" |'}}, "grammar does not compile: EBNF"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one of"),
])
def test_bad_specs_are_a_400_naming_the_problem(served, body, fragment):
    """Streamed or not (a constrained stream starts once its grammar has compiled)."""
    import httpx

    for stream in (False, True):
        resp = httpx.post(served.url + "/v1/chat/completions", timeout=120, json={
            "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
            "stream": stream, **body})
        assert resp.status_code == 400, resp.text
        assert fragment in resp.json()["error"]["message"]


def test_c_client_sends_a_structured_part(served, llm, tmp_path):
    """The C client's submit carries the spec (protocol version 2): its tokens spell a choice;
    a grammar that does not compile comes back as an error record naming the request."""
    import subprocess

    from test_c_client_codec import _compiler_missing, _make

    if _compiler_missing():
        pytest.skip(reason=_compiler_missing())
    binary = _make(tmp_path)
    tok = llm.get_tokenizer()
    prompt = [str(t) for t in tok.encode("Pick a colour:")]
    out = subprocess.run([str(binary), "--endpoint", served.zmq_endpoint, "--max-tokens", "8",
                          "--temperature", "0", "--choice", '["crimson", "teal"]', "--",
                          *prompt], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    tokens = [int(line.split()[1]) for line in out.stdout.splitlines()
              if line.startswith("token ")]
    assert tok.decode(tokens) in ("crimson", "teal")
    assert "finish stop" in out.stdout
    bad = subprocess.run([str(binary), "--endpoint", served.zmq_endpoint, "--regex", "a[",
                          "--", *prompt], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "regex does not compile" in bad.stderr, bad.stderr

