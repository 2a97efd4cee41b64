"""Host time per output token of the output path, by output length (stop strings set).

    python -m bench.bench_output --json bench/results/output_processor_cpu.json
    PYTHONPATH=TREE python bench/bench_output.py --streamed 4000   (one tree's streamed cost)

Recorded token streams: the embedded model's tokenizer over this repository's own docs (real
English, code, tables and a few multi-byte characters), 16 sequences, each a different window of
that token stream. Each step hands the processor one token per sequence as arrays -- what
`EngineCore.step()` gives `LLM`, and the engine process's ring gives `AsyncEngineClient` --
with three stop strings that never match, the worst case: every token is detokenized and
searched. Measured at 128 and 2,048 tokens a sequence; the target (issue 15) is a flat cost,
at most 1.2x per token between the two. Streamed (`--streamed`): the same with each request's
output taken after every step, as a server takes them (the lists shared, not copied): its cost
per token must not grow with the output either (each output once joined all the text before).

The peer is the offline path before the one output path: at every step it decoded each
sequence's whole output again and searched all of it for the stop strings (quadratic in length).
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import numpy as np

from bench import records
from minivllm.frontend.output_processor import OutputProcessor
from minivllm.loader import load_tokenizer, resolve_model
from minivllm.sampling_params import SamplingParams
from minivllm.transport.protocol import FINISH_LENGTH, FINISH_NONE

SEQS = 16
STOPS = ["<|never|>", "\n\n\n\n\n", "STOP-STRING-ABSENT"]
ROOT = pathlib.Path(__file__).resolve().parent.parent


def recorded_streams(tokenizer, length: int) -> list[list[int]]:
    text = "\n".join(p.read_text() for p in sorted(ROOT.glob("**/*.md"))
                     if ".git" not in p.parts) + " café — naïve 東京 🙂"
    ids = tokenizer.encode(text)
    assert len(ids) >= length + SEQS * 97, "not enough recorded text"
    return [ids[i * 97:i * 97 + length] for i in range(SEQS)]


def time_processor(tokenizer, streams: list[list[int]], streamed: bool = False) -> float:
    """Seconds per output token: every step through OutputProcessor.process, then the outputs
    (`streamed`: every request's output after each step, lists shared as the server's)."""
    proc = OutputProcessor(tokenizer, eos_token_ids=[2])
    params = SamplingParams(max_tokens=len(streams[0]), stop=STOPS)
    keys = iter(range(SEQS))
    states = [proc.add_request(str(i), None, [1], params, lambda: next(keys))
              for i in range(SEQS)]
    for state in states:
        state.copy_lists = False
        state.copy_token_ids = False  # (the name before 'copy_lists': an A/B runs both trees)
    owners = np.arange(SEQS, dtype=np.int64)
    tokens = np.array(streams, dtype=np.int64).T.copy()  # [step, seq]
    running = np.full(SEQS, FINISH_NONE, np.uint8)
    last = np.full(SEQS, FINISH_LENGTH, np.uint8)
    t0 = time.perf_counter()
    for step, row in enumerate(tokens):
        touched, stopped = proc.process(owners, row, last if step == len(tokens) - 1 else running)
        assert not stopped
        if streamed:
            for state in touched:
                state.snapshot()
    outputs = [s.snapshot() for s in states]
    elapsed = time.perf_counter() - t0
    assert all(o.finished and len(o.outputs[0].token_ids) == len(tokens) for o in outputs)
    return elapsed / tokens.size


def time_full_redecode(tokenizer, streams: list[list[int]]) -> float:
    """The previous offline path's cost: each step re-decodes every output and searches it."""
    outputs: list[list[int]] = [[] for _ in streams]
    t0 = time.perf_counter()
    for step in range(len(streams[0])):
        for seq, out in zip(streams, outputs):
            out.append(seq[step])
            text = tokenizer.decode(out, skip_special_tokens=True)
            assert not any(s in text for s in STOPS)
    return (time.perf_counter() - t0) / (len(streams) * len(streams[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs=2, default=[128, 2048])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--streamed", type=int, default=0, metavar="TOKENS",
                    help="only the streamed cost per token (an output taken every step) at 128 "
                         "and TOKENS a sequence, of the minivllm on PYTHONPATH (an A/B: one "
                         "run per code tree, --label naming it)")
    ap.add_argument("--label", default="", help="the code tree, in --streamed records' names")
    args = ap.parse_args()
    tokenizer = load_tokenizer(resolve_model(None, "auto"))
    if args.streamed:
        recs = []
        for length in (128, args.streamed):
            streams = recorded_streams(tokenizer, length)
            us = [time_processor(tokenizer, streams, True) * 1e6 for _ in range(args.repeats)]
            name = (f"streamed output path ({args.label}), {SEQS} seqs x {length} tokens, "
                    f"3 stop strings, an output every step")
            print(f"{name}: {statistics.median(us):.2f} us/token "
                  f"(runs {', '.join(f'{u:.2f}' for u in us)})")
            recs.append(records.record(name, statistics.median(us), "us/token", runs=us))
        records.write(args.json, recs)
        return
    short, long = args.lengths
    us = {}
    for name, fn in (("processor", time_processor), ("full re-decode", time_full_redecode)):
        for length in (short, long):
            streams = recorded_streams(tokenizer, length)
            repeats = args.repeats if name == "processor" or length == short else 1
            us[name, length] = statistics.median(fn(tokenizer, streams)
                                                 for _ in range(repeats)) * 1e6
    recs = []
    for length in (short, long):
        recs.append(records.record(
            f"output path, {SEQS} seqs x {length} tokens, 3 stop strings: OutputProcessor",
            us["processor", length], "us/token", peer=us["full re-decode", length],
            peer_name="full re-decode per step (the old offline path)"))
    growth = us["processor", long] / us["processor", short]
    recs.append(records.record(
        f"output path: per-token cost at {long} / at {short} tokens a sequence", growth, "x",
        peer=us["full re-decode", long] / us["full re-decode", short],
        peer_name="the old offline path's growth", target="<= 1.2x", met=growth <= 1.2))
    records.write(args.json, recs)


if __name__ == "__main__":
    main()
