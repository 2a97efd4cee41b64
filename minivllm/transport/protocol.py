"""The wire contract from Python's side: the record codecs and codes of ipc/minivllm_ipc.h.

Everything here comes from the header through the compiled codecs (csrc/records.pyx); nothing is
typed again in Python. The tests hold the header, the compiled layout and ipc/PROTOCOL.md to
one another (tests/wire_spec.py, tests/test_protocol_doc.py).
"""
from __future__ import annotations

from minivllm._cext.records import (  # noqa: F401
    ERR_DRAINING, ERR_DUPLICATE_ID, ERR_INTERNAL, ERR_INVALID_REQUEST, ERR_MALFORMED,
    ERR_OVERLOADED, ERROR_HAS_REQUEST, FINISH_ABORT, FINISH_LENGTH, FINISH_NONE,
    FINISH_REASONS, FINISH_STOP, KIND_ABORT, KIND_ERROR, KIND_PROMPT_LOGPROBS, KIND_STATUS,
    KIND_STATUS_QUERY, SAMPLING_PROMPT_LOGPROBS, PromptLogprobs, encode_prompt_logprobs,
    put_prompt_logprobs,
    KIND_STEP_OUTPUT, KIND_SUBMIT, MAGIC, MAX_RECORD_BYTES, MAX_SPEC_BYTES, MIN_VERSION,
    SAMPLING_HAS_SEED, SAMPLING_IGNORE_EOS, STATE_DRAINING, STATE_READY, STEP_HAS_LOGPROBS,
    STRUCTURED_KINDS, SUBMIT_FIXED_BYTES, SUBMIT_HAS_STRUCTURED, SUBMIT_HAS_TOKEN_CHOICE,
    VERSION, Abort, ErrorRecord,
    ProtocolError, Status, StatusQuery, StepBatch, StepOutput, Submit, decode, encode_abort,
    encode_error, encode_status, encode_status_query, encode_step_output, encode_submit,
    put_abort, put_error, put_status, put_status_query, put_step_output, put_submit, read_batch,
    read_record)
