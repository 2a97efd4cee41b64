"""The sampler: one batch of logits in, one token per row out, vectorized over the batch.

Semantics follow vLLM V1: logprobs come from the raw logits; then the token choice
(allowed_token_ids, bad_words, logit_bias), min_tokens masking and penalties (repetition,
frequency, presence); then greedy argmax for greedy rows; for the others temperature, min_p,
top_k, top_p and a draw.

Request state lives in tensors indexed by the scheduler's request index, so that a step costs a
few gathers, never a per-request Python loop. Which stages run is decided from host-side counts
over the *active* requests (the batch is a subset of them), so `sample()` itself never reads a
device tensor back to the host.

Draws use the Gumbel-max trick with noise from a counter-based hash of
(row seed, tokens this request has sampled so far, vocabulary index): a seeded request gets the same
tokens whatever else is in the batch and wherever its row is, with no per-row torch.Generator.
Unseeded rows take a fresh seed per step from one sampler-level generator, so a whole run is
reproducible from the engine seed.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from minivllm.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def _as_int64(value: int) -> int:
    """The int64 with the same low 64 bits as `value` (torch int64 arithmetic wraps mod 2**64)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


# SplitMix64 (Steele, Lea, Flood 2014): the Weyl increment and the finalizer's multipliers.
_GOLDEN_GAMMA = _as_int64(0x9E3779B97F4A7C15)
_MIX_MUL1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX_MUL2 = _as_int64(0x94D049BB133111EB)
_UNIFORM_BITS = 23  # h + 0.5 is exact in float32, so u lies strictly inside (0, 1)


def mix64_(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer, in place on an int64 tensor: a bijection on 64-bit words that
    avalanches every input bit. torch's `>>` on int64 is arithmetic, so each shift is masked to
    make it logical; multiplication wraps mod 2**64 as the algorithm needs."""
    shifted = torch.empty_like(z)
    for shift, multiplier in ((30, _MIX_MUL1), (27, _MIX_MUL2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=shifted)
        shifted.bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(shifted)
        if multiplier is not None:
            z.mul_(multiplier)
    return z


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One 64-bit key per row from (seed, position); mixing twice makes keys of consecutive
    positions of one seed unrelated words, so their noise streams share no structure."""
    return mix64_(mix64_(seeds.clone()).add_(positions))


def hash_uniform(keys: torch.Tensor, weyl: torch.Tensor) -> torch.Tensor:
    """uniform[i, v] in (0, 1) as float32: SplitMix64 output number v of the stream keyed by
    keys[i]. `weyl` is (arange(V) + 1) * golden gamma, cached by the caller."""
    z = mix64_(keys.unsqueeze(1) + weyl)
    z.bitwise_right_shift_(64 - _UNIFORM_BITS).bitwise_and_((1 << _UNIFORM_BITS) - 1)
    return z.to(torch.float32).add_(0.5).mul_(2.0 ** -_UNIFORM_BITS)


def gumbel_noise(keys: torch.Tensor, weyl: torch.Tensor) -> torch.Tensor:
    """-log(E) with E = -log(u) exponential: argmax(log p + noise) samples p (Gumbel-max,
    equivalently the exponential race argmax(p / E)). Log space keeps -inf logits NaN-free."""
    return hash_uniform(keys, weyl).log_().neg_().log_().neg_()


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor,
                    output_counts: torch.Tensor, repetition: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties on raw logits [S, V]: repetition (HF style) on tokens seen in the prompt or
    the output, then frequency * count and presence * seen-in-output subtracted. Penalties are [S];
    neutral values (1, 0, 0) leave a row exactly unchanged."""
    counts = output_counts.to(logits.dtype)
    in_output = output_counts > 0
    rep = repetition.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(prompt_mask | in_output, penalized, logits)
    logits -= frequency.unsqueeze(1) * counts
    logits -= presence.unsqueeze(1) * in_output
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Masks (in place) tokens with p < min_p * p_max; compared in log space, which needs no
    softmax. min_p = 0 gives a -inf threshold, so such rows are untouched."""
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)
    return logits.masked_fill_(logits < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor) -> torch.Tensor:
    """vLLM's top-k then top-p, in place, from one ascending sort of the batch. top_k [S] int64 in
    [1, V] (V disables), top_p [S] float32 (1 disables). Each row keeps the logits at or above a
    threshold value, so ties with the last kept token stay, as in vLLM's top-k."""
    vocab_size = logits.shape[-1]
    sorted_logits = logits.sort(dim=-1).values
    kth_largest = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))
    sorted_logits.masked_fill_(sorted_logits < kth_largest, float("-inf"))
    cumulative = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)
    # The low tail of mass at most 1 - p goes (top-k's -inf tail has mass 0, so it goes too);
    # the top token always stays.
    num_dropped = (cumulative <= (1 - top_p).unsqueeze(1)).sum(dim=-1, keepdim=True)
    threshold = sorted_logits.gather(1, num_dropped.clamp_(max=vocab_size - 1))
    return logits.masked_fill_(logits < threshold, float("-inf"))


class BadWords:
    """Bad words of more than one token, as vLLM bans them: a word's last token is banned while
    the output ends with the rest of the word. Each word is an entry (its request's req_index,
    its prefix right-aligned in a window of the output's last W tokens, its last token); the
    window holds -1 where the output is shorter, which no prefix token matches."""

    def __init__(self, max_num_seqs: int, device: torch.device) -> None:
        self.device = device
        self.words: dict[int, list[list[int]]] = {}  # req_index -> its words (2+ tokens)
        self.recent = torch.full((max_num_seqs, 1), -1, dtype=torch.int64, device=device)
        self._entries: Optional[tuple[torch.Tensor, ...]] = None

    def add(self, req_index: int, words: Sequence[Sequence[int]],
            output_token_ids: Sequence[int]) -> None:
        self.words[req_index] = [list(w) for w in words if len(w) > 1]
        width = max(self.recent.shape[1], *(len(w) - 1 for w in self.words[req_index]))
        if width > self.recent.shape[1]:  # pad every window on the left (older) side
            pad = width - self.recent.shape[1]
            self.recent = torch.nn.functional.pad(self.recent, (pad, 0), value=-1)
        tail = list(output_token_ids)[-width:]
        self.recent[req_index] = torch.tensor([-1] * (width - len(tail)) + tail,
                                              dtype=torch.int64)
        self._entries = None

    def remove(self, req_index: int) -> None:
        del self.words[req_index]
        self._entries = None

    def record(self, req_indices: torch.Tensor, token_ids: torch.Tensor) -> None:
        shifted = torch.cat([self.recent[req_indices, 1:], token_ids.unsqueeze(1)], dim=1)
        self.recent[req_indices] = shifted

    def block(self, logits: torch.Tensor, req_indices: torch.Tensor) -> None:
        """-inf on every entry's last token where its prefix ends the output."""
        owners, prefixes, lasts = self._tensors()
        row_of = torch.full((self.recent.shape[0],), -1, dtype=torch.int64, device=self.device)
        row_of[req_indices] = torch.arange(len(req_indices), device=self.device)
        rows = row_of[owners]
        wildcard = prefixes == -2  # left of a short prefix: any token
        match = ((self.recent[owners] == prefixes) | wildcard).all(dim=1) & (rows >= 0)
        banned = torch.zeros_like(logits)
        banned.index_put_((rows.clamp(min=0), lasts),
                          torch.where(match, float("-inf"), 0.0), accumulate=True)
        logits += banned

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        if self._entries is None:
            width = self.recent.shape[1]
            entries = [(i, [-2] * (width - len(w) + 1) + w[:-1], w[-1])
                       for i, words in self.words.items() for w in words]
            owners, prefixes, lasts = zip(*entries)
            self._entries = tuple(torch.tensor(x, dtype=torch.int64, device=self.device)
                                  for x in (owners, prefixes, lasts))
        return self._entries


@dataclass
class SamplerOutput:
    """One step's tokens. Logprob fields are None when no active request asked for logprobs;
    N is the largest `logprobs` among active requests, and rows that asked fewer (or none) hold
    -1 ids and NaN logprobs there, as the wire's step output carries them."""

    token_ids: torch.Tensor                     # [S] int64
    logprobs: Optional[torch.Tensor]            # [S] float32, of the sampled token
    top_ids: Optional[torch.Tensor]             # [S, N] int64, best first
    top_logprobs: Optional[torch.Tensor]        # [S, N] float32


# Columns of the per-req_index parameter tables: one gather per step fetches a row's parameters.
_TEMPERATURE, _TOP_P, _MIN_P, _REPETITION, _PRESENCE, _FREQUENCY = range(6)
_TOP_K, _SEED, _SEEDED, _MIN_TOKENS = range(4)

# Stage names counted over active requests to decide which stages a step runs.
_RANDOM, _GREEDY, _TOP_K_TOP_P, _MIN_P_STAGE, _PENALTIES, _MIN_TOKENS_STAGE = (
    "random", "greedy", "top_k_top_p", "min_p", "penalties", "min_tokens")
# logit_bias, allowed_token_ids and one-token bad words are one fixed bias row per request;
# longer bad words depend on what was generated last.
_BIAS, _BAD_WORDS = "bias", "bad_words"


def _stages(params: SamplingParams, stop_ids: Sequence[int]) -> list[str]:
    """The stages a request needs; the fast path runs when only `greedy` is needed."""
    stages = []
    if params.greedy:
        stages.append(_GREEDY)
    else:
        stages.append(_RANDOM)
        if params.top_k != -1 or params.top_p < 1.0:
            stages.append(_TOP_K_TOP_P)
        if params.min_p > 0.0:
            stages.append(_MIN_P_STAGE)
    if (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0):
        stages.append(_PENALTIES)
    if params.min_tokens > 0 and stop_ids:
        stages.append(_MIN_TOKENS_STAGE)
    if params.logit_bias or params.allowed_token_ids is not None or \
            any(len(w) == 1 for w in params.bad_words_token_ids):
        stages.append(_BIAS)
    if any(len(w) > 1 for w in params.bad_words_token_ids):
        stages.append(_BAD_WORDS)
    return stages


def _torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


class Sampler:
    """Samples one token per row for requests kept in req_indices 0..max_num_seqs-1."""

    def __init__(self, max_num_seqs: int, vocab_size: int, device: torch.device,
                 seed: int = 0,
                 argmax: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        self.max_num_seqs = max_num_seqs
        # torch.argmax over the rows, or the CPU kernels' (their logits are fp32): 0.65 ms ->
        # 0.04 ms for 16 rows of 49152 on 1 thread, 2% of a decode step.
        self._argmax = argmax or _torch_argmax
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._float_params = torch.zeros(max_num_seqs, 6, dtype=torch.float32, device=device)
        self._int_params = torch.zeros(max_num_seqs, 4, dtype=torch.int64, device=device)
        self._num_sampled = torch.zeros(max_num_seqs, dtype=torch.int64, device=device)
        self._num_logprobs = torch.full((max_num_seqs,), -1, dtype=torch.int64, device=device)
        self._weyl = torch.arange(1, vocab_size + 1, dtype=torch.int64,
                                  device=device).mul_(_GOLDEN_GAMMA)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed)
        # [max_num_seqs, V] each: allocated when the first request with a penalty arrives.
        self._output_counts: Optional[torch.Tensor] = None
        self._prompt_mask: Optional[torch.Tensor] = None
        # Stop ids blocked under min_tokens, one row per req_index, padded by repeating the row's
        # first id (scattering a duplicate is harmless); widened when a request needs more.
        self._stop_ids = torch.zeros(max_num_seqs, 1, dtype=torch.int64, device=device)
        # [max_num_seqs, V], added to the logits: allocated when the first request with a token
        # choice arrives; a row is zeroed when its request leaves.
        self._bias: Optional[torch.Tensor] = None
        self._bad_words = BadWords(max_num_seqs, device)
        self._stages_of: dict[int, list[str]] = {}
        self._logprobs_of: dict[int, int] = {}
        self._stage_counts: Counter[str] = Counter()
        self._logprobs_counts: Counter[int] = Counter()

    def add_request(self, req_index: int, params: SamplingParams, prompt_token_ids: Sequence[int],
                    eos_token_ids: Sequence[int], output_token_ids: Sequence[int] = ()) -> None:
        """Loads a request at `req_index`, replacing whatever was there. `output_token_ids`
        resumes a preempted request: penalties, min_tokens and seeded draws go on from there."""
        if not 0 <= req_index < self.max_num_seqs:
            raise ValueError(f"req_index {req_index} out of range [0, {self.max_num_seqs})")
        if req_index in self._stages_of:
            self.remove_request(req_index)
        stop_ids = self._min_tokens_stop_ids(params, eos_token_ids)
        stages = _stages(params, stop_ids)
        self._write_params(req_index, params, stop_ids, len(output_token_ids))
        if _PENALTIES in stages:
            self._reset_penalty_state(req_index, prompt_token_ids, output_token_ids)
        if _MIN_TOKENS_STAGE in stages:
            self._set_stop_ids(req_index, stop_ids)
        if _BIAS in stages:
            self._set_bias(req_index, params)
        if _BAD_WORDS in stages:
            self._bad_words.add(req_index, params.bad_words_token_ids, output_token_ids)
        self._stages_of[req_index] = stages
        self._stage_counts.update(stages)
        self._num_logprobs[req_index] = -1 if params.logprobs is None else params.logprobs
        if params.logprobs is not None:
            self._logprobs_of[req_index] = params.logprobs
            self._logprobs_counts[params.logprobs] += 1

    def remove_request(self, req_index: int) -> None:
        """Frees `req_index` (its tensor rows stay stale until the next add_request). Call it when a
        request finishes or leaves: until then its needs keep their stages running."""
        if req_index not in self._stages_of:
            raise ValueError(f"req_index {req_index} holds no request")
        stages = self._stages_of.pop(req_index)
        if _BIAS in stages:
            self._bias[req_index] = 0.0
        if _BAD_WORDS in stages:
            self._bad_words.remove(req_index)
        self._stage_counts.subtract(stages)
        self._stage_counts += Counter()  # drops the stages that reached zero
        if req_index in self._logprobs_of:
            self._logprobs_counts[self._logprobs_of.pop(req_index)] -= 1
            self._logprobs_counts += Counter()

    def sample(self, logits: torch.Tensor, req_indices: torch.Tensor) -> SamplerOutput:
        """Samples from logits [S, V] (any float dtype; not modified) for the requests in
        req_indices [S] (int64, on the sampler's device, distinct), and records the tokens."""
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size \
                or logits.shape[0] != req_indices.shape[0]:
            raise ValueError(f"logits {tuple(logits.shape)} do not match "
                             f"{req_indices.shape[0]} request indices "
                             f"x vocab {self.vocab_size}")
        if self.plain_greedy():
            # The common benchmark case: nothing to record, nothing to convert.
            return SamplerOutput(self._argmax(logits), None, None, None)
        logits = logits.to(torch.float32, copy=True)
        raw_logprobs = logits.log_softmax(dim=-1) if self._logprobs_counts else None
        float_params = self._float_params[req_indices]
        int_params = self._int_params[req_indices]
        positions = self._num_sampled[req_indices]
        if _BIAS in self._stage_counts:
            logits += self._bias[req_indices]
        if _BAD_WORDS in self._stage_counts:
            self._bad_words.block(logits, req_indices)
        if _MIN_TOKENS_STAGE in self._stage_counts:
            self._block_stop_ids(logits, req_indices, int_params, positions)
        if _PENALTIES in self._stage_counts:
            # Rows of requests without penalties carry stale state; neutral penalties ignore it.
            logits = apply_penalties(logits, self._prompt_mask[req_indices],
                                     self._output_counts[req_indices], float_params[:, _REPETITION],
                                     float_params[:, _PRESENCE], float_params[:, _FREQUENCY])
        token_ids = self._choose(logits, float_params, int_params, positions)
        self._record(req_indices, token_ids)
        return self._output(token_ids, raw_logprobs, req_indices)

    def plain_greedy(self) -> bool:
        """Whether sample() is a bare argmax of the logits: every active request greedy, with
        no logprobs, penalties or min_tokens."""
        return not self._logprobs_counts and self._stage_counts.keys() <= {_GREEDY}

    # -- add_request helpers ------------------------------------------------------------------

    def _min_tokens_stop_ids(self, params: SamplingParams,
                             eos_token_ids: Sequence[int]) -> list[int]:
        """What min_tokens blocks, as vLLM and transformers' min_new_tokens: the stop ids and
        the model's eos ids, whatever ignore_eos says (it only keeps eos from ending a request
        once min_tokens is reached). Ids outside the vocabulary can never be sampled, so they
        need no mask."""
        ids = [*params.stop_token_ids, *eos_token_ids]
        return sorted({i for i in ids if 0 <= i < self.vocab_size})

    def _write_params(self, req_index: int, params: SamplingParams, stop_ids: list[int],
                      num_sampled: int) -> None:
        # Temperature 0 marks a greedy row (top_k == 1 included, as SamplingParams.greedy says).
        temperature = 0.0 if params.greedy else params.temperature
        top_k = self.vocab_size if params.top_k == -1 else min(params.top_k, self.vocab_size)
        min_tokens = params.min_tokens if stop_ids else 0
        self._float_params[req_index] = torch.tensor(
            [temperature, params.top_p, params.min_p, params.repetition_penalty,
             params.presence_penalty, params.frequency_penalty], dtype=torch.float32)
        self._int_params[req_index] = torch.tensor(
            [top_k, _as_int64(params.seed or 0), params.seed is not None, min_tokens],
            dtype=torch.int64)
        self._num_sampled[req_index] = num_sampled

    def _reset_penalty_state(self, req_index: int, prompt_token_ids: Sequence[int],
                             output_token_ids: Sequence[int]) -> None:
        if self._output_counts is None:
            shape = (self.max_num_seqs, self.vocab_size)
            self._output_counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self._prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        output = torch.as_tensor(output_token_ids, dtype=torch.int64)
        self._output_counts[req_index] = torch.bincount(output, minlength=self.vocab_size)
        prompt = torch.as_tensor(prompt_token_ids, dtype=torch.int64)
        self._prompt_mask[req_index] = False
        self._prompt_mask[req_index, prompt.to(self.device)] = True

    def _set_bias(self, req_index: int, params: SamplingParams) -> None:
        if self._bias is None:
            self._bias = torch.zeros(self.max_num_seqs, self.vocab_size, dtype=torch.float32,
                                     device=self.device)
        row = self._bias[req_index]
        if params.allowed_token_ids is not None:
            row.fill_(float("-inf"))
            row[torch.tensor(params.allowed_token_ids, device=self.device)] = 0.0
        else:
            row.zero_()
        if params.logit_bias:  # -inf + bias stays -inf: a bias cannot re-allow a token
            ids = torch.tensor(list(params.logit_bias), dtype=torch.int64, device=self.device)
            row.index_add_(0, ids, torch.tensor(list(params.logit_bias.values()),
                                                dtype=torch.float32, device=self.device))
        banned = [w[0] for w in params.bad_words_token_ids if len(w) == 1]
        if banned:
            row[torch.tensor(banned, device=self.device)] = float("-inf")

    def _set_stop_ids(self, req_index: int, stop_ids: list[int]) -> None:
        width = self._stop_ids.shape[1]
        if len(stop_ids) > width:
            wider = self._stop_ids[:, :1].repeat(1, len(stop_ids))
            wider[:, :width] = self._stop_ids
            self._stop_ids = wider
            width = len(stop_ids)
        padded = stop_ids + stop_ids[:1] * (width - len(stop_ids))
        self._stop_ids[req_index] = torch.tensor(padded, dtype=torch.int64)

    # -- sample() stages ----------------------------------------------------------------------

    def _block_stop_ids(self, logits: torch.Tensor, req_indices: torch.Tensor,
                        int_params: torch.Tensor, positions: torch.Tensor) -> None:
        """-inf on the stop ids of rows still short of min_tokens; other rows write back their own
        values (req_indices without min_tokens store 0, so they are never short)."""
        stop_ids = self._stop_ids[req_indices]
        short = (positions < int_params[:, _MIN_TOKENS]).unsqueeze(1)
        values = logits.gather(1, stop_ids).masked_fill_(short, float("-inf"))
        logits.scatter_(1, stop_ids, values)

    def _choose(self, logits: torch.Tensor, float_params: torch.Tensor,
                int_params: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if _RANDOM not in self._stage_counts:
            return self._argmax(logits)
        temperature = float_params[:, _TEMPERATURE]
        greedy_rows = temperature == 0
        greedy_ids = self._argmax(logits) if _GREEDY in self._stage_counts else None
        logits.div_(torch.where(greedy_rows, 1.0, temperature).unsqueeze(1))
        if _MIN_P_STAGE in self._stage_counts:
            apply_min_p(logits, float_params[:, _MIN_P])
        if _TOP_K_TOP_P in self._stage_counts:
            apply_top_k_top_p(logits, int_params[:, _TOP_K], float_params[:, _TOP_P])
        keys = row_keys(self._row_seeds(int_params), positions)
        sampled = self._argmax(logits.add_(gumbel_noise(keys, self._weyl)))
        return sampled if greedy_ids is None else torch.where(greedy_rows, greedy_ids, sampled)

    def _row_seeds(self, int_params: torch.Tensor) -> torch.Tensor:
        """The request's seed for seeded rows, a fresh 63-bit draw for the others."""
        fresh = torch.randint(0, 2 ** 63 - 1, (int_params.shape[0],), dtype=torch.int64,
                              generator=self._generator, device=self.device)
        return torch.where(int_params[:, _SEEDED] != 0, int_params[:, _SEED], fresh)

    def _record(self, req_indices: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Advances the positions (seeded noise, min_tokens) and output counts (penalties)."""
        self._num_sampled.index_add_(0, req_indices, torch.ones_like(req_indices))
        if _BAD_WORDS in self._stage_counts:
            self._bad_words.record(req_indices, token_ids)
        if _PENALTIES in self._stage_counts:
            ones = torch.ones(req_indices.shape, dtype=torch.int32, device=self.device)
            self._output_counts.index_put_((req_indices, token_ids), ones, accumulate=True)

    def _output(self, token_ids: torch.Tensor, raw_logprobs: Optional[torch.Tensor],
                req_indices: torch.Tensor) -> SamplerOutput:
        """Logprobs in the wire's form: NaN and -1 where a row asked for none or fewer."""
        if raw_logprobs is None:
            return SamplerOutput(token_ids, None, None, None)
        asked = self._num_logprobs[req_indices]
        sampled = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        sampled.masked_fill_(asked < 0, float("nan"))
        k = max(self._logprobs_counts)
        top_logprobs, top_ids = raw_logprobs.topk(k, dim=-1)
        beyond = torch.arange(k, device=self.device).unsqueeze(0) >= asked.unsqueeze(1)
        return SamplerOutput(token_ids, sampled, top_ids.masked_fill_(beyond, -1),
                             top_logprobs.masked_fill_(beyond, float("nan")))
