"""Incremental detokenization: text deltas from a growing list of token ids.

Decoding tokens one at a time is wrong twice over: a byte-level BPE token can hold part of a
UTF-8 character (the rest comes with the next token), and some tokenizers' text for a token
depends on its neighbours. So each step decodes a short window, tokens [prefix, end), and emits
what it adds to the decoding of [prefix, read). A window whose text ends in U+FFFD (an
incomplete character) emits nothing yet; the next token completes it. The window then slides,
so the cost per token stays constant however long the output grows.
"""
from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"
_CONTEXT = 5  # prompt tokens kept as left context of the first window


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_token_ids[-_CONTEXT:])
        self.prefix = 0            # start of the decoding window
        self.read = len(self.ids)  # tokens before this have been emitted as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Append one token; returns the new text it completes ("" while a character is
        incomplete)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """At the end of the output: whatever is held back (an incomplete character decodes
        to U+FFFD, as a full decode would)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""
