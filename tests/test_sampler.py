"""Sampler tests: real torch on the CPU, fixed seeds throughout, so statistical checks cannot flake."""
from __future__ import annotations

import random
from typing import Optional, Sequence

import pytest
import torch
from hypothesis import given, settings, strategies as st

from minivllm.layers.sampler import (
    Sampler, SamplerOutput, apply_penalties, apply_top_k_top_p, hash_uniform, mix64_, row_keys)
from minivllm.sampling_params import SamplingParams

CPU = torch.device("cpu")
# 99.9% quantiles of chi-square (scipy.stats.chi2.ppf(0.999, df)).
CHI2_999 = {9: 27.877, 255: 330.52}
# Probabilities with clear gaps, so each filter's allowed set is unambiguous.
CRAFTED = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.03, 0.01, 0.01])


def make_sampler(params: Sequence[SamplingParams], vocab: int, seed: int = 0,
                 eos: Sequence[int] = (), prompts: Optional[Sequence[Sequence[int]]] = None,
                 max_num_seqs: Optional[int] = None) -> Sampler:
    """A sampler with params[i] loaded into req_index i."""
    sampler = Sampler(max_num_seqs or len(params), vocab, CPU, seed=seed)
    for req_index, p in enumerate(params):
        sampler.add_request(req_index, p, prompts[req_index] if prompts else [], eos)
    return sampler


def all_indices(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64)


def sample_counts(sampler: Sampler, logits: torch.Tensor, steps: int) -> torch.Tensor:
    """Histogram over the vocabulary of every token sampled in `steps` steps of a full batch."""
    req_indices = all_indices(logits.shape[0])
    tokens = torch.cat([sampler.sample(logits, req_indices).token_ids for _ in range(steps)])
    return torch.bincount(tokens, minlength=logits.shape[1]).double()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# -- greedy ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0)).to(dtype)
    sampler = make_sampler([SamplingParams(temperature=0.0)] * 8, 100)
    out = sampler.sample(logits, all_indices(8))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.token_ids.dtype == torch.int64
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None


def test_greedy_rows_beside_random_rows_are_argmax_and_logits_untouched() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, top_p=0.5)] * 3
    out = make_sampler(params, 50).sample(logits, all_indices(6))
    assert torch.equal(out.token_ids[0::2], logits[0::2].argmax(dim=-1))
    assert torch.equal(logits, before)


def test_top_k_1_is_greedy_at_any_temperature() -> None:
    temperatures = [0.05, 0.5, 1.0, 2.0, 100.0]
    logits = torch.randn(6, 200, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=t, top_k=1) for t in temperatures]
    sampler = make_sampler(params + [SamplingParams(temperature=1.0)], 200)  # forces slow path
    for _ in range(5):
        out = sampler.sample(logits, all_indices(6))
        assert torch.equal(out.token_ids[:5], logits[:5].argmax(dim=-1))


# -- filters and distribution ------------------------------------------------------------------

@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(top_k=2), {0, 1}),
    (SamplingParams(top_p=0.6), {0, 1, 2}),
    (SamplingParams(min_p=0.3), {0, 1, 2, 3}),
    (SamplingParams(top_k=3, top_p=0.5), {0, 1}),  # top-p renormalizes over the top 3
    (SamplingParams(temperature=0.5, min_p=0.3, top_k=5), {0, 1}),  # min_p after temperature
])
def test_filters_never_leave_allowed_set(params: SamplingParams, allowed: set[int]) -> None:
    rows = 256
    logits = CRAFTED.log().expand(rows, -1).contiguous()
    counts = sample_counts(make_sampler([params] * rows, 10), logits, steps=4)
    assert set(counts.nonzero().flatten().tolist()) == allowed


def vllm_top_k_top_p(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """vLLM V1's apply_top_k_top_p (sort, mask in sorted order, scatter back), as the oracle."""
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    top_k_mask = logits_sort.gather(1, (logits_sort.size(1) - k).unsqueeze(dim=1))
    logits_sort.masked_fill_(logits_sort < top_k_mask, -float("inf"))
    probs_sum = logits_sort.softmax(dim=-1).cumsum(dim=-1)
    top_p_mask = probs_sum <= 1 - p.unsqueeze(dim=1)
    top_p_mask[:, -1] = False
    logits_sort.masked_fill_(top_p_mask, -float("inf"))
    return logits_sort.scatter(dim=-1, index=logits_idx, src=logits_sort)


def test_top_k_top_p_matches_vllm() -> None:
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 300, generator=generator) * 3
    k = torch.randint(1, 301, (64,), generator=generator)
    k[::4] = 300  # top-k off
    p = torch.rand(64, generator=generator).clamp_(min=0.01)
    p[1::4] = 1.0  # top-p off
    assert torch.equal(apply_top_k_top_p(logits.clone(), k, p), vllm_top_k_top_p(logits, k, p))


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_empirical_distribution_matches_softmax(temperature: float, seeded: bool) -> None:
    rows, steps = 2048, 5
    logits = CRAFTED.log().expand(rows, -1).contiguous()
    # Seeded rows use consecutive seeds: the hash, not the seeds, must supply the randomness.
    params = [SamplingParams(temperature=temperature, seed=i if seeded else None)
              for i in range(rows)]
    counts = sample_counts(make_sampler(params, 10), logits, steps)
    assert chi_square(counts, torch.softmax(logits[0] / temperature, dim=-1)) < CHI2_999[9]


def test_temperature_sharpens_and_flattens() -> None:
    rows = 2048
    logits = CRAFTED.log().expand(rows, -1).contiguous()
    top_share = []
    for temperature in (0.5, 1.0, 2.0):
        sampler = make_sampler([SamplingParams(temperature=temperature)] * rows, 10)
        counts = sample_counts(sampler, logits, steps=2)
        top_share.append(float(counts[0] / counts.sum()))
    # Expected shares of token 0: 0.52, 0.30, 0.16; samples are 4096 per temperature.
    assert top_share[0] > 0.47 and 0.26 < top_share[1] < 0.34 and top_share[2] < 0.2


# -- seeds -----------------------------------------------------------------------------------

SEEDED = [SamplingParams(temperature=1.0, seed=7),
          SamplingParams(temperature=0.7, top_p=0.9, seed=-3),
          SamplingParams(temperature=1.2, top_k=5, min_p=0.05, seed=2 ** 64 - 11)]
OTHERS = [SamplingParams(temperature=0.9), SamplingParams(temperature=0.0),
          SamplingParams(temperature=1.0, frequency_penalty=1.5, repetition_penalty=1.3),
          SamplingParams(temperature=0.8, min_tokens=4, logprobs=2),
          SamplingParams(temperature=1.0, top_k=2, seed=7)]


def step_logits(request: int, step: int, vocab: int) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(1000 * request + step))


def test_seeded_rows_identical_alone_and_batched_in_any_order() -> None:
    vocab, steps = 64, 8
    alone = []
    for request, params in enumerate(SEEDED):
        sampler = make_sampler([params], vocab, seed=request)
        alone.append([int(sampler.sample(step_logits(request, step, vocab).unsqueeze(0),
                                         all_indices(1)).token_ids[0]) for step in range(steps)])

    # Seeded requests at other req_indices, among others; a different row order every step.
    everyone = OTHERS[:1] + SEEDED[1:2] + OTHERS[1:2] + SEEDED[2:3] + OTHERS[2:] + SEEDED[:1]
    index_of_seeded = [7, 1, 3]
    batched = make_sampler(everyone, vocab, seed=99, eos=[0])
    order = random.Random(0)
    together: list[list[int]] = [[] for _ in SEEDED]
    for step in range(steps):
        req_indices = list(range(len(everyone)))
        order.shuffle(req_indices)
        logits = torch.stack([
            step_logits(index_of_seeded.index(s), step, vocab) if s in index_of_seeded
            else torch.randn(vocab) for s in req_indices])
        tokens = batched.sample(logits, torch.tensor(req_indices)).token_ids.tolist()
        for request, req_index in enumerate(index_of_seeded):
            together[request].append(tokens[req_indices.index(req_index)])
    assert together == alone


def test_unseeded_runs_reproducible_from_sampler_seed() -> None:
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(3))

    def run(seed: int) -> list[list[int]]:
        sampler = make_sampler([SamplingParams(temperature=1.0, top_p=0.95)] * 16, 300, seed=seed)
        return [sampler.sample(logits, all_indices(16)).token_ids.tolist() for _ in range(4)]

    assert run(5) == run(5)
    assert run(5) != run(6)


# -- the hash behind the noise ----------------------------------------------------------------

def splitmix64_reference(x: int) -> int:
    mask = (1 << 64) - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def test_mix64_matches_reference_on_negative_and_overflowing_words() -> None:
    words = [0, 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 0x9E3779B97F4A7C15,
             *(random.Random(0).getrandbits(64) for _ in range(50))]
    signed = [w - 2 ** 64 if w >= 2 ** 63 else w for w in words]
    mixed = mix64_(torch.tensor(signed, dtype=torch.int64)).tolist()
    assert [m & (2 ** 64 - 1) for m in mixed] == [splitmix64_reference(w) for w in words]
    # SplitMix64 seeded with 0 first returns 0xE220A8397B1DCDAF.
    assert splitmix64_reference(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF


def test_hash_uniform_is_uniform_and_uncorrelated() -> None:
    vocab = 1024
    seeds = torch.arange(64, dtype=torch.int64).repeat_interleave(16)  # consecutive seeds
    positions = torch.arange(16, dtype=torch.int64).repeat(64)         # consecutive positions
    weyl = torch.arange(1, vocab + 1, dtype=torch.int64) * -7046029254386353131
    u = hash_uniform(row_keys(seeds, positions), weyl).double()  # [1024 keys, 1024 tokens]
    assert u.min() > 0 and u.max() < 1
    flat = u.flatten()
    n = flat.numel()
    counts = torch.histc(flat, bins=256, min=0.0, max=1.0)
    assert chi_square(counts, torch.full((256,), 1 / 256)) < CHI2_999[255]
    ks = (torch.arange(1, n + 1, dtype=torch.float64) / n - flat.sort().values).abs().max()
    assert ks < 1.95 / n ** 0.5  # Kolmogorov-Smirnov at the 0.001 level
    z = (u - 0.5) * 12 ** 0.5  # unit variance
    for a, b in ((z[:, 1:], z[:, :-1]),    # neighbouring tokens
                 (z[1:], z[:-1]),          # consecutive positions of one seed
                 (z[16:], z[:-16])):       # consecutive seeds at one position
        assert abs(float((a * b).mean())) < 4.5 / a.numel() ** 0.5


# -- penalties -------------------------------------------------------------------------------

def test_apply_penalties_matches_hand_computed_reference() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]] * 3)
    prompt = torch.tensor([[True, True, False, False, False, True]] * 3)
    counts = torch.tensor([[0, 2, 1, 0, 0, 0]] * 3, dtype=torch.int32)
    out = apply_penalties(logits.clone(), prompt, counts,
                          repetition=torch.tensor([2.0, 1.0, 1.0]),
                          presence=torch.tensor([0.25, 0.0, 0.5]),
                          frequency=torch.tensor([0.5, 0.0, 0.0]))
    expected = torch.tensor([
        # prompt: 2/2, -1*2, 0*2; output: 0.5/2; then - 0.5*count - 0.25*(count > 0)
        [1.0, -2.0 - 1.0 - 0.25, 0.25 - 0.5 - 0.25, 3.0, -2.0, 0.0],
        [2.0, -1.0, 0.5, 3.0, -2.0, 0.0],                 # neutral: unchanged
        [2.0, -1.0 - 0.5, 0.5 - 0.5, 3.0, -2.0, 0.0],      # presence only
    ])
    assert torch.equal(out, expected)


def test_penalties_follow_sampled_tokens_and_reset_with_index() -> None:
    params = [SamplingParams(temperature=0.0, frequency_penalty=1.0),
              SamplingParams(temperature=0.0, presence_penalty=1.0),
              SamplingParams(temperature=0.0, repetition_penalty=2.0),
              SamplingParams(temperature=0.0)]
    sampler = make_sampler(params, 4, prompts=[[], [], [0], [0]])
    logits = torch.tensor([[3.0, 2.4, 0.0, -1.0]] * 4)
    history = [sampler.sample(logits, all_indices(4)).token_ids.tolist() for _ in range(4)]
    assert [list(col) for col in zip(*history)] == [
        [0, 1, 0, 1],  # frequency: 3-1=2 < 2.4; 2.4-1 < 2; 3-2 < 1.4
        [0, 1, 0, 0],  # presence: each seen token loses 1 once
        [1, 0, 0, 0],  # repetition: prompt token 0 -> 1.5; then 2.4 -> 1.2
        [0, 0, 0, 0],  # no penalty: untouched by its neighbours' state
    ]
    sampler.remove_request(0)
    sampler.add_request(0, params[0], [], [])
    assert sampler.sample(logits[:1], all_indices(1)).token_ids.tolist() == [0]


def test_penalty_state_allocated_only_when_needed() -> None:
    sampler = make_sampler([SamplingParams(temperature=0.5, top_k=3)], 32)
    sampler.sample(torch.randn(1, 32), all_indices(1))
    assert sampler._output_counts is None and sampler._prompt_mask is None
    sampler.remove_request(0)
    sampler.add_request(0, SamplingParams(presence_penalty=0.5), [1, 2], [])
    assert sampler._output_counts is not None and sampler._output_counts.shape == (1, 32)


# -- min_tokens ------------------------------------------------------------------------------

def test_min_tokens_blocks_eos_and_stop_ids_until_reached() -> None:
    params = [SamplingParams(temperature=0.0, min_tokens=3),
              SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3]),
              SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3], ignore_eos=True),
              SamplingParams(temperature=0.0, stop_token_ids=[3])]
    sampler = make_sampler(params, 5, eos=[4])
    logits = torch.tensor([[0.0, 0.0, 1.0, 5.0, 9.0],
                           [0.0, 0.0, 1.0, 9.0, 8.0],
                           [0.0, 0.0, 1.0, 9.0, 8.0],
                           [0.0, 0.0, 1.0, 9.0, 8.0]])
    history = [sampler.sample(logits, all_indices(4)).token_ids.tolist() for _ in range(4)]
    assert [list(col) for col in zip(*history)] == [
        [3, 3, 3, 4],  # eos blocked for 3 tokens
        [2, 2, 3, 3],  # stop id and eos blocked for 2
        [2, 2, 3, 3],  # ignore_eos too: eos is still blocked, as in vLLM
        [3, 3, 3, 3],  # no min_tokens
    ]


def test_min_tokens_holds_for_random_rows() -> None:
    rows = 256
    logits = torch.tensor([[0.0, 1.0, 8.0]]).expand(rows, -1).contiguous()
    sampler = make_sampler([SamplingParams(temperature=1.0, min_tokens=2)] * rows, 3, eos=[2])
    steps = [sampler.sample(logits, all_indices(rows)).token_ids for _ in range(3)]
    assert not (steps[0] == 2).any() and not (steps[1] == 2).any()
    assert (steps[2] == 2).float().mean() > 0.9


# -- logprobs --------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_and_top_n_sorted() -> None:
    params = [SamplingParams(temperature=0.7, logprobs=3, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, logprobs=0),
              SamplingParams(temperature=1.0, top_k=4)]
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    sampler = make_sampler(params, 40, prompts=[[1, 2, 3]] * 3)
    out = sampler.sample(logits, all_indices(3))
    reference = torch.log_softmax(logits.float(), dim=-1)
    assert out.logprobs.dtype == torch.float32 and out.top_logprobs.dtype == torch.float32
    # The wire's form: a row that asked for none has NaN, one that asked fewer -1 and NaN.
    chosen = reference.gather(1, out.token_ids[:, None]).squeeze(1)
    assert torch.allclose(out.logprobs[:2], chosen[:2]) and out.logprobs[2].isnan()
    assert out.top_ids.shape == (3, 3) and out.top_ids.dtype == torch.int64
    assert torch.equal(out.top_ids[0], reference[0].argsort(descending=True)[:3])
    assert torch.allclose(out.top_logprobs[0], reference[0, out.top_ids[0]])
    assert (out.top_logprobs[0, :-1] >= out.top_logprobs[0, 1:]).all()
    assert (out.top_ids[1:] == -1).all() and out.top_logprobs[1:].isnan().all()

    sampler.remove_request(0)  # the widest request leaves: N follows the active requests
    out = sampler.sample(logits[1:], torch.tensor([1, 2]))
    assert out.top_ids.shape == (2, 0)
    sampler.remove_request(1)
    assert sampler.sample(logits[2:], torch.tensor([2])).logprobs is None


# -- API contract ----------------------------------------------------------------------------

def test_index_and_shape_errors() -> None:
    sampler = make_sampler([SamplingParams()], 8, max_num_seqs=2)
    with pytest.raises(ValueError):
        sampler.add_request(2, SamplingParams(), [], [])
    with pytest.raises(ValueError):
        sampler.remove_request(1)
    with pytest.raises(ValueError):
        sampler.sample(torch.zeros(1, 9), all_indices(1))


def test_adding_to_a_held_index_replaces_its_request() -> None:
    sampler = make_sampler([SamplingParams(temperature=0.0, presence_penalty=2.0, logprobs=2)], 4)
    logits = torch.tensor([[1.0, 0.0, -1.0, -2.0]])
    assert sampler.sample(logits, all_indices(1)).token_ids.tolist() == [0]
    sampler.add_request(0, SamplingParams(temperature=0.0), [], [])  # no remove_request first
    out = sampler.sample(logits, all_indices(1))
    assert out.token_ids.tolist() == [0] and out.logprobs is None  # fast path again


def test_resumed_request_continues_where_it_stopped() -> None:
    """Re-adding a preempted request with its output so far gives the uninterrupted tokens."""
    params = SamplingParams(temperature=1.0, seed=5, frequency_penalty=0.7, min_tokens=5)
    vocab, steps, split = 32, 8, 3
    logits = [step_logits(0, step, vocab).unsqueeze(0) for step in range(steps)]
    straight = make_sampler([params], vocab, eos=[2], prompts=[[1, 2]])
    expected = [int(straight.sample(x, all_indices(1)).token_ids[0]) for x in logits]

    resumed = make_sampler([SamplingParams()], vocab, max_num_seqs=3)
    resumed.add_request(2, params, [1, 2], [2], output_token_ids=expected[:split])
    tail = [int(resumed.sample(x, torch.tensor([2])).token_ids[0]) for x in logits[split:]]
    assert tail == expected[split:]


VOCAB = 16

params_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 1e-4, 0.3, 1.0, 2.5]),
    top_k=st.sampled_from([-1, 1, 2, 7, 100]),
    top_p=st.sampled_from([1.0, 0.9, 0.3, 1e-3]),
    min_p=st.sampled_from([0.0, 0.05, 0.9, 1.0]),
    seed=st.one_of(st.none(), st.integers(-2 ** 63, 2 ** 64 - 1)),
    repetition_penalty=st.sampled_from([1.0, 0.5, 1.7]),
    presence_penalty=st.sampled_from([0.0, -2.0, 1.0]),
    frequency_penalty=st.sampled_from([0.0, 2.0, -0.5]),
    min_tokens=st.integers(0, 3),
    stop_token_ids=st.lists(st.integers(VOCAB // 2, VOCAB + 3), max_size=3),
    ignore_eos=st.booleans(),
    logprobs=st.one_of(st.none(), st.integers(0, 5)),
)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(rows=st.lists(st.tuples(params_strategy, st.one_of(st.none(), st.integers(0, VOCAB // 2 - 1))),
                     min_size=1, max_size=6),
       data_seed=st.integers(0, 2 ** 16))
def test_random_parameter_mixes(rows: list[tuple[SamplingParams, Optional[int]]],
                                data_seed: int) -> None:
    """Any mix gives well-formed output; a row whose logits are -inf but one token (never a stop
    id) samples that token, with no NaN anywhere."""
    sampler = make_sampler([p for p, _ in rows], VOCAB, eos=[VOCAB - 1],
                           prompts=[[1, 2, VOCAB - 1]] * len(rows))
    generator = torch.Generator().manual_seed(data_seed)
    logits = torch.randn(len(rows), VOCAB, generator=generator) * 5
    for i, (_, only) in enumerate(rows):
        if only is not None:
            logits[i] = float("-inf")
            logits[i, only] = 0.0
    asked = [p.logprobs for p, _ in rows if p.logprobs is not None]
    for _ in range(3):
        out = sampler.sample(logits, all_indices(len(rows)))
        assert isinstance(out, SamplerOutput)
        assert out.token_ids.shape == (len(rows),) and out.token_ids.dtype == torch.int64
        assert ((out.token_ids >= 0) & (out.token_ids < VOCAB)).all()
        for i, (_, only) in enumerate(rows):
            if only is not None:
                assert int(out.token_ids[i]) == only
        if asked:
            assert out.top_ids.shape == (len(rows), max(asked))
            for i, (params, _) in enumerate(rows):  # NaN and -1 exactly where a row asked none
                k = -1 if params.logprobs is None else params.logprobs
                assert bool(out.logprobs[i].isnan()) == (k < 0)
                assert not out.top_logprobs[i, :max(k, 0)].isnan().any()
                assert out.top_logprobs[i, max(k, 0):].isnan().all()
                assert (out.top_ids[i, max(k, 0):] == -1).all()
        else:
            assert out.logprobs is None and out.top_ids is None
