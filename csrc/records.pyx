# cython: language_level=3
"""Record codecs: the structs of ipc/minivllm_ipc.h to and from Python, in C.

Writers (`put_*`) fill a record in place wherever a `RecordSink` hands out bytes: straight into
a shared-memory ring, or into a bytes object for a ZeroMQ frame (`encode_*`). Readers
(`decode`, `read_record`) check every length and count against the bytes actually there before
they trust it, copy arrays out with memcpy into fresh numpy arrays, and raise `ProtocolError`
for anything malformed; the frame is consumed either way, so the reader keeps serving.

No pickling, no per-token Python objects: a step output of n tokens is three numpy arrays.
A consumer with a backlog reads it with `read_batch`: consecutive step outputs become one set of
concatenated arrays, so the fixed cost of making arrays is paid once per batch, not per record.
"""
cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from libc.math cimport NAN
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.ref cimport Py_INCREF
from libc.stdlib cimport free, malloc

import numpy as np
cimport numpy as cnp

from minivllm._cext.ring cimport MV_FRAME_HEADER_BYTES, BytesSink, RecordSink, Ring
from minivllm._cext.ring import RingCorruptError

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    ctypedef struct PyTypeObject:
        pass
    PyTypeObject PyArray_Type
    # descr as a bare pointer: the call steals the reference, which _empty gives it.
    object PyArray_NewFromDescr(PyTypeObject* subtype, void* descr, int nd, cnp.npy_intp* dims,
                                cnp.npy_intp* strides, void* data, int flags, void* obj)

from minivllm._cext.ipc cimport *

# The header's codes under their Python names (minivllm/transport/protocol.py re-exports them).
MAGIC, VERSION, MIN_VERSION = MV_MAGIC, MV_VERSION, MV_MIN_VERSION
KIND_SUBMIT, KIND_ABORT, KIND_STEP_OUTPUT, KIND_ERROR = (
    MV_KIND_SUBMIT, MV_KIND_ABORT, MV_KIND_STEP_OUTPUT, MV_KIND_ERROR)
KIND_STATUS_QUERY, KIND_STATUS = MV_KIND_STATUS_QUERY, MV_KIND_STATUS
KIND_PROMPT_LOGPROBS, SAMPLING_PROMPT_LOGPROBS = MV_KIND_PROMPT_LOGPROBS, MV_SAMPLING_PROMPT_LOGPROBS
STATE_READY, STATE_DRAINING = MV_STATE_READY, MV_STATE_DRAINING
MAX_RECORD_BYTES, MAX_TOP_LOGPROBS = MV_MAX_RECORD_BYTES, MV_MAX_TOP_LOGPROBS
SUBMIT_FIXED_BYTES = sizeof(mv_submit)  # a submit's size before its token arrays
SAMPLING_HAS_SEED, SAMPLING_IGNORE_EOS = MV_SAMPLING_HAS_SEED, MV_SAMPLING_IGNORE_EOS
SUBMIT_HAS_STRUCTURED, MAX_SPEC_BYTES = MV_SUBMIT_HAS_STRUCTURED, MV_MAX_SPEC_BYTES
SUBMIT_HAS_TOKEN_CHOICE = MV_SUBMIT_HAS_TOKEN_CHOICE
# MV_STRUCTURED_* code <-> StructuredOutputsParams' field name
STRUCTURED_KINDS = {MV_STRUCTURED_JSON: "json", MV_STRUCTURED_REGEX: "regex",
                    MV_STRUCTURED_CHOICE: "choice", MV_STRUCTURED_GRAMMAR: "grammar",
                    MV_STRUCTURED_JSON_OBJECT: "json_object"}
cdef dict _STRUCTURED_CODES = {name: code for code, name in STRUCTURED_KINDS.items()}
STEP_HAS_LOGPROBS, ERROR_HAS_REQUEST = MV_STEP_HAS_LOGPROBS, MV_ERROR_HAS_REQUEST
FINISH_NONE, FINISH_STOP, FINISH_LENGTH, FINISH_ABORT = (
    MV_FINISH_NONE, MV_FINISH_STOP, MV_FINISH_LENGTH, MV_FINISH_ABORT)
ERR_MALFORMED, ERR_INVALID_REQUEST, ERR_DUPLICATE_ID = (
    MV_ERR_MALFORMED, MV_ERR_INVALID_REQUEST, MV_ERR_DUPLICATE_ID)
ERR_OVERLOADED, ERR_DRAINING, ERR_INTERNAL = MV_ERR_OVERLOADED, MV_ERR_DRAINING, MV_ERR_INTERNAL
# OpenAI's finish_reason for each code, indexed by the code.
_REASON_OF = {FINISH_NONE: None, FINISH_STOP: "stop", FINISH_LENGTH: "length",
              FINISH_ABORT: "abort"}
FINISH_REASONS = tuple(_REASON_OF[code] for code in range(len(_REASON_OF)))


class ProtocolError(ValueError):
    """Bytes that are not a valid record; `code` is the MV_ERR_* to answer with."""

    def __init__(self, message: str, code: int = MV_ERR_MALFORMED, request_id=None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


cdef inline uint64_t _pad8(uint64_t n) noexcept nogil:
    return (n + 7) & ~(<uint64_t>7)


cdef struct StepLayout:
    uint64_t tokens, finish, logprob, top_ids, top_logprobs, size


cdef inline StepLayout _step_layout(uint64_t n, uint64_t k, bint has_lp) noexcept nogil:
    """Offsets of a step output's arrays (PROTOCOL.md, "Step output"), and its size."""
    cdef StepLayout at
    at.tokens = sizeof(mv_step_output) + 8 * n
    at.finish = at.tokens + _pad8(4 * n)
    at.logprob = at.finish + _pad8(n)
    at.top_ids = at.logprob + _pad8(4 * n)
    at.top_logprobs = at.top_ids + _pad8(4 * n * k)
    at.size = at.top_logprobs + _pad8(4 * n * k) if has_lp else at.logprob
    return at


cdef inline void _copy_padded(char* dst, const void* src, uint64_t n,
                              uint64_t padded) noexcept nogil:
    """n bytes, then zeros up to `padded`: every byte of a record is written once (a memset of
    the whole record first would write it twice, in shared memory the consumer reads)."""
    memcpy(dst, src, n)
    memset(dst + n, 0, padded - n)


cdef inline void _header(char* p, uint32_t kind, uint64_t size, uint32_t flags) noexcept nogil:
    cdef mv_header* h = <mv_header*>p
    h.magic, h.version, h.kind, h.size, h.flags = MV_MAGIC, MV_VERSION, kind, <uint32_t>size, flags


cdef object U64 = np.dtype(np.uint64), I32 = np.dtype(np.int32), U8 = np.dtype(np.uint8)
cdef object F32 = np.dtype(np.float32), I64 = np.dtype(np.int64), U32 = np.dtype(np.uint32)


cdef inline cnp.ndarray _empty(object descr, int nd, cnp.npy_intp n, cnp.npy_intp k=0):
    """An uninitialized [n] array (nd 1) or [n, k] array (nd 2). Making arrays is most of what
    decoding a record costs; the cached descriptor skips PyArray_EMPTY's per-call type lookup
    and object-dtype fill check."""
    cdef cnp.npy_intp dims[2]
    dims[0], dims[1] = n, k
    Py_INCREF(descr)
    return <cnp.ndarray>PyArray_NewFromDescr(&PyArray_Type, <void*>descr, nd, dims, NULL, NULL,
                                             0, NULL)


cdef inline object _array(object descr, cnp.npy_intp n, const char* src):
    cdef cnp.ndarray arr = _empty(descr, 1, n)
    if n:
        memcpy(cnp.PyArray_DATA(arr), src, n * (<cnp.dtype>descr).itemsize)
    return arr


cdef inline object _matrix(object descr, cnp.npy_intp n, cnp.npy_intp k, const char* src):
    cdef cnp.ndarray arr = _empty(descr, 2, n, k)
    if n * k:
        memcpy(cnp.PyArray_DATA(arr), src, n * k * 4)
    return arr


# ---- token lists: Python lists without a numpy round trip, arrays without a copy ------------
cdef object _ids_for_copy(object ids, str what):
    """`ids` for _copy_ids: a list as it is, anything else as a contiguous int32 array (or
    raises naming `what`)."""
    if type(ids) is list:
        return ids
    if isinstance(ids, np.ndarray) and (<cnp.ndarray>ids).dtype == np.int32 \
            and (<cnp.ndarray>ids).flags.c_contiguous and (<cnp.ndarray>ids).ndim == 1:
        return ids
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a sequence of token ids: {exc}") from None
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"{what} must be a flat sequence of integer token ids")
    if arr.size and (arr.min() < -2**31 or arr.max() >= 2**31):
        raise ValueError(f"{what} holds a token id outside int32")
    return np.ascontiguousarray(arr, dtype=np.int32)


cdef Py_ssize_t _copy_ids(char* dst, object ids, str what) except -1:
    """Copy token ids into dst as int32; a list of ints takes the fast path."""
    cdef Py_ssize_t i, n
    cdef int32_t* out = <int32_t*>dst
    cdef const int32_t[::1] view
    if type(ids) is list:
        n = PyList_GET_SIZE(ids)
        for i in range(n):
            item = <object>PyList_GET_ITEM(ids, i)
            if type(item) is not int:
                raise ValueError(f"{what}[{i}] must be an int, got {type(item).__name__}")
            try:
                out[i] = item  # Cython's conversion: inline for small ints, range-checked
            except OverflowError:
                raise ValueError(f"{what}[{i}] = {item} is outside int32") from None
        return n
    view = ids
    n = view.shape[0]
    if n:
        memcpy(dst, &view[0], n * 4)
    return n


# ---- records ----------------------------------------------------------------------------------
cdef class Submit:
    """A decoded MV_KIND_SUBMIT: a request and its sampling parameters."""
    kind = MV_KIND_SUBMIT
    cdef readonly uint64_t request_id
    cdef readonly object prompt_token_ids  # int32 array
    cdef readonly object stop_token_ids    # int32 array
    cdef readonly double temperature, top_p, min_p
    cdef readonly double repetition_penalty, presence_penalty, frequency_penalty
    cdef readonly int top_k, max_tokens, min_tokens, logprobs, priority
    cdef readonly object seed
    cdef readonly bint ignore_eos, prompt_logprobs
    cdef readonly object structured_kind  # MV_STRUCTURED_* code, or None
    cdef readonly str structured_spec
    # the token-choice part: (bias ids, biases, allowed ids, bad-word lengths, bad-word ids), or
    # None
    cdef readonly object token_choice

    def sampling_params(self):
        """The SamplingParams this record carries. A value outside the field's valid values
        (ipc/PROTOCOL.md) raises ValueError naming the field."""
        from minivllm.sampling_params import SamplingParams
        # The fields whose wire values mean something of their own (logprobs -1: none;
        # max_tokens 0: up to the context) are checked here, in the protocol's terms:
        # SamplingParams would speak of Python's None.
        cdef int max_top = <int>MV_MAX_TOP_LOGPROBS
        if not (self.logprobs == -1 or 0 <= self.logprobs <= max_top):
            raise ValueError(f"logprobs must be -1 (none) or in [0, {max_top}], "
                             f"got {self.logprobs}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0 (0: up to the context length), "
                             f"got {self.max_tokens}")
        negative = np.flatnonzero(self.stop_token_ids < 0)
        if len(negative):
            raise ValueError(f"stop_token_ids[{negative[0]}] must be >= 0, "
                             f"got {self.stop_token_ids[negative[0]]}")
        structured = None
        if self.structured_kind is not None:
            from minivllm.sampling_params import StructuredOutputsParams
            structured = StructuredOutputsParams.from_spec(
                STRUCTURED_KINDS[self.structured_kind], self.structured_spec)
        choice = {}
        if self.token_choice is not None:
            ids, bias, allowed, lens, words = self.token_choice
            choice = dict(logit_bias=dict(zip(ids.tolist(), bias.tolist())) or None,
                          allowed_token_ids=allowed.tolist() or None,
                          bad_words_token_ids=[w.tolist() for w in
                                               np.split(words, np.cumsum(lens)[:-1])]
                          if len(lens) else ())
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            max_tokens=self.max_tokens or None, min_tokens=self.min_tokens,
            stop_token_ids=self.stop_token_ids.tolist(), ignore_eos=self.ignore_eos,
            logprobs=None if self.logprobs == -1 else self.logprobs,
            prompt_logprobs=max(self.logprobs, 0) if self.prompt_logprobs else None,
            structured_outputs=structured, **choice)

    def __repr__(self) -> str:
        return (f"Submit(request_id={self.request_id}, "
                f"{len(self.prompt_token_ids)} prompt tokens)")


cdef class Abort:
    """A decoded MV_KIND_ABORT."""
    kind = MV_KIND_ABORT
    cdef readonly uint64_t request_id

    def __init__(self, uint64_t request_id) -> None:
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"Abort(request_id={self.request_id})"


# A stream reads one, drops one: the freelist reuses the memory. Holding only numeric arrays,
# a StepOutput can be in no reference cycle, so the cyclic GC need not track it (nor count its
# allocations towards a collection).
@cython.freelist(8)
@cython.no_gc
cdef class StepOutput:
    """A decoded MV_KIND_STEP_OUTPUT: entry i is token token_ids[i] of request request_ids[i]."""
    kind = MV_KIND_STEP_OUTPUT
    cdef readonly uint64_t step
    cdef readonly object request_ids     # uint64 [n]
    cdef readonly object token_ids       # int32 [n]
    cdef readonly object finish_reasons  # uint8 [n], MV_FINISH_*
    cdef readonly object logprobs        # float32 [n] or None
    cdef readonly object top_token_ids   # int32 [n, k] or None
    cdef readonly object top_logprobs    # float32 [n, k] or None

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return f"StepOutput(step={self.step}, {len(self.token_ids)} tokens)"


cdef class ErrorRecord:
    """A decoded MV_KIND_ERROR."""
    kind = MV_KIND_ERROR
    cdef readonly object request_id  # int, or None when the error is about no one request
    cdef readonly uint32_t code
    cdef readonly str message

    def __init__(self, uint32_t code, str message, request_id=None) -> None:
        self.code, self.message, self.request_id = code, message, request_id

    def __repr__(self) -> str:
        return f"ErrorRecord(code={self.code}, request_id={self.request_id}, {self.message!r})"


cdef class PromptLogprobs:
    """A decoded MV_KIND_PROMPT_LOGPROBS: prompt positions first_position.. of request_id."""
    kind = MV_KIND_PROMPT_LOGPROBS
    cdef readonly uint64_t request_id
    cdef readonly uint32_t first_position
    cdef readonly object logprobs        # float32 [n]
    cdef readonly object top_token_ids   # int32 [n, k]
    cdef readonly object top_logprobs    # float32 [n, k]

    def __repr__(self) -> str:
        return (f"PromptLogprobs(request_id={self.request_id}, positions "
                f"{self.first_position}..{self.first_position + len(self.logprobs) - 1})")


cdef class StatusQuery:
    """A decoded MV_KIND_STATUS_QUERY: the answer echoes `tag`."""
    kind = MV_KIND_STATUS_QUERY
    cdef readonly uint64_t tag


cdef class Status:
    """A decoded MV_KIND_STATUS: `fields` maps each field of mv_status after the tag (the
    header's names) to its value."""
    kind = MV_KIND_STATUS
    cdef readonly uint64_t tag
    cdef readonly dict fields

    def __init__(self, uint64_t tag, dict fields) -> None:
        self.tag, self.fields = tag, fields

    def __repr__(self) -> str:
        return f"Status(tag={self.tag}, {self.fields})"


# ---- writers ----------------------------------------------------------------------------------
cdef bytes _token_choice_part(params):
    """`params`' mv_token_choice part, padded to 8, or None when it narrows nothing."""
    if params.bad_words:
        raise ValueError("bad_words must be tokenized into bad_words_token_ids before they "
                         "are sent (inputs.resolve_bad_words)")
    bias, allowed = params.logit_bias or {}, params.allowed_token_ids or []
    words = params.bad_words_token_ids
    if not (bias or allowed or words):
        return None
    tokens = [t for w in words for t in w]
    body = b"".join([np.array([len(bias), len(allowed), len(words), len(tokens)], U32).tobytes(),
                     np.array(list(bias), I32).tobytes(),
                     np.array(list(bias.values()), F32).tobytes(),
                     np.array(allowed, I32).tobytes(),
                     np.array([len(w) for w in words], U32).tobytes(),
                     np.array(tokens, I32).tobytes()])
    return body + bytes(_pad8(len(body)) - len(body))


def put_submit(RecordSink sink, uint64_t request_id, prompt_token_ids, params,
               int priority=0, double timeout=5.0) -> None:
    """Write a submit record of `prompt_token_ids` (list or int array) and `params`
    (a SamplingParams; its `stop` strings stay with the frontend)."""
    prompt = _ids_for_copy(prompt_token_ids, "prompt_token_ids")
    stop = _ids_for_copy(params.stop_token_ids, "stop_token_ids")
    cdef uint64_t n_prompt = len(prompt), n_stop = len(stop)
    if n_prompt == 0:
        raise ValueError("prompt_token_ids is empty: give at least one token")
    cdef uint64_t ids_end = _pad8(sizeof(mv_submit) + 4 * (n_prompt + n_stop))
    cdef uint64_t size = ids_end
    cdef bytes spec = None
    cdef uint32_t spec_kind = 0
    so = params.structured_outputs
    if so is not None:
        spec, spec_kind = so.spec.encode(), _STRUCTURED_CODES[so.kind]
        if len(spec) > MV_MAX_SPEC_BYTES:
            raise ValueError(f"structured_outputs.{so.kind} is longer than {MV_MAX_SPEC_BYTES} "
                             f"bytes")
        size += sizeof(mv_structured) + _pad8(len(spec))
    cdef bytes choice = _token_choice_part(params)
    if choice is not None:
        size += len(choice)
    if size > MV_MAX_RECORD_BYTES:
        raise ValueError(f"a prompt of {n_prompt} tokens exceeds the "
                         f"{MV_MAX_RECORD_BYTES}-byte record limit")
    cdef mv_sampling s
    s.temperature, s.top_p, s.min_p = params.temperature, params.top_p, params.min_p
    s.repetition_penalty = params.repetition_penalty
    s.presence_penalty, s.frequency_penalty = params.presence_penalty, params.frequency_penalty
    s.top_k, s.min_tokens = params.top_k, params.min_tokens
    max_tokens, logprobs, seed = params.max_tokens, params.logprobs, params.seed
    s.max_tokens = 0 if max_tokens is None else max_tokens
    s.logprobs = -1 if logprobs is None else logprobs
    s.flags = MV_SAMPLING_IGNORE_EOS if params.ignore_eos else 0
    if params.prompt_logprobs is not None:
        if params.prompt_logprobs != (logprobs or 0):
            raise ValueError(f"prompt_logprobs travels as a flag with logprobs' top-N: it must "
                             f"equal logprobs (0 without), got {params.prompt_logprobs}")
        s.flags |= MV_SAMPLING_PROMPT_LOGPROBS
    s.seed = 0
    if seed is not None:
        s.seed = <uint64_t>(seed & 0xFFFFFFFFFFFFFFFF)
        s.flags |= MV_SAMPLING_HAS_SEED
    s.priority = priority
    cdef char* p = sink.reserve(size, timeout)
    cdef mv_submit* rec = <mv_submit*>p
    _header(p, MV_KIND_SUBMIT, size, (0 if spec is None else MV_SUBMIT_HAS_STRUCTURED)
            | (0 if choice is None else MV_SUBMIT_HAS_TOKEN_CHOICE))
    rec.request_id, rec.sampling = request_id, s
    rec.num_prompt_tokens, rec.num_stop_token_ids = <uint32_t>n_prompt, <uint32_t>n_stop
    # A bad id raises before commit(): the reservation is simply not published.
    _copy_ids(p + sizeof(mv_submit), prompt, "prompt_token_ids")
    _copy_ids(p + sizeof(mv_submit) + 4 * n_prompt, stop, "stop_token_ids")
    memset(p + sizeof(mv_submit) + 4 * (n_prompt + n_stop), 0,
           ids_end - sizeof(mv_submit) - 4 * (n_prompt + n_stop))
    cdef mv_structured* part
    if spec is not None:
        part = <mv_structured*>(p + ids_end)
        part.kind, part.spec_len = spec_kind, <uint32_t>len(spec)
        _copy_padded(p + ids_end + sizeof(mv_structured), <const char*>spec, len(spec),
                     _pad8(len(spec)))
    if choice is not None:
        memcpy(p + size - len(choice), <const char*>choice, len(choice))
    sink.commit()


def put_abort(RecordSink sink, uint64_t request_id, double timeout=5.0) -> None:
    cdef char* p = sink.reserve(sizeof(mv_abort), timeout)
    _header(p, MV_KIND_ABORT, sizeof(mv_abort), 0)
    (<mv_abort*>p).request_id = request_id
    sink.commit()


cdef inline cnp.ndarray _c_array(object a, object dtype, int ndim, str name):
    """`a` itself when it already is a C-contiguous `dtype` array (the engine's case), else a
    converted copy; raises naming `name` when it cannot be one."""
    if (isinstance(a, cnp.ndarray)  # a type check: np.ndarray would be two dict lookups
            and cnp.PyArray_TYPE(<cnp.ndarray>a) == (<cnp.dtype>dtype).type_num
            and cnp.PyArray_NDIM(<cnp.ndarray>a) == ndim
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a)):
        return <cnp.ndarray>a
    arr = np.ascontiguousarray(a, dtype=dtype)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    return arr


def put_step_output(RecordSink sink, uint64_t step, request_ids, token_ids, finish_reasons,
                    logprobs=None, top_token_ids=None, top_logprobs=None,
                    double timeout=5.0) -> None:
    """Write one step's tokens: uint64 request ids, int32 token ids, uint8 MV_FINISH_* codes,
    and optionally float32 logprobs [n], int32 top ids [n, k], float32 top logprobs [n, k]
    (all three or none)."""
    cdef cnp.ndarray ids = _c_array(request_ids, U64, 1, "request_ids")
    cdef cnp.ndarray toks = _c_array(token_ids, I32, 1, "token_ids")
    cdef cnp.ndarray fin = _c_array(finish_reasons, U8, 1, "finish_reasons")
    cdef cnp.ndarray lp = None, tid = None, tlp = None
    cdef uint64_t n = cnp.PyArray_DIM(ids, 0), k = 0
    if <uint64_t>cnp.PyArray_DIM(toks, 0) != n or <uint64_t>cnp.PyArray_DIM(fin, 0) != n:
        raise ValueError("request_ids, token_ids and finish_reasons must have one entry each")
    cdef bint has_lp = logprobs is not None
    if has_lp != (top_token_ids is not None) or has_lp != (top_logprobs is not None):
        raise ValueError("logprobs, top_token_ids and top_logprobs go together")
    if has_lp:
        lp = _c_array(logprobs, F32, 1, "logprobs")
        tid = _c_array(top_token_ids, I32, 2, "top_token_ids")
        tlp = _c_array(top_logprobs, F32, 2, "top_logprobs")
        k = cnp.PyArray_DIM(tid, 1)
        if (<uint64_t>cnp.PyArray_DIM(lp, 0) != n or <uint64_t>cnp.PyArray_DIM(tid, 0) != n
                or <uint64_t>cnp.PyArray_DIM(tlp, 0) != n
                or <uint64_t>cnp.PyArray_DIM(tlp, 1) != k):
            raise ValueError("logprob arrays must have one row per entry and equal widths")
        if k > MV_MAX_TOP_LOGPROBS:
            raise ValueError(f"at most {MV_MAX_TOP_LOGPROBS} top logprobs per token, got {k}")
    cdef StepLayout at = _step_layout(n, k, has_lp)
    if at.size > MV_MAX_RECORD_BYTES:
        raise ValueError(f"a step output of {n} tokens exceeds the record limit")
    cdef char* p = sink.reserve(at.size, timeout)
    _header(p, MV_KIND_STEP_OUTPUT, at.size, MV_STEP_HAS_LOGPROBS if has_lp else 0)
    cdef mv_step_output* rec = <mv_step_output*>p
    rec.step, rec.num_entries, rec.num_top_logprobs = step, <uint32_t>n, <uint32_t>k
    memcpy(p + sizeof(mv_step_output), cnp.PyArray_DATA(ids), 8 * n)
    _copy_padded(p + at.tokens, cnp.PyArray_DATA(toks), 4 * n, at.finish - at.tokens)
    _copy_padded(p + at.finish, cnp.PyArray_DATA(fin), n, at.logprob - at.finish)
    if has_lp:
        _copy_padded(p + at.logprob, cnp.PyArray_DATA(lp), 4 * n, at.top_ids - at.logprob)
        _copy_padded(p + at.top_ids, cnp.PyArray_DATA(tid), 4 * n * k,
                     at.top_logprobs - at.top_ids)
        _copy_padded(p + at.top_logprobs, cnp.PyArray_DATA(tlp), 4 * n * k,
                     at.size - at.top_logprobs)
    sink.commit()


def put_error(RecordSink sink, uint32_t code, str message, request_id=None,
              double timeout=5.0) -> None:
    cdef bytes text = message.encode("utf-8", "replace")[:65536]
    cdef uint64_t n = len(text)
    cdef uint64_t size = _pad8(sizeof(mv_error) + n)
    cdef char* p = sink.reserve(size, timeout)
    memset(p, 0, size)
    _header(p, MV_KIND_ERROR, size, 0 if request_id is None else MV_ERROR_HAS_REQUEST)
    cdef mv_error* rec = <mv_error*>p
    rec.request_id = 0 if request_id is None else request_id
    rec.code, rec.message_len = code, <uint32_t>n
    if n:
        memcpy(p + sizeof(mv_error), <const char*>text, n)
    sink.commit()


def put_prompt_logprobs(RecordSink sink, uint64_t request_id, uint32_t first_position,
                        logprobs, top_token_ids, top_logprobs, double timeout=5.0) -> None:
    """Write prompt positions first_position.. of a request: float32 logprobs [n], int32 top
    ids [n, k], float32 top logprobs [n, k]."""
    cdef cnp.ndarray lp = _c_array(logprobs, F32, 1, "logprobs")
    cdef cnp.ndarray ids = _c_array(top_token_ids, I32, 2, "top_token_ids")
    cdef cnp.ndarray tlp = _c_array(top_logprobs, F32, 2, "top_logprobs")
    cdef uint64_t n = lp.shape[0], k = ids.shape[1]
    if n == 0 or first_position == 0 or ids.shape[0] != n or tlp.shape[0] != n \
            or tlp.shape[1] != k or k > MV_MAX_TOP_LOGPROBS:
        raise ValueError(f"prompt logprobs of {n} positions from {first_position} with top "
                         f"{top_token_ids.shape} / {top_logprobs.shape}: need n >= 1, a first "
                         f"position >= 1 and [n, k <= {MV_MAX_TOP_LOGPROBS}] tops")
    cdef uint64_t size = _pad8(sizeof(mv_prompt_logprobs) + 4 * n + 8 * n * k)
    cdef char* p = sink.reserve(size, timeout)
    memset(p, 0, size)
    _header(p, MV_KIND_PROMPT_LOGPROBS, size, 0)
    cdef mv_prompt_logprobs* rec = <mv_prompt_logprobs*>p
    rec.request_id, rec.first_position = request_id, first_position
    rec.num_positions, rec.num_top_logprobs = <uint32_t>n, <uint32_t>k
    p += sizeof(mv_prompt_logprobs)
    memcpy(p, cnp.PyArray_DATA(lp), 4 * n)
    memcpy(p + 4 * n, cnp.PyArray_DATA(ids), 4 * n * k)
    memcpy(p + 4 * n + 4 * n * k, cnp.PyArray_DATA(tlp), 4 * n * k)
    sink.commit()


def put_status_query(RecordSink sink, uint64_t tag, double timeout=5.0) -> None:
    cdef char* p = sink.reserve(sizeof(mv_status_query), timeout)
    _header(p, MV_KIND_STATUS_QUERY, sizeof(mv_status_query), 0)
    (<mv_status_query*>p).tag = tag
    sink.commit()


def put_status(RecordSink sink, uint64_t tag, dict fields, double timeout=5.0) -> None:
    """Write a status record: `fields` holds a value for every field of mv_status after the
    tag (Cython's struct conversion names the one missing)."""
    cdef mv_status rec = dict(fields, tag=tag,  # _header() writes the header
                              header=dict(magic=0, version=0, kind=0, size=0, flags=0))
    _header(<char*>&rec, MV_KIND_STATUS, sizeof(mv_status), 0)
    cdef char* p = sink.reserve(sizeof(mv_status), timeout)
    memcpy(p, &rec, sizeof(mv_status))
    sink.commit()


def _encoder(put):
    """put's twin that returns the record as bytes (a ZeroMQ frame) instead of writing it into
    a ring."""
    def encode(*args, **kwargs) -> bytes:
        cdef BytesSink sink = BytesSink()
        put(sink, *args, **kwargs)
        return sink.take()
    encode.__name__ = encode.__qualname__ = put.__name__.replace("put_", "encode_")
    return encode


encode_submit, encode_abort, encode_step_output, encode_error = map(
    _encoder, (put_submit, put_abort, put_step_output, put_error))
encode_prompt_logprobs, encode_status_query, encode_status = map(
    _encoder, (put_prompt_logprobs, put_status_query, put_status))


# ---- readers ----------------------------------------------------------------------------------
cdef int _check_header(const char* p, uint64_t n, mv_header* h) except -1:
    """Copy p's header into h, or raise ProtocolError if it cannot head the n bytes there."""
    if n < sizeof(mv_header):
        raise ProtocolError(f"truncated record: {n} bytes, a header alone is {sizeof(mv_header)}")
    memcpy(h, p, sizeof(mv_header))
    if h.magic != MV_MAGIC:
        raise ProtocolError(f"bad magic 0x{h.magic:08x}: not a minivllm record "
                            f"(expected 0x{MV_MAGIC:08x}, little-endian)")
    if not MV_MIN_VERSION <= h.version <= MV_VERSION:
        raise ProtocolError(f"protocol version {h.version} is not supported (this engine "
                            f"reads versions {MV_MIN_VERSION} to {MV_VERSION})")
    if h.size != n:
        raise ProtocolError(f"the header says {h.size} bytes but the frame holds {n}")
    if n % 8 or n > MV_MAX_RECORD_BYTES:
        raise ProtocolError(f"record size {n} must be a multiple of 8 and at most "
                            f"{MV_MAX_RECORD_BYTES}")
    return 0


cdef object _decode(const char* p, uint64_t n):
    """The record in p[0:n], or raises ProtocolError saying what is wrong."""
    cdef mv_header h
    cdef StepShape shape
    cdef StatusQuery query
    _check_header(p, n, &h)
    if h.kind == MV_KIND_SUBMIT:
        return _decode_submit(p, n, h)
    if h.kind == MV_KIND_STEP_OUTPUT:
        _check_step(p, n, &h, &shape)
        return _step_output(p, &shape)
    if h.kind == MV_KIND_ABORT:
        if n != sizeof(mv_abort) or h.flags:
            raise ProtocolError(f"an abort record is {sizeof(mv_abort)} bytes with no flags")
        return Abort((<const mv_abort*>p).request_id)
    if h.kind == MV_KIND_ERROR:
        return _decode_error(p, n, h)
    if h.kind == MV_KIND_STATUS_QUERY:
        if n != sizeof(mv_status_query) or h.flags:
            raise ProtocolError(f"a status query is {sizeof(mv_status_query)} bytes with no "
                                f"flags")
        query = StatusQuery.__new__(StatusQuery)
        query.tag = (<const mv_status_query*>p).tag
        return query
    if h.kind == MV_KIND_STATUS:
        return _decode_status(p, n, h)
    if h.kind == MV_KIND_PROMPT_LOGPROBS and h.version >= 3:
        return _decode_prompt_logprobs(p, n, h)
    raise ProtocolError(f"unknown record kind {h.kind}")


cdef Submit _decode_submit(const char* p, uint64_t n, mv_header h):
    cdef mv_submit rec
    if n < sizeof(mv_submit):
        raise ProtocolError(f"truncated submit record: {n} bytes, its fixed part is "
                            f"{sizeof(mv_submit)}")
    memcpy(&rec, p, sizeof(mv_submit))
    cdef uint64_t n_prompt = rec.num_prompt_tokens, n_stop = rec.num_stop_token_ids
    cdef uint32_t known = ((MV_SUBMIT_HAS_STRUCTURED if h.version >= 2 else 0)
                           | (MV_SUBMIT_HAS_TOKEN_CHOICE if h.version >= 3 else 0))
    cdef uint32_t sampling_known = MV_SAMPLING_HAS_SEED | MV_SAMPLING_IGNORE_EOS | (
        MV_SAMPLING_PROMPT_LOGPROBS if h.version >= 3 else 0)
    if h.flags & ~known or rec.sampling.flags & ~sampling_known:
        raise ProtocolError("submit record with unknown flag bits set", request_id=rec.request_id)
    cdef uint64_t ids_end = _pad8(sizeof(mv_submit) + 4 * (n_prompt + n_stop))
    cdef mv_structured part
    part.kind, part.spec_len = 0, 0
    if h.flags & MV_SUBMIT_HAS_STRUCTURED and ids_end + sizeof(mv_structured) <= n:
        memcpy(&part, p + ids_end, sizeof(mv_structured))
    cdef uint64_t end = ids_end + (sizeof(mv_structured) + _pad8(part.spec_len)
                                   if h.flags & MV_SUBMIT_HAS_STRUCTURED else 0)
    cdef uint64_t choice_at = end
    cdef mv_token_choice choice
    memset(&choice, 0, sizeof(mv_token_choice))
    if h.flags & MV_SUBMIT_HAS_TOKEN_CHOICE:
        if end + sizeof(mv_token_choice) <= n:
            memcpy(&choice, p + end, sizeof(mv_token_choice))
        end += _pad8(sizeof(mv_token_choice) + 4 * (2 * <uint64_t>choice.num_logit_bias
                     + <uint64_t>choice.num_allowed_token_ids + choice.num_bad_words
                     + choice.num_bad_word_tokens))
    if end != n:
        raise ProtocolError(f"submit record of {n} bytes cannot hold the {n_prompt} prompt and "
                            f"{n_stop} stop token ids"
                            f"{' and the optional parts' if h.flags else ''} it announces",
                            request_id=rec.request_id)
    cdef Submit out = Submit.__new__(Submit)
    out.structured_kind, out.structured_spec = None, None
    if h.flags & MV_SUBMIT_HAS_STRUCTURED:
        if part.kind not in STRUCTURED_KINDS or part.spec_len > MV_MAX_SPEC_BYTES:
            raise ProtocolError(f"submit record with structured kind {part.kind} (known: 1-5) "
                                f"or spec length {part.spec_len} (at most {MV_MAX_SPEC_BYTES})",
                                request_id=rec.request_id)
        try:
            out.structured_spec = (p + ids_end + sizeof(mv_structured))[:part.spec_len].decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"the structured spec is not valid UTF-8: {exc}",
                                request_id=rec.request_id) from None
        out.structured_kind = part.kind
    out.token_choice = (_decode_token_choice(p + choice_at, &choice, rec.request_id)
                        if h.flags & MV_SUBMIT_HAS_TOKEN_CHOICE else None)
    cdef const mv_sampling* s = &rec.sampling
    out.request_id = rec.request_id
    out.prompt_token_ids = _array(I32, n_prompt, p + sizeof(mv_submit))
    out.stop_token_ids = _array(I32, n_stop, p + sizeof(mv_submit) + 4 * n_prompt)
    out.temperature, out.top_p, out.min_p = s.temperature, s.top_p, s.min_p
    out.repetition_penalty = s.repetition_penalty
    out.presence_penalty, out.frequency_penalty = s.presence_penalty, s.frequency_penalty
    out.top_k, out.max_tokens, out.min_tokens = s.top_k, s.max_tokens, s.min_tokens
    out.logprobs, out.priority = s.logprobs, s.priority
    out.seed = s.seed if s.flags & MV_SAMPLING_HAS_SEED else None
    out.ignore_eos = (s.flags & MV_SAMPLING_IGNORE_EOS) != 0
    out.prompt_logprobs = (s.flags & MV_SAMPLING_PROMPT_LOGPROBS) != 0
    return out


cdef tuple _decode_token_choice(const char* p, const mv_token_choice* c, uint64_t request_id):
    """The arrays of the token-choice part at p (its counts in c, its size checked)."""
    cdef uint64_t nb = c.num_logit_bias, na = c.num_allowed_token_ids
    cdef uint64_t nw = c.num_bad_words, nt = c.num_bad_word_tokens
    p += sizeof(mv_token_choice)
    lens = _array(U32, nw, p + 4 * (2 * nb + na))
    if lens.sum(dtype=np.uint64) != nt or (nw and lens.min() == 0):
        raise ProtocolError(f"the {nw} bad words' lengths do not add up to the "
                            f"{nt} bad-word tokens, or one is empty", request_id=request_id)
    return (_array(I32, nb, p), _array(F32, nb, p + 4 * nb), _array(I32, na, p + 8 * nb),
            lens, _array(I32, nt, p + 4 * (2 * nb + na + nw)))


cdef struct StepShape:
    const char* p       # the record (the batch reader keeps it for its copy pass)
    uint64_t step, entries, k
    bint has_lp
    StepLayout at


cdef int _check_step(const char* p, uint64_t n, const mv_header* h, StepShape* out) except -1:
    """Fill `out` from the step output in p[0:n] (its header already checked), or raise
    ProtocolError. The shape is read once, here: the producer's memory is not trusted to hold
    still between this check and the copy."""
    cdef mv_step_output rec
    if n < sizeof(mv_step_output):
        raise ProtocolError(f"truncated step output: {n} bytes")
    if h.flags & ~MV_STEP_HAS_LOGPROBS:
        raise ProtocolError("step output with unknown flag bits set")
    memcpy(&rec, p, sizeof(mv_step_output))
    cdef uint64_t m = rec.num_entries, k = rec.num_top_logprobs
    cdef bint has_lp = (h.flags & MV_STEP_HAS_LOGPROBS) != 0
    if k > MV_MAX_TOP_LOGPROBS or (k and not has_lp):
        raise ProtocolError(f"step output announces {k} top logprobs per token")
    cdef StepLayout at = _step_layout(m, k, has_lp)
    if at.size != n:
        raise ProtocolError(f"step output of {n} bytes cannot hold the {m} entries it announces")
    out.p, out.step, out.entries, out.k, out.has_lp, out.at = p, rec.step, m, k, has_lp, at
    return 0


cdef StepOutput _step_output(const char* p, const StepShape* s):
    cdef StepOutput out = StepOutput.__new__(StepOutput)
    cdef uint64_t m = s.entries
    out.step = s.step
    out.request_ids = _array(U64, m, p + sizeof(mv_step_output))
    out.token_ids = _array(I32, m, p + s.at.tokens)
    out.finish_reasons = _array(U8, m, p + s.at.finish)
    if s.has_lp:
        out.logprobs = _array(F32, m, p + s.at.logprob)
        out.top_token_ids = _matrix(I32, m, s.k, p + s.at.top_ids)
        out.top_logprobs = _matrix(F32, m, s.k, p + s.at.top_logprobs)
    return out


cdef PromptLogprobs _decode_prompt_logprobs(const char* p, uint64_t n, mv_header h):
    cdef mv_prompt_logprobs rec
    if n < sizeof(mv_prompt_logprobs):
        raise ProtocolError(f"truncated prompt-logprobs record: {n} bytes")
    memcpy(&rec, p, sizeof(mv_prompt_logprobs))
    cdef uint64_t m = rec.num_positions, k = rec.num_top_logprobs
    if h.flags or rec.reserved or m == 0 or rec.first_position == 0 \
            or k > MV_MAX_TOP_LOGPROBS or _pad8(sizeof(mv_prompt_logprobs) + 4 * m + 8 * m * k) != n:
        raise ProtocolError(f"prompt-logprobs record of {n} bytes with flags {h.flags}, "
                            f"{m} positions from {rec.first_position} and top {k} does not add "
                            f"up", request_id=rec.request_id)
    cdef PromptLogprobs out = PromptLogprobs.__new__(PromptLogprobs)
    out.request_id, out.first_position = rec.request_id, rec.first_position
    p += sizeof(mv_prompt_logprobs)
    out.logprobs = _array(F32, m, p)
    out.top_token_ids = _matrix(I32, m, k, p + 4 * m)
    out.top_logprobs = _matrix(F32, m, k, p + 4 * m + 4 * m * k)
    return out


cdef ErrorRecord _decode_error(const char* p, uint64_t n, mv_header h):
    cdef mv_error rec
    if n < sizeof(mv_error):
        raise ProtocolError(f"truncated error record: {n} bytes")
    if h.flags & ~MV_ERROR_HAS_REQUEST:
        raise ProtocolError("error record with unknown flag bits set")
    memcpy(&rec, p, sizeof(mv_error))
    if _pad8(sizeof(mv_error) + <uint64_t>rec.message_len) != n:
        raise ProtocolError(f"error record of {n} bytes cannot hold a "
                            f"{rec.message_len}-byte message")
    message = p[sizeof(mv_error):sizeof(mv_error) + rec.message_len].decode("utf-8", "replace")
    return ErrorRecord(rec.code, message,
                       rec.request_id if h.flags & MV_ERROR_HAS_REQUEST else None)


cdef Status _decode_status(const char* p, uint64_t n, mv_header h):
    cdef mv_status rec
    if n != sizeof(mv_status) or h.flags:
        raise ProtocolError(f"a status record is {sizeof(mv_status)} bytes with no flags")
    memcpy(&rec, p, sizeof(mv_status))
    fields = <dict>rec
    del fields["header"], fields["tag"]
    return Status(rec.tag, fields)


def decode(const unsigned char[::1] buffer):
    """The record in `buffer` (a whole ZeroMQ frame); raises ProtocolError if malformed."""
    if buffer.shape[0] == 0:
        raise ProtocolError("empty frame: a record has at least a 16-byte header")
    return _decode(<const char*>&buffer[0], buffer.shape[0])


def read_record(Ring ring):
    """The next record in `ring`, None when it is empty. A malformed record is consumed and
    raises ProtocolError, so the next call reads on."""
    cdef uint32_t n
    if ring.hdr == NULL:  # closed (a cdef check: `closed` is a Python property)
        raise ValueError(f"ring {ring.name} is closed")
    cdef const char* p
    try:
        p = ring.peek(&n)
    except RingCorruptError as exc:
        raise ProtocolError(str(exc)) from None
    if p == NULL:
        return None
    try:
        return _decode(p, n)
    finally:
        ring.advance()


# ---- batched reads ----------------------------------------------------------------------------
@cython.freelist(4)
@cython.no_gc  # numeric arrays only, like StepOutput
cdef class StepBatch:
    """Consecutive step outputs read at once (`read_batch`), their entries concatenated in
    order: record r, of step steps[r], holds entries offsets[r]:offsets[r + 1]. The entry
    arrays have StepOutput's names, dtypes and shapes; the logprob arrays are None unless the
    records carry them (a batch's records all do, with one width k, or none does)."""
    cdef readonly object steps           # uint64 [R]
    cdef readonly object offsets         # int64 [R + 1]
    cdef readonly object request_ids     # uint64 [E]
    cdef readonly object token_ids       # int32 [E]
    cdef readonly object finish_reasons  # uint8 [E], MV_FINISH_*
    cdef readonly object logprobs        # float32 [E] or None
    cdef readonly object top_token_ids   # int32 [E, k] or None
    cdef readonly object top_logprobs    # float32 [E, k] or None

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return f"StepBatch({len(self.steps)} step outputs, {len(self.token_ids)} tokens)"


cdef bint _is_step(const char* p, uint64_t n, StepShape* out):
    """Whether p[0:n] is a well-formed step output (filling `out`); _decode says why not."""
    cdef mv_header h
    try:
        _check_header(p, n, &h)
        if h.kind != MV_KIND_STEP_OUTPUT:
            return False
        _check_step(p, n, &h, out)
    except ProtocolError:
        return False
    return True


cdef inline void _copy_rows(cnp.ndarray dst, uint64_t at, const char* src, uint64_t n) noexcept:
    """Rows [at, at + n) of dst from src (dst's itemsize, and row width for a matrix)."""
    cdef uint64_t row = cnp.PyArray_STRIDE(dst, 0)
    memcpy(<char*>cnp.PyArray_DATA(dst) + at * row, src, n * row)


def read_batch(Ring ring, Py_ssize_t max_records=256):
    """The step outputs at the front of `ring` as one StepBatch (up to `max_records`, while
    they share a logprobs shape); the next record itself when it is of another kind (an
    ErrorRecord, say); None when the ring is empty. A batch ends before a malformed record,
    which the next call consumes, raising ProtocolError as read_record does."""
    if ring.hdr == NULL:  # closed (a cdef check: `closed` is a Python property)
        raise ValueError(f"ring {ring.name} is closed")
    if max_records < 1:
        raise ValueError(f"max_records must be at least 1, got {max_records}")
    cdef uint64_t pos = ring.tail, end
    cdef uint32_t n
    cdef const char* p
    cdef StepShape first, nxt
    try:
        p = ring.peek_at(&pos, &n)
    except RingCorruptError as exc:
        raise ProtocolError(str(exc)) from None
    if p == NULL:
        return None
    if not _is_step(p, n, &first):
        return read_record(ring)  # decodes it, or raises and consumes it
    # Pass 1: find the batch, keeping each record's validated shape. Pass 2: one allocation
    # per array, then a copy per record. The batch takes what was published when it started,
    # which bounds the records it can hold (each has a frame header and a fixed part).
    cdef Py_ssize_t limit = min(<uint64_t>max_records, (ring.head_seen - ring.tail)
                                // (MV_FRAME_HEADER_BYTES + sizeof(mv_step_output)))
    cdef StepShape* shapes = <StepShape*>malloc(limit * sizeof(StepShape))
    if shapes == NULL:
        raise MemoryError()
    cdef Py_ssize_t count = 1
    cdef uint64_t entries = first.entries
    shapes[0] = first
    end = pos
    try:
        while count < limit:
            p = ring.peek_at(&pos, &n)  # never raises past tail: a corrupt frame ends the batch
            if p == NULL or not _is_step(p, n, &nxt) or nxt.has_lp != first.has_lp \
                    or nxt.k != first.k:
                break
            shapes[count] = nxt
            count += 1
            entries += nxt.entries
            end = pos
        out = _fill_batch(shapes, count, entries)
    finally:
        free(shapes)
    ring.consume_to(end)
    return out


cdef StepBatch _fill_batch(const StepShape* shapes, Py_ssize_t count, uint64_t entries):
    cdef StepBatch out = StepBatch.__new__(StepBatch)
    cdef cnp.ndarray steps = _empty(U64, 1, count), offsets = _empty(I64, 1, count + 1)
    cdef cnp.ndarray ids = _empty(U64, 1, entries), toks = _empty(I32, 1, entries)
    cdef cnp.ndarray fin = _empty(U8, 1, entries)
    cdef cnp.ndarray lp = None, tid = None, tlp = None
    cdef uint64_t k = shapes[0].k
    cdef bint has_lp = shapes[0].has_lp
    if has_lp:
        lp = _empty(F32, 1, entries)
        tid, tlp = _empty(I32, 2, entries, k), _empty(F32, 2, entries, k)
    cdef uint64_t* step_at = <uint64_t*>cnp.PyArray_DATA(steps)
    cdef int64_t* offset_at = <int64_t*>cnp.PyArray_DATA(offsets)
    cdef uint64_t at = 0, m
    cdef const StepShape* s
    cdef Py_ssize_t r
    for r in range(count):
        s = &shapes[r]
        m = s.entries
        step_at[r], offset_at[r] = s.step, at
        _copy_rows(ids, at, s.p + sizeof(mv_step_output), m)
        _copy_rows(toks, at, s.p + s.at.tokens, m)
        _copy_rows(fin, at, s.p + s.at.finish, m)
        if has_lp:
            _copy_rows(lp, at, s.p + s.at.logprob, m)
            if k:
                _copy_rows(tid, at, s.p + s.at.top_ids, m)
                _copy_rows(tlp, at, s.p + s.at.top_logprobs, m)
        at += m
    offset_at[count] = at
    out.steps, out.offsets, out.request_ids, out.token_ids, out.finish_reasons = \
        steps, offsets, ids, toks, fin
    out.logprobs, out.top_token_ids, out.top_logprobs = lp, tid, tlp
    return out
