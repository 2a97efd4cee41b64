"""The parts of vLLM's API surface its users' tools rely on, on tiny random models (fast to
load): the model's generation config as default sampling (--generation-config), the token
choice (logit_bias, allowed_token_ids, bad words) on each device, and prompt logprobs."""
import json

import httpx
import pytest
import torch
import transformers

from bench.server_proc import ServeProcess
from minivllm import LLM, SamplingParams

# top_k 1 makes the defaults greedy; the penalty changes what a tiny random model repeats.
GENERATION_CONFIG = {"top_k": 1, "repetition_penalty": 1.5, "bos_token_id": 1}
AS_SET = dict(top_k=1, repetition_penalty=1.5)


@pytest.fixture(scope="module")
def model_dir(tiny_hf_dir):
    return tiny_hf_dir("llama")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("genconf") / "generation_config.json"
    path.write_text(json.dumps(GENERATION_CONFIG))
    return str(path)


def test_generation_config_defaults_offline(model_dir, config_file, tmp_path):
    llm = LLM(model_dir, dtype="float32", num_blocks=64, generation_config=config_file)
    assert llm.get_default_sampling_params() == SamplingParams(**AS_SET)
    prompt = "The numbers are"
    assert llm.generate(prompt, use_tqdm=False)[0].outputs[0].token_ids == \
        llm.generate(prompt, SamplingParams(**AS_SET), use_tqdm=False)[0].outputs[0].token_ids
    plain = LLM(model_dir, dtype="float32", num_blocks=64, generation_config="vllm")
    assert plain.get_default_sampling_params() == SamplingParams()
    with pytest.raises(ValueError, match="generation_config"):
        LLM(model_dir, generation_config=str(tmp_path / "missing.json"))
    bad = tmp_path / "generation_config.json"
    bad.write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match="generation_config.*temperature"):
        LLM(model_dir, dtype="float32", num_blocks=64, generation_config=str(tmp_path))


def test_generation_config_defaults_served(model_dir, config_file):
    srv = ServeProcess([model_dir, "--dtype", "float32", "--num-blocks", "64",
                        "--generation-config", config_file], env={"MINIVLLM_LOG_LEVEL": "INFO"})
    try:
        def complete(**fields) -> list[int]:
            body = {"prompt": "The numbers are", "max_tokens": 16, "ignore_eos": True,
                    "logprobs": 0, **fields}
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["logprobs"]["tokens"]
        defaults = complete()
        assert defaults == complete(**AS_SET)  # unset fields take the file's values
        assert defaults != complete(top_k=1, repetition_penalty=1.0)  # a set field wins
        log = "".join(srv.stderr)
        assert "default sampling from " + config_file in log and "top_k=1" in log
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_token_choice_in_the_sampler(tiny_token_model, device):
    llm = LLM(tiny_token_model("llama"), dtype="float32", device=device, num_blocks=64)
    prompt = [5, 17, 300, 42]

    def tokens(**choice) -> list[int]:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, **choice)
        return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    greedy = tokens()
    first = greedy[0]
    assert tokens(logit_bias={first: -100})[0] != first  # -100 on the greedy token moves it
    forced = next(t for t in range(10, 20) if t not in greedy)
    assert tokens(logit_bias={forced: 100}) == [forced] * 8  # +100 forces a token
    assert set(tokens(allowed_token_ids=[forced, forced + 1])) <= {forced, forced + 1}
    assert first not in tokens(bad_words_token_ids=[[first]])
    two = tokens(bad_words_token_ids=[greedy[:2]])  # the second token only after the first
    assert two[0] == first and two[1] != greedy[1]
    # a batch mixes them, and a req_index a biased request used is clean for the next one
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, **c)
              for c in ({"logit_bias": {forced: 100}}, {}, {"allowed_token_ids": [forced]})]
    outs = llm.generate([prompt] * 3, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [[forced] * 8, greedy, [forced] * 8]
    assert tokens() == greedy
    with pytest.raises(ValueError, match="logit_bias: token id 5000"):
        tokens(logit_bias={5000: 1.0})


def test_prompt_logprobs_equal_transformers_through_chunks_and_the_prefix_cache(tiny_token_model):
    path = tiny_token_model("llama")
    prompt = [5, 17, 300, 42] * 10 + [7, 8, 9]  # 43 tokens: three chunks of at most 16
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0], dim=-1)
    llm = LLM(path, dtype="float32", num_blocks=64, block_size=4, max_num_batched_tokens=16)
    plain = SamplingParams(temperature=0, max_tokens=2)
    asked = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3, n=2)
    first = llm.generate([prompt], plain, use_tqdm=False)[0]  # fills the prefix cache
    assert first.prompt_logprobs is None
    out = llm.generate([prompt], asked, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0  # it skipped the cache: every position has its logprobs
    assert llm.generate([prompt], plain, use_tqdm=False)[0].num_cached_tokens == 40
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        row = out.prompt_logprobs[pos]
        assert abs(row[prompt[pos]] - ref[pos - 1, prompt[pos]].item()) < 1e-4
        top = ref[pos - 1].topk(3)
        assert set(top.indices.tolist()) <= set(row) and len(row) in (3, 4)
    assert [c.token_ids for c in out.outputs] == [first.outputs[0].token_ids] * 2
