"""Incremental detokenization: text deltas from a growing list of token ids.

Decoding tokens one at a time is wrong twice over: a byte-level BPE token can hold part of a
UTF-8 character (the rest comes with the next token), and some tokenizers' text for a token
depends on its neighbours.

A byte-level tokenizer (GPT-2's, Llama 3's, Qwen's, SmolLM's: a ByteLevel decoder) decodes
ids to the concatenation of their tokens' bytes, as UTF-8 with a U+FFFD per invalid sequence:
its tokens' bytes are tabled once (`byte_tables`), and a stream decodes each token's bytes as
UTF-8 incrementally, an incomplete character held back until its last byte comes (well under a
microsecond a token; the tokenizer's own decode costs one to three).

Any other tokenizer decodes a short window, tokens [prefix, end), and emits what it adds to
the decoding of [prefix, read). A window whose text ends in U+FFFD (an incomplete character)
emits nothing yet; the next token completes it. The window then slides, so the cost per token
stays constant however long the output grows. Tokens that arrive together (a server reading
several engine steps at once) are decoded in one window.
"""
from __future__ import annotations

import codecs
import logging
import weakref
from typing import Optional, Sequence

from tokenizers import decoders

logger = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"
_CONTEXT = 5  # prompt tokens kept as left context of the first window
# An incremental UTF-8 decoding step, as codecs' incremental decoder makes it (without its
# Python frame per call): (text, bytes used), an incomplete last character left unused.
_utf8_decode = codecs.utf_8_decode

# ByteLevel's map of bytes to the printable characters tokens are spelled in (GPT-2's
# bytes_to_unicode): printable Latin-1 stands for itself, the other bytes for 256 + k.
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
              *range(ord("®"), ord("ÿ") + 1)]
_CHAR_BYTE = {chr(b): b for b in _PRINTABLE}
_CHAR_BYTE.update((chr(256 + k), b) for k, b in enumerate(
    b for b in range(256) if b not in set(_PRINTABLE)))

# tokenizer -> (bytes by id, the same with special tokens empty), or None: not byte-level
_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def byte_tables(tokenizer) -> Optional[tuple[list[bytes], list[bytes]]]:
    """Each token's bytes by id, as the tokenizer's ByteLevel decoder makes them (a token
    spelled with a character outside the map is its own UTF-8, as there), and the same table
    with the special tokens empty (skip_special_tokens); None, said once, for a tokenizer
    whose decoder is not ByteLevel. Made once per tokenizer."""
    if tokenizer in _TABLES:
        return _TABLES[tokenizer]
    backend = tokenizer.backend
    tables = None
    if type(backend.decoder) is decoders.ByteLevel:
        table = [b""] * tokenizer.vocab_size
        for token, i in backend.get_vocab(with_added_tokens=True).items():
            try:
                table[i] = bytes([_CHAR_BYTE[c] for c in token])
            except KeyError:
                table[i] = token.encode()
        skipping = list(table)
        for i in tokenizer.all_special_ids:
            skipping[i] = b""
        tables = table, skipping
    else:
        logger.info("the tokenizer's decoder is %s, not byte-level: outputs are detokenized "
                    "by decoding windows of tokens", type(backend.decoder).__name__)
    _TABLES[tokenizer] = tables
    return tables


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        tables = byte_tables(tokenizer)
        # byte-level: each token's bytes, and the bytes of an incomplete last character
        self.table = None if tables is None else tables[1 if skip_special_tokens else 0]
        self.pending = b""
        # otherwise: the decoding window
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
        """push() each of `token_ids` (the tokens a stream got since its text was last read):
        the text the pushes would have made together."""
        table = self.table
        if table is not None:
            try:
                data = self.pending + b"".join(map(table.__getitem__, token_ids))
            except IndexError:  # ids past the tokenizer's (a padded vocabulary) decode to nothing
                data = self.pending + b"".join([table[t] for t in token_ids if t < len(table)])
            text, used = _utf8_decode(data, "replace", False)
            self.pending = data[used:]
            return text
        # In one decoding of the window when that ends on a whole character; otherwise one
        # push at a time, as they would have held back the characters left incomplete.
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
        if self.table is not None:
            text, self.pending = _utf8_decode(self.pending, "replace", True)[0], b""
            return text
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""
