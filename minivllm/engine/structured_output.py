"""Structured outputs on xgrammar: a grammar matcher per constrained request.

A constrained request passes through its own state before the scheduler sees it:

    add_request ─► WAITING_FOR_GRAMMAR: compiled on the worker thread, cached by (kind, spec)
                 ─► the scheduler's WAITING ─► RUNNING ... (take_ready)
                 ─► or failed: take_failed() names it with xgrammar's message; the batch goes on

Each step the engine asks `masks()` for the batch's sampled rows: None when no row is
constrained (requests without a grammar pay one test of an empty dict); otherwise `StepMasks`,
whose `start()` has the fill thread advance the matchers on the previous step's tokens and
fill the bitmask (xgrammar's batched calls, which release the GIL: the step loop's thread runs
on meanwhile) and whose `apply()` writes -inf into the logits on their own device just before
sampling: on the CPU by the CPU kernels' mask_rows_ (else xgrammar's CPU kernel, 10x slower:
it tests every token, where grammars mostly allow or refuse whole words of 32), on CUDA by
xgrammar's Triton kernel.
A step's matchers advance on its sampled tokens (`sampled()`) at the next fill, those of
finished or aborted requests excepted: the token async scheduling computes after a stop never
reaches a matcher.
A matcher whose grammar has terminated (its stop token accepted, under ignore_eos) masks nothing.

xgrammar (which imports torch and transformers) is imported on the worker thread by the first
constrained request, so an engine that never sees one never loads it.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from minivllm.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

GRAMMAR_CACHE_SIZE = 256  # compiled grammars kept (each a few hundred KB at most)
# Threads of xgrammar's batched mask fill. Its default ("auto": half the cores) makes the fill
# slower: 64 rows of the nested schema take 0.52 ms on one thread on the H200's host, 0.93 on
# two, 2.55 on "auto" (8); here 0.3 ms on one, 1.5-2.3 on two (bench.structured_outputs' sweep).
FILL_THREADS = 1

# xgrammar's messages start with "[hh:mm:ss] /path/file.cc:line: ": the user needs the rest.
_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


# JSON-schema keywords xgrammar 0.2.9 accepts but does not enforce (measured: outputs that break
# them pass its matcher): refused, so that a "stop" output always validates.
UNENFORCED_KEYWORDS = frozenset({"uniqueItems", "not", "if", "then", "else", "dependentRequired",
                                 "dependentSchemas", "unevaluatedProperties",
                                 "unevaluatedItems"})
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("prefixItems", "allOf", "anyOf", "oneOf")
_SCHEMA_VALUES = ("items", "additionalProperties", "additionalItems", "contains",
                  "propertyNames")


def unenforced_keyword(schema: object, path: str = "#") -> Optional[str]:
    """Where `schema` first uses a keyword of UNENFORCED_KEYWORDS ("#/properties/a/not"), or
    None. Property names are not keywords: only subschema positions are walked."""
    if not isinstance(schema, dict):
        return None
    subschemas = []
    for key, value in schema.items():
        if key in UNENFORCED_KEYWORDS:
            return f"{path}/{key}"
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            subschemas += [(v, f"{path}/{key}/{name}") for name, v in value.items()]
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            subschemas += [(v, f"{path}/{key}/{i}") for i, v in enumerate(value)]
        elif key in _SCHEMA_VALUES:
            subschemas.append((value, f"{path}/{key}"))
    return next((found for sub, where in subschemas
                 if (found := unenforced_keyword(sub, where))), None)


def _choice_ebnf(choices: Sequence[str]) -> str:
    # JSON string literals are valid EBNF literals in xgrammar's dialect (same escapes).
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class StructuredOutputs:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int],
                 device: torch.device, max_num_seqs: int,
                 mask_rows: Optional[Callable] = None) -> None:
        """`mask_rows`: the kernel set's (KernelSet.mask_rows: CPU sets only), for fp32
        logits; others take xgrammar's kernel."""
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._mask_rows = mask_rows
        self.stop_token_ids = list(stop_token_ids)
        self.device, self.max_num_seqs = device, max_num_seqs
        self._compile_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self._fill_thread: Optional[ThreadPoolExecutor] = None
        self._xgr = None       # the xgrammar module, once imported
        self._compiler = None  # xgrammar.GrammarCompiler over this tokenizer's vocabulary
        self._batch_matcher = None
        self._bitmask: Optional[torch.Tensor] = None  # [max_num_seqs, ceil(V / 32)] int32, host
        self._rows: Optional[torch.Tensor] = None     # [max_num_seqs] int32, pinned (CUDA)
        self._compiled: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self.waiting: dict[int, tuple[object, Future]] = {}  # owner -> (request, compile)
        self._failed: list[tuple[int, str]] = []
        self.matchers: dict[int, object] = {}   # owner -> GrammarMatcher, until it finishes
        self._by_index: dict[int, tuple] = {}  # req_index -> (owner, matcher), while admitted
        # The last masked step's (row, owner, matcher)s and a call giving its sampled tokens:
        # its matchers advance on them before the next fill.
        self._sampled: Optional[tuple[list[tuple[int, int, object]], Callable]] = None
        self.mask_time_s = 0.0  # host time in apply(): waiting for fills, masking (benches)
        self.fill_time_s = 0.0  # host time filling bitmasks, on whichever thread (benches)

    # ---- WAITING_FOR_GRAMMAR ----------------------------------------------------------------
    def add(self, req) -> None:
        """Hold `req` until its grammar is compiled (at once when cached)."""
        if self.tokenizer is None:
            raise ValueError("structured outputs need the model's tokenizer, and this model "
                             "has none")
        spec: StructuredOutputsParams = req.params.structured_outputs
        key = (spec.kind, spec.spec)
        future = self._compiled.get(key)
        if future is None:
            future = self._compiled[key] = self._compile_thread.submit(self._compile, *key)
            if len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        self.waiting[req.owner] = (req, future)

    def take_ready(self) -> list:
        """The waiting requests whose grammar compiled, in arrival order, each with its
        matcher; those whose grammar failed go to take_failed()."""
        ready = []
        for owner, (req, future) in list(self.waiting.items()):
            if not future.done():
                continue
            del self.waiting[owner]
            error = future.exception()
            if error is not None:
                kind = req.params.structured_outputs.kind
                self._failed.append((owner, f"structured_outputs.{kind} does not compile: "
                                            f"{_XGR_PREFIX.sub('', str(error)).strip()}"))
                continue
            self.matchers[owner] = self._xgr.GrammarMatcher(future.result())
            ready.append(req)
        return ready

    def take_failed(self) -> list[tuple[int, str]]:
        """(owner, message) of the requests whose grammar failed since the last call."""
        failed, self._failed = self._failed, []
        return failed

    def wait(self, timeout_s: float) -> None:
        """Block until a waiting request's compile ends or timeout_s passes (an engine with
        nothing else to run must not spin against the compile for the CPU)."""
        wait([f for _, f in self.waiting.values()], timeout_s, FIRST_COMPLETED)

    def abort(self, owner: int):
        """Forget `owner`; returns its request if it was still waiting for its grammar."""
        self.matchers.pop(owner, None)
        entry = self.waiting.pop(owner, None)
        return None if entry is None else entry[0]

    def _compile(self, kind: str, spec: str):
        compiler = self._load()
        if kind == "json":
            where = unenforced_keyword(json.loads(spec))
            if where:
                raise ValueError(f"the keyword at {where} is not supported (xgrammar does not "
                                 f"enforce {where.rsplit('/', 1)[1]!r})")
            # No free whitespace: a small model offered it can loop on it until max_tokens.
            return compiler.compile_json_schema(spec, any_whitespace=False)
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return compiler.compile_regex(spec)
        if kind == "choice":
            return compiler.compile_grammar(_choice_ebnf(json.loads(spec)))
        return compiler.compile_grammar(spec)

    def _load(self):
        """xgrammar and the compiler over the vocabulary: once, on the worker thread."""
        if self._compiler is None:
            try:
                import xgrammar
            except ImportError:
                raise ValueError("structured outputs need the xgrammar package: "
                                 "pip install 'minivllm[structured]'") from None
            info = xgrammar.TokenizerInfo(self._encoded_vocab(), xgrammar.VocabType.BYTE_LEVEL,
                                          vocab_size=self.vocab_size,
                                          stop_token_ids=self.stop_token_ids)
            self._xgr = xgrammar
            # Our cache is bounded (GRAMMAR_CACHE_SIZE); xgrammar's own would grow without bound
            # with every distinct schema a client sends.
            self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
            logger.info("structured outputs: xgrammar %s over %d tokens",
                        importlib.metadata.version("xgrammar"), self.vocab_size)
        return self._compiler

    def _encoded_vocab(self) -> list[str]:
        """Token strings by id, byte-level encoded; "" for ids without a token and for control
        tokens, which xgrammar then never allows inside the output's text (its stop tokens it
        allows where the grammar may end)."""
        backend = self.tokenizer.backend
        vocab = [""] * self.vocab_size
        for token, i in backend.get_vocab(with_added_tokens=True).items():
            if i < self.vocab_size:
                vocab[i] = token
        for i, added in backend.get_added_tokens_decoder().items():
            if added.special and i < self.vocab_size:
                vocab[i] = ""
        return vocab

    # ---- admitted requests ------------------------------------------------------------------
    def bind(self, req_index: int, owner: int) -> None:
        matcher = self.matchers.get(owner)
        if matcher is not None:
            self._by_index[req_index] = (owner, matcher)

    def unbind(self, req_index: int) -> None:
        self._by_index.pop(req_index, None)

    def masks(self, sample_req_indices: np.ndarray) -> Optional["StepMasks"]:
        """The masks of a step whose sampled rows are these request indices; None when none
        of them is constrained."""
        if not self._by_index:
            return None
        rows = [(row, *bound) for row, req_index in enumerate(sample_req_indices.tolist())
                if (bound := self._by_index.get(req_index)) is not None]
        return StepMasks(self, rows) if rows else None

    def sampled(self, masks: "StepMasks", tokens: Callable[[], np.ndarray]) -> None:
        """`masks`' step is sampled; `tokens()` gives its tokens (waiting for the device if
        need be). Its matchers advance on them before the next fill, on the fill thread."""
        self._sampled = (masks.rows, tokens)

    def _take_sampled(self) -> Optional[tuple[list[tuple[int, int, object]], Callable]]:
        """The last masked step's rows whose request is still running (those that finished
        or were aborted since take no token), and its tokens; taken on the step loop's thread."""
        if self._sampled is None:
            return None
        (rows, tokens), self._sampled = self._sampled, None
        return [r for r in rows if self.matchers.get(r[1]) is r[2]], tokens

    def retire(self, owners: np.ndarray, finish: np.ndarray) -> None:
        """Drop the matchers of a step's finished requests."""
        if self.matchers:
            for owner in owners[finish != 0].tolist():
                self.matchers.pop(owner, None)

    def _advance(self, sampled) -> None:
        """Advance the matchers on their step's sampled tokens, in one batched call."""
        rows, tokens = sampled
        ids = tokens()  # waited for even without rows: that step's mask copy is then done too
        live = [(owner, m, int(ids[row])) for row, owner, m in rows if not m.is_terminated()]
        accepted = self._xgr.BatchGrammarMatcher.batch_accept_token(
            [m for _, m, _ in live], [t for _, _, t in live])
        for (owner, _, token), ok in zip(live, accepted):
            if not ok:
                logger.warning("request %d: its grammar refused token %d", owner, token)

    def fill(self, sampled, rows: list[tuple[int, int, object]]) -> list[int]:
        """Advance the matchers on the last masked step's tokens (`sampled`, _take_sampled's),
        then fill the bitmask rows of those still running; returns those rows."""
        start = time.perf_counter()
        if sampled is not None:
            self._advance(sampled)
        live = [(r, m) for r, _, m in rows if not m.is_terminated()]
        if live:
            if self._bitmask is None:
                self._batch_matcher = self._xgr.BatchGrammarMatcher(FILL_THREADS)
                self._bitmask = self._xgr.allocate_token_bitmask(self.max_num_seqs,
                                                                 self.vocab_size)
                if self.device.type == "cuda":
                    self._bitmask = self._bitmask.pin_memory()
                    self._rows = torch.zeros(self.max_num_seqs, dtype=torch.int32).pin_memory()
            self._batch_matcher.batch_fill_next_token_bitmask(
                [m for _, m in live], self._bitmask, [r for r, _ in live])
        self.fill_time_s += time.perf_counter() - start
        return [r for r, _ in live]

    def fill_async(self, rows: list[tuple[int, int, object]]) -> Future:
        if self._fill_thread is None:
            self._fill_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-fill")
        return self._fill_thread.submit(self.fill, self._take_sampled(), rows)

    def apply(self, logits: torch.Tensor, rows: list[int]) -> None:
        if not rows:
            return
        if self._mask_rows is not None and logits.dtype == torch.float32:
            self._mask_rows(logits, self._bitmask, torch.tensor(rows))
            return
        bitmask, indices = self._bitmask[:logits.shape[0]], rows
        if bitmask.device != logits.device:
            # Both copies from pinned memory: xgrammar would copy a list of rows from pageable
            # memory, which waits for the forward queued ahead of it, and the host could not
            # run ahead of the GPU. Reusing the buffers is safe: the next fill comes after this
            # step's tokens, so after these copies ran.
            bitmask = bitmask.to(logits.device, non_blocking=True)
            self._rows.numpy()[:len(rows)] = rows
            indices = self._rows[:len(rows)].to(logits.device, non_blocking=True)
        self._xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size,
                                              indices=indices)


class StepMasks:
    """One step's grammar masks over its (row, owner, matcher)s: `start()` fills them on the
    fill thread (after advancing the matchers on the last masked step's tokens, which the
    thread waits for if need be), `apply(logits)` waits for the fill (filling inline when it
    was not started) and masks the logits."""

    def __init__(self, owner: StructuredOutputs, rows: list[tuple[int, int, object]]) -> None:
        self._so, self.rows = owner, rows
        self._fill: Optional[Future] = None

    def start(self) -> "StepMasks":
        self._fill = self._so.fill_async(self.rows)
        return self

    def apply(self, logits: torch.Tensor) -> None:
        """Mask the logits."""
        start = time.perf_counter()
        rows = (self._fill.result() if self._fill is not None
                else self._so.fill(self._so._take_sampled(), self.rows))
        self._so.apply(logits, rows)
        self._so.mask_time_s += time.perf_counter() - start
