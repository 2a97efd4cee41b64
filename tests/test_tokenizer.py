"""The tokenizer against transformers: the embedded GGUF's tokenizer, chat templates, HF
directories, and the errors bad conversations give."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer as Backend, pre_tokenizers

from minivllm.loader.gguf_header import read_gguf_header
from minivllm.tokenizer import Tokenizer

STRINGS = [
    "", " ", "  ", "Hello, world!", "  leading spaces", "trailing spaces   ",
    "tabs\tand\nnewlines\n\n", "\r\n\r\n windows", "I'm here, you're there, they'll go; we'd've",
    "ÄÖÜ äöü ß ﬁ", "日本語のテキスト", "emoji 🎉👍🏽 ok", "e\u0301 combining", "\u00a0non-breaking",
    "code: def f(x):\n    return x**2\n", "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>",
    "a<|im_end|>b", "<repo_name>x", "a" * 300,
    "x  1", "1234567890", "3.14159", "Version 2.0.1-beta", "call +1 (555) 123-4567", "  12  34  ",
    "mixed123abc456", "$100.00 and 50%", "2024-01-01T12:00:00Z", "\n1. first\n2. second",
]
# SmolLM2's vocabulary lacks these bytes' tokens, so BPE drops them (transformers too).
_BYTES_NOT_IN_VOCAB = {4, 6, 19, 20, 22, 29, 192, 193, *range(241, 243), *range(245, 256)}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "What is the capital?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}],
    [{"role": "user", "content": "Ünïcödé 🎉\n\nwith  spaces\tand tabs"}],
]


@pytest.fixture(scope="module")
def ours(embedded_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(embedded_gguf)


@pytest.fixture(scope="module")
def hf(embedded_gguf):
    """transformers' tokenizer built from the same GGUF (its own conversion)."""
    from transformers import AutoTokenizer

    directory, name = os.path.split(embedded_gguf)
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.fixture(scope="module")
def hf_fixed(hf) -> Backend:
    """transformers' tokenizer with llama.cpp's `smollm` pre-tokenizer put back: transformers'
    GGUF conversion has no entry for `smollm` and drops its digit split (see the test below)."""
    backend = Backend.from_str(hf.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return backend


# ---------------------------------------------------------------------------------------------
# Encoding and decoding


def test_special_ids(ours, hf):
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    assert ours.vocab_size == len(hf) == 49152
    assert ours.all_special_ids == frozenset(range(17))  # the 17 control tokens
    assert set(hf.all_special_ids) <= ours.all_special_ids


@pytest.mark.parametrize("text", STRINGS)
def test_encode_matches_transformers(ours, hf, hf_fixed, text):
    ids = ours.encode(text)
    assert ids == hf_fixed.encode(text, add_special_tokens=False).ids
    if not any(c.isdigit() for c in text):
        assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.encode(text, add_special_tokens=True) == ids  # the GGUF adds no BOS
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.convert_tokens_to_string(ours.convert_ids_to_tokens(ids)) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
       | st.text(alphabet=" \t\n0123456789aZ.,'-<|>_é", max_size=40))
def test_encode_matches_transformers_on_random_text(ours, hf_fixed, text):
    ids = ours.encode(text)
    assert ids == hf_fixed.encode(text, add_special_tokens=False).ids
    if not set(text.encode()) & _BYTES_NOT_IN_VOCAB:
        assert ours.decode(ids, skip_special_tokens=False) == text


def test_transformers_drops_the_digit_split(ours, hf):
    """The documented discrepancy: llama.cpp's `smollm` split isolates digits before GPT-2's
    regex, so "x  1" is "x", "  ", "1"; transformers' conversion gives "x", " ", " ", "1"."""
    token = ours.backend.token_to_id
    assert ours.encode("x  1") == [token("x"), token("ĠĠ"), token("1")]
    assert hf.encode("x  1", add_special_tokens=False) == [token("x"), token("Ġ"), token("Ġ"),
                                                          token("1")]


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(ours, hf, skip):
    ids = ours.encode("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
    assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_ids_without_a_token_decode_to_nothing(ours):
    assert ours.decode([ours.vocab_size + 5, 28120]) == ours.decode([28120])
    assert ours.convert_ids_to_tokens([ours.vocab_size + 5]) == [""]


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_gguf_pre_tokenizers_match_transformers(embedded_gguf, pre):
    """Other llama.cpp pre-tokenizers, on the embedded vocabulary, against transformers'
    conversion of the same metadata."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (convert_gguf_tokenizer,
                                                                         get_gguf_tokenizer)

    metadata = dict(read_gguf_header(embedded_gguf).metadata, **{"tokenizer.ggml.pre": pre})
    architecture, tokenizer_dict, _ = get_gguf_tokenizer(embedded_gguf)
    reference, _ = convert_gguf_tokenizer(architecture,
                                          dict(tokenizer_dict, pre_tokenizer_type=pre))
    ours = Tokenizer.from_gguf(metadata)
    for text in STRINGS:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids, text


def test_unsupported_gguf_tokenizers(embedded_gguf):
    metadata = read_gguf_header(embedded_gguf).metadata
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'falcon'"):
        Tokenizer.from_gguf(dict(metadata, **{"tokenizer.ggml.pre": "falcon"}))
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'llama'"):
        Tokenizer.from_gguf(dict(metadata, **{"tokenizer.ggml.model": "llama"}))


def test_gguf_add_bos_token(embedded_gguf):
    metadata = dict(read_gguf_header(embedded_gguf).metadata,
                    **{"tokenizer.ggml.add_bos_token": True})
    tokenizer = Tokenizer.from_gguf(metadata)
    assert tokenizer.encode("Hi", add_special_tokens=True) == [1] + tokenizer.encode("Hi")


# ---------------------------------------------------------------------------------------------
# Chat templates


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, hf, messages, add_generation_prompt):
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(messages, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)  # digit-free prompts


def test_chat_template_environment_matches_transformers(ours, hf):
    """Features chat templates use beyond SmolLM2's: tojson without HTML escaping, loop
    controls, bos/eos variables, trim_blocks/lstrip_blocks."""
    template = ("{{ bos_token }}{% for m in messages %}\n  {% if m.role == 'skip' %}{% continue %}"
                "{% endif %}\n  {{ m | tojson }}{{ eos_token }}\n{% endfor %}")
    messages = [{"role": "user", "content": "<b>&'\"é</b>"}, {"role": "skip", "content": "x"}]
    mine = Tokenizer(ours.backend, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
                     template)
    assert mine.apply_chat_template(messages) == hf.apply_chat_template(
        messages, chat_template=template, tokenize=False)


@pytest.mark.parametrize("messages,message", [
    ("hello", "messages must be a non-empty list"),
    ([], "messages must be a non-empty list"),
    (["hello"], r"messages\[0\] must be a dict with 'role' and 'content', got str"),
    ([{"content": "hi"}], r"messages\[0\]\['role'\] must be a string, got NoneType"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}],
     r"messages\[1\]\['content'\] must be a string, got int"),
])
def test_malformed_messages(ours, messages, message):
    with pytest.raises(ValueError, match=message):
        ours.apply_chat_template(messages)


def test_template_errors(ours):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="model has no chat template"):
        Tokenizer(ours.backend, {}, None).apply_chat_template(messages)
    strict = Tokenizer(ours.backend, {}, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="chat template: roles must alternate"):
        strict.apply_chat_template(messages)
    with pytest.raises(ValueError, match="chat template does not parse"):
        Tokenizer(ours.backend, {}, "{% for %}").apply_chat_template(messages)


# ---------------------------------------------------------------------------------------------
# Hugging Face directories


def test_hf_dir_matches_transformers(ours, tmp_path):
    """A Llama-3-style tokenizer.json whose post-processor adds BOS, saved by transformers."""
    from tokenizers import processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    backend = Backend.from_str(ours.backend.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                            eos_token="<|im_end|>", chat_template=ours.chat_template
                            ).save_pretrained(tmp_path)
    mine, theirs = Tokenizer.from_hf_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert (mine.bos_token_id, mine.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)
    for text in STRINGS:
        assert mine.encode(text, add_special_tokens=True) == theirs.encode(text), text
        assert mine.encode(text) == theirs.encode(text, add_special_tokens=False), text
    for messages in CONVERSATIONS:
        assert mine.apply_chat_template(messages) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_hf_dir_legacy_tokenizer_config(ours, tmp_path):
    """Older tokenizer_config.json: special tokens as AddedToken dicts, named chat templates."""
    ours.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "<|im_end|>", "special": True},
        "bos_token": None,
        "chat_template": [{"name": "tool_use", "template": "tools"},
                          {"name": "default", "template": "{{ messages[0].content }}"}]}))
    tokenizer = Tokenizer.from_hf_dir(tmp_path)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (None, 2)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"


def test_hf_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


# ---------------------------------------------------------------------------------------------
# The module's imports


def test_tokenizer_module_does_not_import_torch(embedded_gguf):
    """API-server processes use it; load the module by file so only its own imports count."""
    path = os.path.join(os.path.dirname(__file__), "..", "minivllm", "tokenizer.py")
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('tok', {path!r})\n"
            "module = sys.modules['tok'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            f"module.Tokenizer.from_gguf({embedded_gguf!r}).encode('hi')\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
