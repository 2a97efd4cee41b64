"""lm-evaluation-harness against `minivllm serve`: its loglikelihoods equal `LLM`'s offline.

    python -m bench.lm_eval_parity --lm-eval /path/to/lm_eval --tokenizer /path/to/hf-tokenizer \
        --json bench/results/lm_eval_parity_cpu.json

Serves the embedded model (fp32) and runs `lm_eval --model local-completions` on two tasks
defined on a local file (bench/lm_eval_tasks: hubs are unreachable): a loglikelihood task
(multiple choice: echo + logprobs + max_tokens 1 requests) and a generation task. Then scores
every (context, continuation) lm_eval sent with `LLM` in this process (prompt_logprobs, the
continuation's tokens summed) and records the largest difference. lm_eval needs an HF tokenizer
directory of the model (tests/conftest.py's `_save_tokenizer` writes one) and is best installed
in its own virtual environment (its dependencies are many).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import tempfile
from pathlib import Path

from bench import records
from bench.server_proc import ServeProcess

TASKS = Path(__file__).parent / "lm_eval_tasks"
MODEL = "SmolLM2-135M-Instruct"


def run_lm_eval(lm_eval: str, url: str, tokenizer: str, out_dir: str) -> None:
    args = (f"model={MODEL},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={tokenizer},num_concurrent=4,max_retries=1,tokenized_requests=True")
    cmd = [lm_eval, "--model", "local-completions", "--model_args", args,
           "--tasks", "minivllm_capitals_mc,minivllm_capitals_gen", "--include_path", str(TASKS),
           "--output_path", out_dir, "--log_samples"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, cwd=TASKS, env=env, check=True, timeout=1800)


def lm_eval_version(lm_eval: str) -> str:
    """The version of the lm-eval next to the `lm_eval` command (its own environment)."""
    python = Path(lm_eval).resolve().parent / "python"
    return subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                           "print(m.version('lm-eval'))"], capture_output=True, text=True,
                          check=True).stdout.strip()


def samples(out_dir: str, task: str) -> list[dict]:
    path, = glob.glob(f"{out_dir}/**/samples_{task}_*.jsonl", recursive=True)
    with open(path) as f:
        return [json.loads(line) for line in f]


def results(out_dir: str) -> dict:
    path, = glob.glob(f"{out_dir}/**/results_*.json", recursive=True)
    with open(path) as f:
        return json.load(f)["results"]


def offline_loglikelihoods(pairs: list[tuple[str, str]], tokenizer: str) -> list[float]:
    """Each continuation's log-likelihood given its context, from LLM's prompt logprobs, with
    lm_eval's split of the tokens (its TemplateLM._encode_pair)."""
    from transformers import AutoTokenizer

    from minivllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(tokenizer)
    llm = LLM(dtype="float32", num_blocks=1024)
    prompts, starts = [], []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())
        if spaces:  # lm_eval moves the context's trailing spaces to the continuation
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = tok.encode(context + continuation, add_special_tokens=False)
        prompts.append(whole)
        starts.append(len(tok.encode(context, add_special_tokens=False)))
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                        use_tqdm=False)
    return [sum(out.prompt_logprobs[p][ids[p]] for p in range(start, len(ids)))
            for out, ids, start in zip(outs, prompts, starts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm-eval", default="lm_eval", help="the lm_eval command")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer directory")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    server = ServeProcess(["--dtype", "float32", "--num-blocks", "1024"])
    try:
        out_dir = tempfile.mkdtemp(prefix="lm_eval_")
        run_lm_eval(args.lm_eval, server.url, args.tokenizer, out_dir)
    finally:
        assert server.stop() == 0
    mc = samples(out_dir, "minivllm_capitals_mc")
    pairs = [(a["arg_0"], a["arg_1"]) for s in mc for a in s["arguments"].values()]
    served = [float(r[0][0]) for s in mc for r in s["resps"]]
    offline = offline_loglikelihoods(pairs, args.tokenizer)
    diffs = [abs(a - b) for a, b in zip(served, offline)]
    scores = results(out_dir)
    print(json.dumps(scores, indent=1))
    records.write(args.json, [
        records.record("lm_eval loglikelihood, served vs LLM offline: max |difference|",
                       max(diffs), "nats", requests=len(pairs),
                       lm_eval_version=lm_eval_version(args.lm_eval),
                       served_first=served[:4], offline_first=offline[:4]),
        records.record("lm_eval minivllm_capitals_mc acc",
                       scores["minivllm_capitals_mc"]["acc,none"], "fraction"),
        records.record("lm_eval minivllm_capitals_gen exact_match",
                       scores["minivllm_capitals_gen"]["exact_match,none"], "fraction")])


if __name__ == "__main__":
    main()
