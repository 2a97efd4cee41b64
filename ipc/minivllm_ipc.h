/* minivllm wire contract, version 3: every record that crosses a process boundary.
 *
 * The same bytes travel in the shared-memory rings (one record per ring frame) and as ZeroMQ
 * frames at the endpoint for other languages. ipc/PROTOCOL.md documents every field; the
 * Cython codecs (csrc/records.pyx) include this header, and minivllm/transport/protocol.py
 * checks these sizes and offsets at import.
 *
 * All integers and floats are little-endian. Every struct is naturally aligned with explicit
 * padding, and every record's total size is a multiple of 8, so records can be read in place
 * from an 8-aligned buffer.
 */
#ifndef MINIVLLM_IPC_H
#define MINIVLLM_IPC_H

#include <stddef.h>
#include <stdint.h>

#define MV_MAGIC 0x5049564Du /* the bytes "MVIP" */
#define MV_VERSION 3u     /* what writers write */
#define MV_MIN_VERSION 1u /* the oldest a reader takes: each version adds an optional submit part */

/* Record kinds (mv_header.kind). */
#define MV_KIND_SUBMIT 1u      /* frontend -> engine: a new request */
#define MV_KIND_ABORT 2u       /* frontend -> engine: stop a request */
#define MV_KIND_STEP_OUTPUT 3u /* engine -> frontend: the new tokens of one engine step */
#define MV_KIND_ERROR 4u       /* either way: a record could not be served */
#define MV_KIND_STATUS_QUERY 5u /* client -> engine: ask for the engine's status */
#define MV_KIND_STATUS 6u       /* engine -> client: health, limits and counters */
#define MV_KIND_PROMPT_LOGPROBS 7u /* engine -> client: prompt positions' logprobs (version 3) */

/* Hard bounds a decoder enforces before trusting a count. */
#define MV_MAX_RECORD_BYTES (64u << 20)
#define MV_MAX_TOP_LOGPROBS 20u

typedef struct mv_header {
    uint32_t magic;   /* MV_MAGIC */
    uint16_t version; /* MV_VERSION */
    uint16_t kind;    /* MV_KIND_* */
    uint32_t size;    /* bytes of the whole record, header and padding included; multiple of 8 */
    uint32_t flags;   /* kind-specific bits, below; unknown bits must be 0 */
} mv_header;

/* mv_sampling.flags */
#define MV_SAMPLING_HAS_SEED 1u
#define MV_SAMPLING_IGNORE_EOS 2u
#define MV_SAMPLING_PROMPT_LOGPROBS 4u /* the prompt's logprobs too, top-N as logprobs (v3) */

typedef struct mv_sampling {
    /* Doubles, not floats: the engine rebuilds exactly the values the client sent, so a
     * seeded request samples the same tokens served as offline. */
    double temperature;        /* 0 = greedy */
    double top_p;              /* (0, 1] */
    double min_p;              /* [0, 1] */
    double repetition_penalty; /* > 0, 1 = off */
    double presence_penalty;   /* [-2, 2] */
    double frequency_penalty;  /* [-2, 2] */
    int32_t top_k;             /* -1 = off, else >= 1 */
    int32_t max_tokens;        /* >= 1, or 0 = until the context is full */
    int32_t min_tokens;        /* >= 0 */
    int32_t logprobs;          /* -1 = none, else top-N in [0, 20] */
    uint64_t seed;             /* used when MV_SAMPLING_HAS_SEED */
    uint32_t flags;            /* MV_SAMPLING_* */
    int32_t priority;          /* lower is served first under the priority policy */
} mv_sampling;

/* mv_submit header.flags */
#define MV_SUBMIT_HAS_STRUCTURED 1u   /* an mv_structured part follows (version 2) */
#define MV_SUBMIT_HAS_TOKEN_CHOICE 2u /* then an mv_token_choice part (version 3) */

/* MV_KIND_SUBMIT. Followed by int32 prompt_token_ids[num_prompt_tokens], then int32
 * stop_token_ids[num_stop_token_ids], then zero padding to a multiple of 8; then, with
 * MV_SUBMIT_HAS_STRUCTURED, an mv_structured part; then, with MV_SUBMIT_HAS_TOKEN_CHOICE, an
 * mv_token_choice part. */
typedef struct mv_submit {
    mv_header header;
    uint64_t request_id; /* chosen by the sender, unique among its unfinished requests */
    mv_sampling sampling;
    uint32_t num_prompt_tokens;  /* >= 1 */
    uint32_t num_stop_token_ids;
} mv_submit;

/* The optional part of a submit: a constraint on the output (structured outputs). Followed by
 * spec_len bytes of UTF-8 (no terminator), zero padded to a multiple of 8. */
typedef struct mv_structured {
    uint32_t kind;     /* MV_STRUCTURED_* */
    uint32_t spec_len; /* <= MV_MAX_SPEC_BYTES */
} mv_structured;

#define MV_STRUCTURED_JSON 1u        /* spec: a JSON schema, as JSON text */
#define MV_STRUCTURED_REGEX 2u       /* spec: a regular expression the whole output matches */
#define MV_STRUCTURED_CHOICE 3u      /* spec: a JSON array of the strings the output is one of */
#define MV_STRUCTURED_GRAMMAR 4u     /* spec: an EBNF grammar (xgrammar's dialect), rule root */
#define MV_STRUCTURED_JSON_OBJECT 5u /* spec: empty; the output is any JSON object */
#define MV_MAX_SPEC_BYTES (1u << 20)

/* The optional part of a submit that narrows the tokens the sampler may choose (OpenAI's
 * logit_bias, vLLM's allowed_token_ids and bad_words). Followed by int32
 * bias_token_ids[num_logit_bias], float bias[num_logit_bias], int32
 * allowed_token_ids[num_allowed_token_ids], uint32 bad_word_lens[num_bad_words], int32
 * bad_word_token_ids[num_bad_word_tokens] (the words one after the other), then zero padding to
 * a multiple of 8. */
typedef struct mv_token_choice {
    uint32_t num_logit_bias;        /* biases in [-100, 100], added to those tokens' logits */
    uint32_t num_allowed_token_ids; /* 0: every token may be sampled */
    uint32_t num_bad_words;         /* token sequences never generated */
    uint32_t num_bad_word_tokens;   /* the sum of bad_word_lens */
} mv_token_choice;

/* MV_KIND_ABORT. */
typedef struct mv_abort {
    mv_header header;
    uint64_t request_id;
} mv_abort;

/* mv_step_output header.flags */
#define MV_STEP_HAS_LOGPROBS 1u

/* MV_KIND_STEP_OUTPUT: one entry per new token. Followed by these arrays, each starting on an
 * 8-byte boundary (zero padding between them), n = num_entries, k = num_top_logprobs:
 *   uint64 request_id[n]
 *   int32  token_id[n]
 *   uint8  finish_reason[n]      MV_FINISH_*
 * and, when header.flags has MV_STEP_HAS_LOGPROBS:
 *   float  logprob[n]            the sampled token's; NaN for a request that asked none
 *   int32  top_token_id[n * k]   row-major; -1 past what a request asked
 *   float  top_logprob[n * k]
 */
typedef struct mv_step_output {
    mv_header header;
    uint64_t step;             /* the engine's step counter */
    uint32_t num_entries;
    uint32_t num_top_logprobs; /* k; 0 when no entry asked for top logprobs */
} mv_step_output;

#define MV_FINISH_NONE 0u   /* still running */
#define MV_FINISH_STOP 1u   /* EOS or a stop token id */
#define MV_FINISH_LENGTH 2u /* max_tokens or the context limit */
#define MV_FINISH_ABORT 3u  /* aborted by the client or by the engine */

/* MV_KIND_PROMPT_LOGPROBS (version 3): the logprobs of prompt positions first_position ..
 * first_position + n - 1 of a request that asked (each position's prompt token given the tokens
 * before it), sent before the step output of the step whose prefill computed them. Followed by
 * float logprob[n], int32 top_token_id[n * k] and float top_logprob[n * k] (row-major), then
 * zero padding to a multiple of 8. */
typedef struct mv_prompt_logprobs {
    mv_header header;
    uint64_t request_id;
    uint32_t first_position;   /* >= 1: position 0 has no context */
    uint32_t num_positions;    /* n >= 1 */
    uint32_t num_top_logprobs; /* k <= MV_MAX_TOP_LOGPROBS */
    uint32_t reserved;         /* 0 */
} mv_prompt_logprobs;

/* mv_error header.flags */
#define MV_ERROR_HAS_REQUEST 1u /* request_id names the request that failed (it is finished) */

/* MV_KIND_ERROR. Followed by message_len bytes of UTF-8 (no terminator), zero padded to 8. */
typedef struct mv_error {
    mv_header header;
    uint64_t request_id;
    uint32_t code; /* MV_ERR_* */
    uint32_t message_len;
} mv_error;

#define MV_ERR_MALFORMED 1u        /* bytes that are no valid record (magic, version, sizes) */
#define MV_ERR_INVALID_REQUEST 2u  /* a field out of range, an empty or too long prompt */
#define MV_ERR_DUPLICATE_ID 3u     /* the request id is already in flight */
#define MV_ERR_OVERLOADED 4u       /* too many requests pending; retry later */
#define MV_ERR_DRAINING 5u         /* the engine is shutting down and takes no new requests */
#define MV_ERR_INTERNAL 6u         /* the engine failed serving this request */

/* MV_KIND_STATUS_QUERY: answered with one MV_KIND_STATUS carrying the same tag. */
typedef struct mv_status_query {
    mv_header header;
    uint64_t tag; /* chosen by the sender, echoed */
} mv_status_query;

#define MV_STATE_READY 1u    /* takes new requests */
#define MV_STATE_DRAINING 2u /* finishes those in flight, refuses new ones (MV_ERR_DRAINING) */

/* MV_KIND_STATUS: the engine's health, the limits it holds its clients to, and its counters
 * (counters since the engine process started). */
typedef struct mv_status {
    mv_header header;
    uint64_t tag;                    /* the query's */
    uint32_t state;                  /* MV_STATE_* */
    uint32_t pid;                    /* the engine process */
    uint32_t max_message_bytes;      /* the largest frame the engine reads; larger: disconnected */
    uint32_t max_model_len;          /* prompt + generated tokens of one request */
    uint32_t vocab_size;             /* token ids are in [0, vocab_size) */
    uint32_t max_in_flight_per_peer; /* unfinished requests of one connection; past: OVERLOADED */
    uint32_t max_in_flight;          /* unfinished requests of all connections; past: OVERLOADED */
    uint32_t peer_in_flight;         /* this connection's unfinished requests */
    uint32_t zmq_in_flight;          /* all connections' unfinished requests */
    uint32_t zmq_peers;              /* connections with requests in flight */
    uint32_t running;                /* requests the scheduler runs (every client's) */
    uint32_t waiting;                /* requests waiting for KV blocks or a batch slot */
    uint32_t num_blocks;             /* KV-cache blocks */
    uint32_t free_blocks;
    uint64_t step;                   /* engine steps so far */
    uint64_t requests;               /* requests admitted */
    uint64_t finished;
    uint64_t aborted;
    uint64_t errors;                 /* submits refused as invalid */
    uint64_t overloaded;             /* submits refused with MV_ERR_OVERLOADED */
    uint64_t prompt_tokens;
    uint64_t generation_tokens;
    uint64_t preemptions;
    uint64_t prefix_queries;         /* KV blocks looked up in the prefix cache */
    uint64_t prefix_hits;
    double step_p99_s;               /* p99 of the recent steps' durations, seconds */
} mv_status;

/* Layout checks: a compiler that pads differently fails here, not on the wire. */
#define MV_STATIC_ASSERT(cond, msg) typedef char mv_static_assert_##msg[(cond) ? 1 : -1]
MV_STATIC_ASSERT(sizeof(mv_header) == 16, header_size);
MV_STATIC_ASSERT(sizeof(mv_sampling) == 80, sampling_size);
MV_STATIC_ASSERT(sizeof(mv_submit) == 112, submit_size);
MV_STATIC_ASSERT(offsetof(mv_submit, sampling) == 24, submit_sampling_offset);
MV_STATIC_ASSERT(sizeof(mv_structured) == 8, structured_size);
MV_STATIC_ASSERT(sizeof(mv_token_choice) == 16, token_choice_size);
MV_STATIC_ASSERT(sizeof(mv_prompt_logprobs) == 40, prompt_logprobs_size);
MV_STATIC_ASSERT(sizeof(mv_abort) == 24, abort_size);
MV_STATIC_ASSERT(sizeof(mv_step_output) == 32, step_output_size);
MV_STATIC_ASSERT(sizeof(mv_error) == 32, error_size);
MV_STATIC_ASSERT(sizeof(mv_status_query) == 24, status_query_size);
MV_STATIC_ASSERT(sizeof(mv_status) == 176, status_size);

#endif /* MINIVLLM_IPC_H */
