"""Incremental detokenization: text deltas from a growing list of token ids.

Decoding tokens one at a time is wrong twice over: a byte-level BPE token can hold part of a
UTF-8 character (the rest comes with the next token), and some tokenizers' text for a token
depends on its neighbours. So each step decodes a short window, tokens [prefix, end), and emits
what it adds to the decoding of [prefix, read). A window whose text ends in U+FFFD (an
incomplete character) emits nothing yet; the next token completes it. The window then slides,
so the cost per token stays constant however long the output grows. Tokens that arrive
together (a server reading several engine steps at once) are decoded in one window.
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
        return self.push_many([token_id])

    def push_many(self, token_ids: list[int]) -> str:
        """push() each of `token_ids` (the tokens a stream got since its text was last read),
        in one decoding of the window when that ends on a whole character: the text is then
        what the pushes would have made together. Otherwise one push at a time, as they
        would have held back the characters left incomplete."""
        self.ids.extend(token_ids)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        if len(token_ids) == 1:
            return ""  # its character is still incomplete: held back
        del self.ids[len(self.ids) - len(token_ids):]
        return "".join([self.push(t) for t in token_ids])

    def flush(self) -> str:
        """At the end of the output: whatever is held back (an incomplete character decodes
        to U+FFFD, as a full decode would)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""
