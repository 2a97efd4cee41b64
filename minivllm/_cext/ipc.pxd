# cython: language_level=3
"""ipc/minivllm_ipc.h for Cython: the wire contract's structs and codes, declared, not restated.

The values live in the header alone; the record codecs (csrc/records.pyx) and the scheduler
(csrc/scheduler.pyx, finish codes) cimport them from here, and records.pyx exports them to Python.
"""
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t


cdef extern from "minivllm_ipc.h" nogil:
    uint32_t MV_MAGIC, MV_VERSION, MV_MIN_VERSION
    uint32_t MV_KIND_SUBMIT, MV_KIND_ABORT, MV_KIND_STEP_OUTPUT, MV_KIND_ERROR
    uint32_t MV_KIND_STATUS_QUERY, MV_KIND_STATUS, MV_STATE_READY, MV_STATE_DRAINING
    uint32_t MV_MAX_RECORD_BYTES, MV_MAX_TOP_LOGPROBS
    uint32_t MV_SAMPLING_HAS_SEED, MV_SAMPLING_IGNORE_EOS, MV_SUBMIT_HAS_STRUCTURED
    uint32_t MV_SUBMIT_HAS_TOKEN_CHOICE, MV_SAMPLING_PROMPT_LOGPROBS, MV_KIND_PROMPT_LOGPROBS
    uint32_t MV_STRUCTURED_JSON, MV_STRUCTURED_REGEX, MV_STRUCTURED_CHOICE, MV_STRUCTURED_GRAMMAR
    uint32_t MV_STRUCTURED_JSON_OBJECT, MV_MAX_SPEC_BYTES
    uint32_t MV_STEP_HAS_LOGPROBS, MV_ERROR_HAS_REQUEST
    uint32_t MV_FINISH_NONE, MV_FINISH_STOP, MV_FINISH_LENGTH, MV_FINISH_ABORT
    uint32_t MV_ERR_MALFORMED, MV_ERR_INVALID_REQUEST, MV_ERR_DUPLICATE_ID, MV_ERR_OVERLOADED
    uint32_t MV_ERR_DRAINING, MV_ERR_INTERNAL
    ctypedef struct mv_header:
        uint32_t magic
        uint16_t version
        uint16_t kind
        uint32_t size
        uint32_t flags
    ctypedef struct mv_sampling:
        double temperature, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty
        int32_t top_k, max_tokens, min_tokens, logprobs
        uint64_t seed
        uint32_t flags
        int32_t priority
    ctypedef struct mv_submit:
        mv_header header
        uint64_t request_id
        mv_sampling sampling
        uint32_t num_prompt_tokens
        uint32_t num_stop_token_ids
    ctypedef struct mv_structured:
        uint32_t kind
        uint32_t spec_len
    ctypedef struct mv_token_choice:
        uint32_t num_logit_bias, num_allowed_token_ids, num_bad_words, num_bad_word_tokens
    ctypedef struct mv_prompt_logprobs:
        mv_header header
        uint64_t request_id
        uint32_t first_position, num_positions, num_top_logprobs, reserved
    ctypedef struct mv_abort:
        mv_header header
        uint64_t request_id
    ctypedef struct mv_step_output:
        mv_header header
        uint64_t step
        uint32_t num_entries
        uint32_t num_top_logprobs
    ctypedef struct mv_error:
        mv_header header
        uint64_t request_id
        uint32_t code
        uint32_t message_len
    ctypedef struct mv_status_query:
        mv_header header
        uint64_t tag
    ctypedef struct mv_status:
        mv_header header
        uint64_t tag
        uint32_t state, pid, max_message_bytes, max_model_len, vocab_size
        uint32_t max_in_flight_per_peer, max_in_flight, peer_in_flight, zmq_in_flight
        uint32_t zmq_peers, running, waiting, num_blocks, free_blocks
        uint64_t step, requests, finished, aborted, errors, overloaded, prompt_tokens
        uint64_t generation_tokens, preemptions, prefix_queries, prefix_hits
        double step_p99_s
