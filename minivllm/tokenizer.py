"""Text <-> token ids and chat prompts, for the engine and the API-server processes.

`Tokenizer` wraps a `tokenizers.Tokenizer` built from a Hugging Face `tokenizer.json` or from a GGUF
file's metadata, and renders chat templates with jinja2 the way transformers does.

This module must not import torch or transformers: API-server processes load it.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Mapping, Optional, Sequence, Union

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

# ---------------------------------------------------------------------------------------------
# Building a tokenizer from GGUF metadata

# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) and the text splits they stand for.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_REGEX_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # llama.cpp token types


def _gguf_pre_tokenizer(pre: Optional[str]) -> pre_tokenizers.PreTokenizer:
    if pre in (None, "default", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # every digit on its own, then GPT-2's split (as SmolLM2's tokenizer.json)
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                 use_regex=True)])
    if pre in _REGEX_SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_REGEX_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: default, gpt2, smollm, "
                     f"{', '.join(_REGEX_SPLITS)}")


def _gguf_backend(md: Mapping[str, Any]) -> _Backend:
    kind = md.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}; "
                         f"supported: gpt2 (byte-level BPE)")
    tokens = md["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    pre = md.get("tokenizer.ggml.pre")
    # llama.cpp looks a whole pre-token up in the vocabulary before merging for Llama 3, as does
    # Llama 3's tokenizer.json ("ignore_merges": true).
    backend = _Backend(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                  ignore_merges=pre in ("llama-bpe", "llama3")))
    backend.pre_tokenizer = _gguf_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    types = md.get("tokenizer.ggml.token_type") or []
    # Control tokens (<|im_start|>...) must match whole in text and be skippable when decoding.
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t == _GGUF_CONTROL])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(types) if t == _GGUF_USER_DEFINED])
    backend.post_processor = _gguf_post_processor(md, tokens)
    return backend


def _gguf_post_processor(md: Mapping[str, Any], tokens: Sequence[str]
                         ) -> Optional[processors.PostProcessor]:
    """BOS/EOS around encoded text where the file asks for them (add_special_tokens=True)."""
    def flagged(end: str) -> list[tuple[str, int]]:
        token_id = md.get(f"tokenizer.ggml.{end}_token_id")
        wanted = md.get(f"tokenizer.ggml.add_{end}_token") and token_id is not None
        return [(tokens[token_id], token_id)] if wanted else []

    bos, eos = flagged("bos"), flagged("eos")
    if not bos + eos:
        return None
    template = [t for t, _ in bos] + ["$A"] + [t for t, _ in eos]
    return processors.TemplateProcessing(single=" ".join(template), special_tokens=bos + eos)


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer_config.json


def _token_content(value: Any) -> Optional[str]:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_template(path: str, config: Mapping[str, Any]) -> Optional[str]:
    # transformers >= 4.43 saves the template to its own file; older ones put it in the config,
    # either as a string or as a list of named templates.
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


# ---------------------------------------------------------------------------------------------
# The tokenizer

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# decode holds the GIL, decode_batch releases it but costs ~2 us more a call: the incremental
# detokenizer's few ids take the first, a long text (decoded in a worker thread) the second.
_DECODE_WITHOUT_GIL = 1024


class Tokenizer:
    """Encode, decode and render chat prompts; the subset of transformers' tokenizer we serve."""

    def __init__(self, backend: _Backend, special_tokens: Mapping[str, Optional[str]],
                 chat_template: Optional[str]) -> None:
        self.backend = backend  # its DecodeStream detokenizes incrementally
        # bos_token, eos_token... as strings: chat templates read them as variables.
        self._special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.bos_token_id: Optional[int] = self._id_of("bos_token")
        self.eos_token_id: Optional[int] = self._id_of("eos_token")
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.all_special_ids: frozenset[int] = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
        self.chat_template: Optional[str] = chat_template
        self._template: Optional[jinja2.Template] = None

    def _id_of(self, name: str) -> Optional[int]:
        token = self._special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @classmethod
    def from_hf_dir(cls, path: Union[str, os.PathLike]) -> "Tokenizer":
        """From a Hugging Face model directory: tokenizer.json (+ tokenizer_config.json)."""
        path = os.fspath(path)
        tokenizer_json = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_json):
            raise ValueError(f"{path!r} has no tokenizer.json")
        config: dict = {}
        config_path = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        specials = {name: _token_content(config.get(name)) for name in _SPECIAL_NAMES}
        return cls(_Backend.from_file(tokenizer_json), specials, _hf_chat_template(path, config))

    @classmethod
    def from_gguf(cls, path_or_metadata: Union[str, os.PathLike, Mapping[str, Any]]
                  ) -> "Tokenizer":
        """From a GGUF file, or from its metadata as `read_gguf_header` returns it."""
        # Imported here: minivllm.loader imports this module (to build tokenizers) at its top.
        from minivllm.loader.gguf_header import read_gguf_header

        md = (read_gguf_header(path_or_metadata).metadata
              if isinstance(path_or_metadata, (str, os.PathLike)) else path_or_metadata)
        backend = _gguf_backend(md)
        tokens = md["tokenizer.ggml.tokens"]
        specials = {}
        for name, key in zip(_SPECIAL_NAMES, ("bos", "eos", "unknown", "padding")):
            token_id = md.get(f"tokenizer.ggml.{key}_token_id")
            specials[name] = tokens[token_id] if token_id is not None else None
        return cls(backend, specials, md.get("tokenizer.chat_template"))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text (<|im_start|>) stay whole."""
        return self._encoding(text, add_special_tokens).ids

    def encode_within(self, text: str, limit: int,
                      add_special_tokens: bool = False) -> tuple[int, Optional[list[int]]]:
        """(the number of tokens of `text`, their ids, or None past `limit` tokens): a prompt
        too long to serve is counted without making its list of ids, the one step of encoding
        that holds the GIL (~50 ns an id)."""
        encoding = self._encoding(text, add_special_tokens)
        return len(encoding), encoding.ids if len(encoding) <= limit else None

    def _encoding(self, text: str, add_special_tokens: bool):
        # The batch methods release the GIL while they work (encode holds it for the whole
        # text), so a long text encoded in a worker thread leaves the other threads running;
        # the _fast one skips the character offsets, whose freeing would hold the GIL again.
        return self.backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids without a token (a model's padded vocabulary) decode to nothing."""
        ids = list(ids)
        if len(ids) > _DECODE_WITHOUT_GIL:
            return self.backend.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Vocabulary strings of `ids` ("" for an id without a token, as in `decode`)."""
        return [self.backend.id_to_token(i) or "" for i in ids]

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Text of vocabulary strings, through the tokenizer's decoder (byte-level for BPE)."""
        decoder = self.backend.decoder
        return decoder.decode(list(tokens)) if decoder is not None else "".join(tokens)

    def use_chat_template(self, source: str) -> None:
        """Render chats with `source` (a jinja template, e.g. from --chat-template) instead of
        the model's own; a template that does not parse is a ValueError now, not at a request."""
        self._template = compile_chat_template(source)
        self.chat_template = source

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template can show tools to the model (it reads `tools`)."""
        return bool(self.chat_template) and "tools" in self.chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: Optional[list[dict]] = None) -> str:
        """The prompt text for a conversation (and the tools offered, if any), rendered by the
        chat template."""
        _check_messages(messages)
        if self._template is None:
            if not self.chat_template:
                raise ValueError("model has no chat template")
            self._template = compile_chat_template(self.chat_template)
        try:
            return self._template.render(messages=messages, tools=tools,
                                         add_generation_prompt=add_generation_prompt,
                                         **self._special_tokens)
        except jinja2.TemplateError as e:  # raise_exception() in templates: a bad conversation
            raise ValueError(f"chat template: {e}") from None


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', "
                             f"got {type(message).__name__}")
        # An assistant turn that called tools may have no content.
        optional = ("content",) if message.get("tool_calls") else ()
        for key in ("role", "content"):
            if not isinstance(message.get(key), str) and not (
                    key in optional and message.get(key) is None):
                raise ValueError(f"messages[{i}]['{key}'] must be a string, "
                                 f"got {type(message.get(key)).__name__}")


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes HTML characters; templates expect plain JSON (as transformers).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """The environment transformers renders chat templates in, so outputs match it."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse: {e}") from None
