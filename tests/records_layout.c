/* The record layouts as the compiler lays them out: one line a field, "struct,field,offset,size"
 * (field empty for the whole struct). tests/wire_spec.py builds and runs this program and
 * compares its table with the specification's. */
#include <stddef.h>
#include <stdio.h>

#include "minivllm_ipc.h"

typedef struct mv_field_layout {
    const char *record; /* struct name */
    const char *field;  /* "" for the whole struct */
    size_t offset;
    size_t size;
} mv_field_layout;

#define MV_STRUCT(T) {#T, "", 0, sizeof(T)}
#define MV_FIELD(T, f) {#T, #f, offsetof(T, f), sizeof(((T *)0)->f)}

static const mv_field_layout MV_LAYOUT[] = {
    MV_STRUCT(mv_header),
    MV_FIELD(mv_header, magic), MV_FIELD(mv_header, version), MV_FIELD(mv_header, kind),
    MV_FIELD(mv_header, size), MV_FIELD(mv_header, flags),
    MV_STRUCT(mv_sampling),
    MV_FIELD(mv_sampling, temperature), MV_FIELD(mv_sampling, top_p),
    MV_FIELD(mv_sampling, min_p), MV_FIELD(mv_sampling, repetition_penalty),
    MV_FIELD(mv_sampling, presence_penalty), MV_FIELD(mv_sampling, frequency_penalty),
    MV_FIELD(mv_sampling, top_k), MV_FIELD(mv_sampling, max_tokens),
    MV_FIELD(mv_sampling, min_tokens), MV_FIELD(mv_sampling, logprobs),
    MV_FIELD(mv_sampling, seed), MV_FIELD(mv_sampling, flags), MV_FIELD(mv_sampling, priority),
    MV_STRUCT(mv_submit),
    MV_FIELD(mv_submit, header), MV_FIELD(mv_submit, request_id), MV_FIELD(mv_submit, sampling),
    MV_FIELD(mv_submit, num_prompt_tokens), MV_FIELD(mv_submit, num_stop_token_ids),
    MV_STRUCT(mv_structured),
    MV_FIELD(mv_structured, kind), MV_FIELD(mv_structured, spec_len),
    MV_STRUCT(mv_token_choice),
    MV_FIELD(mv_token_choice, num_logit_bias), MV_FIELD(mv_token_choice, num_allowed_token_ids),
    MV_FIELD(mv_token_choice, num_bad_words), MV_FIELD(mv_token_choice, num_bad_word_tokens),
    MV_STRUCT(mv_prompt_logprobs),
    MV_FIELD(mv_prompt_logprobs, header), MV_FIELD(mv_prompt_logprobs, request_id),
    MV_FIELD(mv_prompt_logprobs, first_position), MV_FIELD(mv_prompt_logprobs, num_positions),
    MV_FIELD(mv_prompt_logprobs, num_top_logprobs), MV_FIELD(mv_prompt_logprobs, reserved),
    MV_STRUCT(mv_abort),
    MV_FIELD(mv_abort, header), MV_FIELD(mv_abort, request_id),
    MV_STRUCT(mv_step_output),
    MV_FIELD(mv_step_output, header), MV_FIELD(mv_step_output, step),
    MV_FIELD(mv_step_output, num_entries), MV_FIELD(mv_step_output, num_top_logprobs),
    MV_STRUCT(mv_error),
    MV_FIELD(mv_error, header), MV_FIELD(mv_error, request_id), MV_FIELD(mv_error, code),
    MV_FIELD(mv_error, message_len),
    MV_STRUCT(mv_status_query),
    MV_FIELD(mv_status_query, header), MV_FIELD(mv_status_query, tag),
    MV_STRUCT(mv_status),
    MV_FIELD(mv_status, header), MV_FIELD(mv_status, tag), MV_FIELD(mv_status, state),
    MV_FIELD(mv_status, pid), MV_FIELD(mv_status, max_message_bytes),
    MV_FIELD(mv_status, max_model_len), MV_FIELD(mv_status, vocab_size),
    MV_FIELD(mv_status, max_in_flight_per_peer), MV_FIELD(mv_status, max_in_flight),
    MV_FIELD(mv_status, peer_in_flight), MV_FIELD(mv_status, zmq_in_flight),
    MV_FIELD(mv_status, zmq_peers), MV_FIELD(mv_status, running),
    MV_FIELD(mv_status, waiting), MV_FIELD(mv_status, num_blocks),
    MV_FIELD(mv_status, free_blocks), MV_FIELD(mv_status, step),
    MV_FIELD(mv_status, requests), MV_FIELD(mv_status, finished),
    MV_FIELD(mv_status, aborted), MV_FIELD(mv_status, errors),
    MV_FIELD(mv_status, overloaded), MV_FIELD(mv_status, prompt_tokens),
    MV_FIELD(mv_status, generation_tokens), MV_FIELD(mv_status, preemptions),
    MV_FIELD(mv_status, prefix_queries), MV_FIELD(mv_status, prefix_hits),
    MV_FIELD(mv_status, step_p99_s),
};

int main(void) {
    for (size_t i = 0; i < sizeof(MV_LAYOUT) / sizeof(MV_LAYOUT[0]); i++)
        printf("%s,%s,%zu,%zu\n", MV_LAYOUT[i].record, MV_LAYOUT[i].field, MV_LAYOUT[i].offset,
               MV_LAYOUT[i].size);
    return 0;
}
