"""GPU check: greedy tokens of minivllm against transformers with the same (dummy) weights.

    python -m bench.gpu_parity --model qwen2.5-0.5b --dtype bfloat16 --json PATH

bf16 rounding can flip near-ties between the top two logits, after which sequences diverge;
the report gives, per prompt, whether it matched and where it first diverged, with the logit
gap there, so a divergence can be told from a bug (a bug diverges early and at wide gaps).
"""
from __future__ import annotations

import argparse
import random

import torch
import transformers

from bench import records
from bench.offline_throughput import hf_model
from minivllm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    llm = LLM(args.model, load_format="dummy", dtype=args.dtype)
    peer = hf_model(llm, llm.engine.runner.dtype, 0)
    rng = random.Random(0)
    vocab = llm.engine.source.arch.vocab_size
    prompts = [[rng.randrange(10, vocab - 10) for _ in range(rng.randint(8, 300))]
               for _ in range(args.num_prompts)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                                ignore_eos=True), use_tqdm=False)
    config = transformers.GenerationConfig(max_new_tokens=args.max_tokens, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)
    matched, results = 0, []
    for i, (ids, out) in enumerate(zip(prompts, outs)):
        ours = out.outputs[0].token_ids
        with torch.inference_mode():
            theirs = peer.generate(torch.tensor([ids], device=peer.device),
                                   generation_config=config)[0, len(ids):].tolist()
        diverge = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if diverge is None:
            matched += 1
            continue
        with torch.inference_mode():
            logits = peer(torch.tensor([ids + theirs[:diverge]], device=peer.device)).logits[0, -1]
        top2 = logits.float().topk(2).values
        results.append(records.record(f"prompt {i} (len {len(ids)}): first divergence", diverge,
                                      "token", logit_gap=float(top2[0] - top2[1])))
        print(f"prompt {i}: diverges at token {diverge}, peer top-2 logit gap "
              f"{float(top2[0] - top2[1]):.4f}")
    results.insert(0, records.record(f"{args.model} {args.dtype}: greedy sequences identical to "
                                     f"transformers", matched / len(prompts), "fraction"))
    records.write(args.json, results)


if __name__ == "__main__":
    main()
