"""Prompts as users give them (text, token ids, or a dict of either) to (text, token ids)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np

from minivllm.sampling_params import SamplingParams

PromptType = Union[str, Sequence[int], dict]


def parse_prompt(prompt: PromptType, tokenizer) -> tuple[Optional[str], list[int]]:
    """(text or None, token ids). Text needs a tokenizer; dicts take 'prompt' or
    'prompt_token_ids' (vLLM's TextPrompt / TokensPrompt)."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        prompt = prompt.get("prompt")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer, and this model has none: "
                             "pass token ids instead")
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
        return None, list(prompt)
    raise ValueError(f"a prompt must be a string, a list of token ids or a dict with "
                     f"'prompt' or 'prompt_token_ids'; got {type(prompt).__name__}")


def resolve_bad_words(params: SamplingParams, tokenizer) -> SamplingParams:
    """`params` with its bad_words as the token-id sequences the sampler bans, tokenized as vLLM
    does: each word as given, and after a space when that makes other tokens of the same
    number (the word inside a text)."""
    if not params.bad_words:
        return params
    if tokenizer is None:
        raise ValueError("bad_words need a tokenizer, and this model has none: send "
                         "bad_words_token_ids instead")
    ids: list[list[int]] = []
    for word in params.bad_words:
        alone = tokenizer.encode(word.lstrip())
        spaced = tokenizer.encode(" " + word.lstrip())
        ids.append(alone)
        if spaced[0] != alone[0] and len(spaced) == len(alone):
            ids.append(spaced)
    return dataclasses.replace(params, bad_words=None,
                               bad_words_token_ids=[*params.bad_words_token_ids, *ids])


def check_prompt(ids: Sequence[int], max_model_len: int, vocab_size: int) -> None:
    """Raise ValueError unless `ids` is a prompt the engine can serve (non-empty, room left for
    one output token, every id in the vocabulary)."""
    if len(ids) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if len(ids) >= max_model_len:
        raise ValueError(f"the prompt has {len(ids)} tokens, the context holds "
                         f"{max_model_len}: shorten it to at most {max_model_len - 1} tokens")
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= vocab_size:
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size})")
