"""End to end on CPU: our engine against Hugging Face transformers with the same weights."""
from __future__ import annotations

import random

import pytest
import torch
import transformers

from minivllm import LLM, SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _save_tiny(tmp_path, kind: str, tie: bool) -> str:
    torch.manual_seed(1234)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tie, rope_theta=10000.0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    path = tmp_path / f"tiny-{kind}-{'tied' if tie else 'untied'}"
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def _hf_greedy(path_or_model, prompts: list[list[int]], max_new: int,
               stop_at_eos: bool = False, min_new: int = 0) -> list[list[int]]:
    """transformers' greedy tokens; like our ignore_eos, EOS is not masked, only not a stop."""
    model = path_or_model
    if isinstance(model, str):
        model = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    config = transformers.GenerationConfig(
        max_new_tokens=max_new, min_new_tokens=min_new, do_sample=False, pad_token_id=0,
        eos_token_id=model.generation_config.eos_token_id if stop_at_eos or min_new else None)
    outs = []
    with torch.no_grad():
        for ids in prompts:  # one at a time: no padding effects in the oracle
            gen = model.generate(torch.tensor([ids]), generation_config=config)
            outs.append(gen[0, len(ids):].tolist())
    return outs


def _random_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 60))] for _ in range(n)]


@pytest.mark.parametrize("kind,tie", [("llama", False), ("llama", True), ("qwen2", False),
                                      ("qwen2", True)])
def test_tiny_models_match_transformers(tmp_path, kind, tie):
    path = _save_tiny(tmp_path, kind, tie)
    prompts = _random_prompts(6, 512)
    want = _hf_greedy(path, prompts, 24)
    llm = LLM(path, dtype="float32", block_size=4, num_blocks=256, max_num_batched_tokens=64)
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want


def test_tiny_model_logprobs_close_to_transformers(tmp_path):
    path = _save_tiny(tmp_path, "llama", False)
    prompt = _random_prompts(1, 512, seed=5)[0]
    llm = LLM(path, dtype="float32", num_blocks=64)
    out = llm.generate([prompt], SamplingParams(max_tokens=8, logprobs=5, **GREEDY),
                       use_tqdm=False)[0].outputs[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1]
    ref = torch.log_softmax(logits.float(), dim=-1)
    for step, row in enumerate(out.logprobs):
        for token, lp in row.items():
            assert abs(lp - ref[step, token].item()) < 1e-4  # fp32, same op order up to GEMM blocking


@pytest.fixture(scope="module")
def smollm():
    return LLM(dtype="float32")


@pytest.fixture(scope="module")
def hf_smollm(smollm):
    from minivllm.loader.embedded import embedded_gguf_path
    import os
    path = embedded_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "What colour is the sky?"}],
    [{"role": "user", "content": "List three prime numbers."}],
]


def test_smollm2_gguf_matches_transformers(smollm, hf_smollm):
    tok = smollm.get_tokenizer()
    prompts = [tok.encode(tok.apply_chat_template(c)) for c in CHATS]
    want = _hf_greedy(hf_smollm, prompts, 48, stop_at_eos=True)
    outs = smollm.generate(prompts, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want


def test_min_tokens_masks_eos_as_transformers_min_new_tokens(smollm, hf_smollm):
    """min_tokens masks EOS until reached, with ignore_eos or without, as transformers'
    min_new_tokens (and vLLM) do; ignore_eos only keeps a later EOS from ending the request."""
    tok = smollm.get_tokenizer()
    short_answers = [CHATS[2], [{"role": "user", "content": "Hi!"}],
                     [{"role": "system", "content": "You answer in one word."},
                      {"role": "user", "content": "Say yes."}]]
    prompts = [tok.encode(tok.apply_chat_template(c)) for c in short_answers]
    eos = hf_smollm.generation_config.eos_token_id
    short = smollm.generate(prompts, SamplingParams(temperature=0, max_tokens=12),
                            use_tqdm=False)
    assert all(o.outputs[0].token_ids[-1] == eos for o in short)  # all end before 12
    want = _hf_greedy(hf_smollm, prompts, 12, min_new=12)
    held = smollm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, min_tokens=12,
                                                   ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in held] == want
    assert all(eos not in o.outputs[0].token_ids for o in held)
    want = _hf_greedy(hf_smollm, prompts, 24, min_new=8)
    stopped = smollm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, min_tokens=8),
                              use_tqdm=False)
    assert [o.outputs[0].token_ids for o in stopped] == want


def test_bad_words_as_text(smollm):
    """bad_words are tokenized as vLLM does (alone and after a space): the word never comes."""
    params = dict(temperature=0, max_tokens=12)
    free = smollm.chat(CHATS[0], SamplingParams(**params), use_tqdm=False)[0].outputs[0]
    assert "Paris" in free.text
    banned = smollm.chat(CHATS[0], SamplingParams(bad_words=["Paris"], **params),
                         use_tqdm=False)[0].outputs[0]
    assert "Paris" not in banned.text and banned.text != free.text


def test_embedded_model_answers_chat_coherently(smollm):
    out = smollm.chat(CHATS[0], SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert "Paris" in comp.text
    assert comp.finish_reason == "stop"  # it ends its answer with <|im_end|>


def test_batch_invariance_chunking_and_prefix_cache(tmp_path):
    """A prompt's greedy output is the same alone, batched with others, chunked, or cached."""
    path = _save_tiny(tmp_path, "llama", False)
    prompts = _random_prompts(8, 512, seed=3)
    prompts.append(prompts[0][:40] + prompts[1])  # shares a prefix with prompt 0
    params = SamplingParams(max_tokens=16, **GREEDY)
    base = LLM(path, dtype="float32", block_size=4, num_blocks=512, enable_prefix_caching=False)
    alone = [base.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    for opts in [dict(), dict(max_num_batched_tokens=16), dict(policy="prefill-first"),
                 dict(max_num_seqs=3)]:
        llm = LLM(path, dtype="float32", block_size=4, num_blocks=512, **opts)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == alone, opts
        again = llm.generate(prompts, params, use_tqdm=False)  # now served from the prefix cache
        assert [o.outputs[0].token_ids for o in again] == alone, opts
        assert max(o.num_cached_tokens for o in again) > 0


def test_kv_budget_too_small_preempts_and_still_matches(tmp_path):
    path = _save_tiny(tmp_path, "qwen2", False)
    prompts = _random_prompts(6, 512, seed=9)
    params = SamplingParams(max_tokens=40, **GREEDY)
    roomy = LLM(path, dtype="float32", block_size=4, num_blocks=512)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    tight = LLM(path, dtype="float32", block_size=4, num_blocks=40)  # 160 tokens for ~500 needed
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.allocator.num_used_blocks == 0


def test_async_scheduling_gives_the_same_outputs(tmp_path):
    """The overlap loop (step k's tokens applied after step k+1 is launched) changes no output:
    greedy and seeded sampling with penalties, logprobs, stop ids, one-token requests, n > 1,
    roomy and preempting KV budgets; and it leaves no block or request behind."""
    path = _save_tiny(tmp_path, "llama", False)
    prompts = _random_prompts(8, 512, seed=4)
    stops = list(range(3, 60))  # ~11% of a random model's tokens: stops at varied steps
    params = [SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=stops),
              SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=7, max_tokens=25, logprobs=3,
                             stop_token_ids=stops),
              SamplingParams(temperature=0.8, top_k=50, seed=1, max_tokens=20, n=2,
                             repetition_penalty=1.2, presence_penalty=0.5, ignore_eos=True),
              ] * 2
    for num_blocks in (512, 40):
        outs = {}
        for overlap in (False, True):
            llm = LLM(path, dtype="float32", block_size=4, num_blocks=num_blocks, max_num_seqs=4,
                      async_scheduling=overlap)
            assert llm.engine.overlap is overlap
            outs[overlap] = [[(c.token_ids, c.finish_reason, c.logprobs) for c in o.outputs]
                             for o in llm.generate(prompts, params, use_tqdm=False)]
            assert not llm.engine.has_unfinished()
            assert llm.engine.allocator.num_used_blocks == 0
        assert outs[True] == outs[False], num_blocks
        assert {c[1] for o in outs[True] for c in o} == {"stop", "length"}


def test_async_scheduling_abort_in_flight(tmp_path):
    """Aborting a request whose token is in flight drops that token; its index comes back only
    after the step resolves, and nothing leaks."""
    path = _save_tiny(tmp_path, "qwen2", False)
    llm = LLM(path, dtype="float32", block_size=4, num_blocks=64, max_num_seqs=3,
              async_scheduling=True)
    core = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i, p in enumerate(_random_prompts(5, 512, seed=6)):
        core.add_request(i, p, params)
    seen: dict[int, list[int]] = {}

    def step() -> None:
        out = core.step()
        for owner, token in zip(out.owners.tolist(), out.token_ids.tolist()):
            seen.setdefault(owner, []).append(token)
    for _ in range(3):
        step()
    assert core.abort_request(0) and core.abort_request(1) and core.abort_request(4)
    count_at_abort = {i: len(seen.get(i, [])) for i in (0, 1)}
    while core.has_unfinished():
        step()
    assert {i: len(seen.get(i, [])) for i in (0, 1)} == count_at_abort
    assert 4 not in seen and len(seen[2]) == len(seen[3]) == 12
    assert core.allocator.num_used_blocks == 0 and not core.scheduler.requests
    again = llm.generate(_random_prompts(3, 512, seed=6)[:3], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in again] == [12, 12, 12]  # every index is back


def test_stop_rules(smollm):
    tok = smollm.get_tokenizer()
    free = smollm.generate("The numbers: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=20,
                                                                   ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    stop_id = free.token_ids[3]
    by_id = smollm.generate("The numbers: 1, 2, 3,", SamplingParams(
        temperature=0, max_tokens=20, stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert by_id.token_ids == free.token_ids[:free.token_ids.index(stop_id) + 1]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == stop_id
    stop_str = tok.decode(free.token_ids[5:7]).strip()
    by_str = smollm.generate("The numbers: 1, 2, 3,", SamplingParams(
        temperature=0, max_tokens=20, stop=[stop_str]), use_tqdm=False)[0].outputs[0]
    assert by_str.finish_reason == "stop" and stop_str not in by_str.text
    assert free.text.startswith(by_str.text)
    held = smollm.generate("The numbers: 1, 2, 3,", SamplingParams(
        temperature=0, max_tokens=20, min_tokens=20, stop_token_ids=[stop_id]),
        use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) == 20  # min_tokens masks stop ids until reached


def test_seeded_sampling_reproducible_in_any_batch(smollm):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=24, ignore_eos=True)
    alone = smollm.generate("Once upon a time", p, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.7, max_tokens=30, ignore_eos=True)
    batch = smollm.generate(["Hello", "Once upon a time", "The sea"], [others, p, others],
                            use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    unseeded = smollm.generate("Once upon a time", SamplingParams(
        temperature=1.0, max_tokens=24, ignore_eos=True, n=3), use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in unseeded.outputs}) > 1


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"),
    (dict(top_k=-2), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(min_p=2), "min_p"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(repetition_penalty=0), "repetition"),
    (dict(logprobs=-1), "logprobs"), (dict(n=0), "n"), (dict(min_tokens=5, max_tokens=2),
                                                         "min_tokens"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_engine_input(smollm, tmp_path):
    with pytest.raises(ValueError, match="context"):
        smollm.generate([[5] * 9000], use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        smollm.generate([[]], use_tqdm=False)
    with pytest.raises(ValueError, match="token ids"):
        smollm.generate([[5, 10**9]], use_tqdm=False)
    assert not smollm.engine.has_unfinished()  # a rejected call leaves nothing queued
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="dtype"):
        LLM(dtype="float64")
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM(max_num_seq=3)
