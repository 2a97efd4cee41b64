"""Structured outputs: 1,000 constrained outputs checked, and what the grammar costs in tok/s.

CPU (the embedded SmolLM2, fp32):
    python -m bench.structured_outputs --json bench/results/structured_outputs_cpu.json
H200 (dummy weights carry no tokenizer: a synthetic byte-level vocabulary of the model's size
stands in for the grammar compiler; the conformance part needs a real model and is skipped):
    python -m bench.structured_outputs --model qwen2.5-0.5b --load-format dummy \
        --dtype bfloat16 --json bench/results/structured_outputs_h200.json

Conformance: `--outputs` requests spread over json_schema / regex / choice / grammar (EBNF),
sampled (temperature 0.7, a seed each); every output that finishes with "stop" must parse and
validate (jsonschema for schemas, Python's re for regexes and for each grammar's language,
membership for choices); those cut by "length" are counted apart.

Throughput: `--batch` requests under one nested schema (objects, arrays, enums), greedy,
exactly `--tokens` tokens each (ignore_eos), against the same requests unconstrained on the
same engine, runs interleaved (U C C U U C ...) because other processes share this CPU; the
load average is recorded around each run. The schema is compiled in a warm-up, so no timed
step waits on a compile; tokens after a grammar has ended (EOS accepted, ignored) run
unconstrained, and the share of constrained tokens is recorded. Each constrained output is
checked: a fresh matcher must accept every token up to the grammar's end (dummy weights seldom
end their JSON within the run), and the outputs that ended must validate.

Compile overlap: a large schema not in the cache arrives while the batch decodes; the steps
that run before it has compiled are counted (the request waits in its own state, the others
go on).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import torch

from bench import records
from minivllm import LLM, SamplingParams, StructuredOutputsParams
from minivllm.tokenizer import Tokenizer

ORDER = {"type": "object", "properties": {
    "order_id": {"type": "integer", "minimum": 1},
    "status": {"enum": ["pending", "paid", "shipped", "delivered"]},
    "customer": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "tier": {"enum": ["basic", "gold", "platinum"]}}, "required": ["name", "tier"]},
    "items": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
        "type": "object", "properties": {
            "sku": {"type": "string", "pattern": "[A-Z]{3}-[0-9]{3}"},
            "qty": {"type": "integer", "minimum": 1, "maximum": 99},
            "gift": {"type": "boolean"}}, "required": ["sku", "qty", "gift"]}},
    "note": {"type": "string", "maxLength": 60}},
    "required": ["order_id", "status", "customer", "items", "note"]}

SCHEMAS = [
    ("a person", {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}},
        "required": ["name", "age", "pets"]}),
    ("a point on a map", {"type": "object", "properties": {
        "lat": {"type": "number"}, "lon": {"type": "number"}, "label": {"type": "string",
                                                                         "maxLength": 16}},
        "required": ["lat", "lon", "label"]}),
    ("a book", {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 30},
        "year": {"type": "integer", "minimum": 1450, "maximum": 2030},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                 "maxItems": 3}}, "required": ["title", "year", "tags"]}),
    ("the weather", {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "celsius": {"type": "integer"},
        "sky": {"enum": ["sunny", "rainy", "cloudy", "snowy"]}},
        "required": ["city", "celsius", "sky"]}),
    ("an order", ORDER),
]
REGEXES = [("a phone number", r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"),
           ("a date", r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"),
           ("an email address", r"[a-z]{3,10}@[a-z]{3,8}\.(com|org|net)"),
           ("an IP address", r"([0-9]{1,3}\.){3}[0-9]{1,3}"),
           ("a name", r"[A-Z][a-z]{1,12}( [A-Z][a-z]{1,12}){0,2}")]
CHOICES = [("the sentiment of 'I love it'", ["positive", "negative", "neutral"]),
           ("a colour", ["red", "green", "blue", "yellow"]),
           ("a capital city", ["Paris", "London", "Berlin", "Madrid", "Rome"]),
           ("whether the sky is blue", ["yes", "no"])]
# EBNF grammars, each with a Python regex of the same language to check outputs by
GRAMMARS = [
    ("a sum", 'root ::= num (" + " num)*\nnum ::= [1-9] [0-9]*',
     r"[1-9][0-9]*( \+ [1-9][0-9]*)*"),
    ("a SQL query", 'root ::= "SELECT " col (", " col)* " FROM " name ";"\n'
                    'col ::= name | "*"\nname ::= [a-z_]+',
     r"SELECT ([a-z_]+|\*)(, ([a-z_]+|\*))* FROM [a-z_]+;"),
    ("settings", 'root ::= pair ("; " pair)*\npair ::= [a-z]+ "=" [0-9]+',
     r"[a-z]+=[0-9]+(; [a-z]+=[0-9]+)*"),
    ("a yes/no answer with a reason", 'root ::= ("Yes" | "No") ", because " [a-z ]+ "."',
     r"(Yes|No), because [a-z ]+\."),
]


def conformance_cases(n: int) -> list[tuple[str, str, StructuredOutputsParams, object, int]]:
    """(kind, prompt, spec, check, max_tokens) for n requests, kinds in turn."""
    kinds = [[("json_schema", f"Give {what} as JSON.", StructuredOutputsParams(json=s),
               (lambda s: lambda t: jsonschema.validate(json.loads(t), s))(s), 192)
              for what, s in SCHEMAS],
             [("regex", f"Write {what}.", StructuredOutputsParams(regex=r),
               (lambda r: lambda t: re.fullmatch(r, t) is not None)(r), 48) for what, r in REGEXES],
             [("choice", f"Name {what}.", StructuredOutputsParams(choice=c),
               (lambda c: lambda t: t in c)(c), 16) for what, c in CHOICES],
             [("grammar", f"Write {what}.", StructuredOutputsParams(grammar=g),
               (lambda r: lambda t: re.fullmatch(r, t) is not None)(r), 64)
              for what, g, r in GRAMMARS]]
    return [kinds[i % 4][(i // 4) % len(kinds[i % 4])] for i in range(n)]


def check(fn, text: str) -> bool:
    try:
        return fn(text) is not False
    except (ValueError, jsonschema.ValidationError):
        return False


def run_conformance(llm: LLM, n: int) -> list[dict]:
    tok = llm.get_tokenizer()
    cases = conformance_cases(n)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for _, p, *_ in cases]
    params = [SamplingParams(temperature=0.7, top_p=0.95, seed=i, max_tokens=m,
                             structured_outputs=spec)
              for i, (_, _, spec, _, m) in enumerate(cases)]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tally: dict[str, dict] = {}
    for (kind, _, _, fn, _), out in zip(cases, outs):
        c = out.outputs[0]
        t = tally.setdefault(kind, {"outputs": 0, "stop": 0, "valid": 0, "length": 0,
                                    "invalid_examples": []})
        t["outputs"] += 1
        t[c.finish_reason] += 1
        if c.finish_reason == "stop":
            if check(fn, c.text):
                t["valid"] += 1
            elif len(t["invalid_examples"]) < 5:
                t["invalid_examples"].append(c.text)
    total_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"conformance: {n} outputs, {total_tokens} tokens in {elapsed:.0f} s")
    results = []
    for kind, t in tally.items():
        print(f"  {kind:12s} {t['outputs']} outputs: {t['stop']} stop ({t['valid']} valid), "
              f"{t['length']} length")
        results.append(records.record(f"structured {kind}: stop outputs that validate",
                                      t["valid"] / max(t["stop"], 1), "fraction", **t))
    return results


def synthetic_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    """A byte-level vocabulary of `vocab_size` - 300 tokens for dummy weights, shaped like a
    real BPE one (what a grammar's mask costs depends on it): the 256 bytes, the JSON
    punctuation pairs real vocabularies hold, then word pieces of letters (4 in 10 space-led,
    some capitalized) and a few digit runs. The ids past it, where models keep their control
    tokens, stay out of every grammar. (Random pieces mixing quotes and punctuation made
    xgrammar's mask fill 1,000x slower than on a real vocabulary: every such token is checked
    against the grammar at every step.)"""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    rng = random.Random(seed)
    pieces = dict.fromkeys(sorted(ByteLevel.alphabet()))
    pieces.update(dict.fromkeys(['",', '":', '{"', '"}', '},', '],', '["', '"]', 'Ġ"', 'Ġ{',
                                 'Ġ[', '":Ġ"', '",Ġ"', '":Ġ', '},Ġ{', 'ĠĠ', 'ĠĠĠĠ', 'Ċ', 'ĊĠĠ']))
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 6, 4.3, 4, 2.8, 2.8, 2.4, 2.4, 2.2, 2, 2, 1.9,
               1.5, 1, 0.8, 0.2, 0.2, 0.1, 0.1]
    while len(pieces) < vocab_size - 300:
        if rng.random() < 0.03:
            piece = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 3)))
        else:
            piece = "".join(rng.choices(letters, weights, k=rng.randint(2, 9)))
            if rng.random() < 0.15:
                piece = piece.capitalize()
        pieces["Ġ" + piece if rng.random() < 0.4 else piece] = None
    backend = Backend(models.BPE({p: i for i, p in enumerate(pieces)}, []))
    backend.decoder = decoders.ByteLevel()  # the outputs' text, to validate
    return Tokenizer(backend, {}, None)


def sync(llm: LLM) -> None:
    if llm.engine.runner.device.type == "cuda":
        torch.cuda.synchronize()


def timed_run(llm: LLM, prompts: list, params: SamplingParams, tokens: int) -> dict:
    grammars = llm.engine.grammars
    load_before = os.getloadavg()[0]
    mask_s, fill_s = grammars.mask_time_s, grammars.fill_time_s
    sync(llm)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync(llm)
    elapsed = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
    eos = set(llm.engine.eos_token_ids)
    ends = [next((i for i, t in enumerate(o.outputs[0].token_ids) if t in eos), None)
            for o in outs]
    run = {"tok_s": len(prompts) * tokens / elapsed, "seconds": elapsed,
           "mask_s": grammars.mask_time_s - mask_s, "fill_s": grammars.fill_time_s - fill_s,
           "constrained_share": sum(tokens if e is None else e + 1 for e in ends)
           / (len(prompts) * tokens),
           "load_before": load_before, "load_after": os.getloadavg()[0]}
    if params.structured_outputs is not None:
        # Every token up to the grammar's EOS must be one a fresh matcher accepts (the masks
        # were applied to the right rows at the right step), and the text up to EOS must
        # validate; past EOS, ignore_eos runs free.
        import xgrammar

        compiled = grammars._load().compile_json_schema(json.dumps(ORDER), any_whitespace=False)
        tok = llm.get_tokenizer() or grammars.tokenizer
        run["grammar_accepts"] = sum(
            all(map(xgrammar.GrammarMatcher(compiled).accept_token,
                    o.outputs[0].token_ids[:tokens if e is None else e + 1]))
            for o, e in zip(outs, ends))
        run["ended"] = sum(e is not None for e in ends)
        run["valid"] = sum(check(lambda text: jsonschema.validate(json.loads(text), ORDER),
                                 tok.decode(o.outputs[0].token_ids[:e]))
                           for o, e in zip(outs, ends) if e is not None)
    return run


def print_profile(llm: LLM, prompts: list, params: SamplingParams, name: str) -> None:
    """The host calls a run spends most in (a device wait shows as cudaStreamSynchronize or
    a copy), to find what keeps the host from running ahead of the GPU."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if llm.engine.runner.device.type == "cuda":  # adds the CUDA runtime's calls
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        sync(llm)
    print(f"profile, {name}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def run_throughput(llm: LLM, batch: int, tokens: int, rounds: int,
                   profile: bool = False) -> list[dict]:
    tok = llm.get_tokenizer()
    vocab = llm.engine.source.arch.vocab_size
    if tok is not None and tok.chat_template:
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content":
                   f"Give order number {i} of our shop as JSON."}])) for i in range(batch)]
    else:
        rng = random.Random(0)
        prompts = [[rng.randrange(10, vocab - 400) for _ in range(64)] for _ in range(batch)]
    plain = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True,
                                 structured_outputs=StructuredOutputsParams(json=ORDER))
    for p in (plain, constrained):  # warm-up: compiles the schema, grows the allocator
        llm.generate(prompts, p, use_tqdm=False)
    runs: dict[str, list[dict]] = {"unconstrained": [], "constrained": []}
    for r in range(rounds):
        order = ("unconstrained", "constrained") if r % 2 == 0 else ("constrained",
                                                                     "unconstrained")
        for name in order:
            run = timed_run(llm, prompts, constrained if name == "constrained" else plain,
                            tokens)
            runs[name].append(run)
            valid = (f", grammar accepts {run['grammar_accepts']} of {len(prompts)} outputs, "
                     f"{run['valid']} of {run['ended']} ended validate"
                     if "valid" in run else "")
            print(f"  {name:13s} {run['tok_s']:8.1f} tok/s  (mask {run['mask_s']:.3f} s, "
                  f"fill {run['fill_s']:.3f} s, load {run['load_before']:.1f} -> "
                  f"{run['load_after']:.1f}{valid})")
    medians = {k: statistics.median(r["tok_s"] for r in v) for k, v in runs.items()}
    ratio = medians["constrained"] / medians["unconstrained"]
    print(f"throughput: constrained {medians['constrained']:.1f} / unconstrained "
          f"{medians['unconstrained']:.1f} tok/s = {ratio:.3f}")
    if profile:
        for name, p in (("unconstrained", plain), ("constrained", constrained)):
            print_profile(llm, prompts, p, name)
    return [records.record(f"batch {batch} x {tokens} tokens, nested schema: constrained tok/s",
                           medians["constrained"], "tok/s", peer=medians["unconstrained"],
                           peer_name="unconstrained, same engine", runs=runs)]


def run_fill_threads(llm: LLM, batch: int, steps: int = 80) -> list[dict]:
    """xgrammar's batched mask fill by thread count on this host: `batch` matchers of the
    nested schema walk it together (each step accepts a random allowed token per row), and
    each step's fill is timed (the per-step host cost a constrained step adds)."""
    import xgrammar

    grammars = llm.engine.grammars
    compiled = grammars._load().compile_json_schema(json.dumps(ORDER), any_whitespace=False)
    vocab = llm.engine.source.arch.vocab_size
    bitmask = xgrammar.allocate_token_bitmask(batch, vocab)
    shifts = torch.arange(32, dtype=torch.int32)
    results = []
    # "2 x 1": the rows split over two Python threads, each a one-thread batched fill
    # (xgrammar releases the GIL while it fills): what a split would give the engine.
    pool = ThreadPoolExecutor(2)
    halves = [xgrammar.BatchGrammarMatcher(1) for _ in range(2)]
    half = batch // 2

    def split_fill(matchers: list) -> None:
        parts = [(halves[0], matchers[:half], list(range(half))),
                 (halves[1], matchers[half:], list(range(half, batch)))]
        for f in [pool.submit(b.batch_fill_next_token_bitmask, m, bitmask, rows)
                  for b, m, rows in parts]:
            f.result()

    for threads in (1, 2, 4, 8, "auto", "2 x 1"):
        filler = None if threads == "2 x 1" else xgrammar.BatchGrammarMatcher(threads)
        matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(batch)]
        rng, fill_s = random.Random(0), []
        for _ in range(steps):
            t0 = time.perf_counter()
            if filler is None:
                split_fill(matchers)
            else:
                filler.batch_fill_next_token_bitmask(matchers, bitmask)
            fill_s.append(time.perf_counter() - t0)
            allowed = ((bitmask.unsqueeze(2) >> shifts) & 1).flatten(1)[:, :vocab]
            for row, matcher in enumerate(matchers):
                ids = allowed[row].nonzero().flatten().tolist()
                if ids and not matcher.is_terminated():
                    matcher.accept_token(ids[rng.randrange(len(ids))])
        median = statistics.median(fill_s)
        print(f"  mask fill, {batch} rows, threads {threads}: {median * 1e3:.3f} ms a step "
              f"(median of {steps})")
        results.append(records.record(f"mask fill of {batch} rows, xgrammar threads {threads}",
                                      median * 1e3, "ms", mean_ms=statistics.mean(fill_s) * 1e3,
                                      steps=steps, cores=os.cpu_count()))
    return results


def run_compile_overlap(llm: LLM, batch: int) -> list[dict]:
    """A schema of 400 properties (not in the cache) arrives while `batch` unconstrained
    requests decode: the steps taken while it compiles, and the longest of them, against the
    steps before it came."""
    engine, rng = llm.engine, random.Random(1)
    prompt = [rng.randrange(10, 1000) for _ in range(16)]
    plain = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
    owners = [10**9 + i for i in range(batch)]
    for owner in owners:
        engine.add_request(owner, prompt, plain)
    before = []
    for _ in range(4):
        t0 = time.perf_counter()
        engine.step()
        before.append(time.perf_counter() - t0)
    schema = {"type": "object", "required": [f"field_{rng.getrandbits(40):x}_{i}"
                                             for i in range(400)]}
    schema["properties"] = {name: {"type": "string", "pattern": "[a-z]{2,8}"}
                            for name in schema["required"]}
    start = time.perf_counter()
    engine.add_request(10**9 + batch, prompt, SamplingParams(
        max_tokens=2, structured_outputs=StructuredOutputsParams(json=schema)))
    during = []
    while engine.grammars.waiting:
        t0 = time.perf_counter()
        engine.step()
        during.append(time.perf_counter() - t0)
    compile_s = time.perf_counter() - start
    for owner in owners + [10**9 + batch]:
        engine.abort_request(owner)
    while engine.has_unfinished():
        engine.step()
    print(f"compile overlap: {len(during)} steps ran in the {compile_s:.2f} s the schema took "
          f"to compile; longest {max(during, default=0) * 1e3:.0f} ms (before: "
          f"{max(before) * 1e3:.0f} ms)")
    return [records.record("steps run while a 400-property schema compiled", len(during),
                           "steps", compile_s=compile_s, longest_step_s=max(during, default=0),
                           longest_step_before_s=max(before), batch=batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--outputs", type=int, default=1000, help="conformance requests (0: skip)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per throughput request")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved throughput run pairs")
    ap.add_argument("--profile", action="store_true",
                    help="print where the host's time goes in one run of each kind")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype,
              max_num_seqs=max(args.batch, 64))
    results = []
    if llm.get_tokenizer() is None:
        print("no tokenizer (dummy weights): conformance skipped; a synthetic vocabulary "
              "stands in for the grammar compiler")
        llm.engine.grammars.tokenizer = synthetic_tokenizer(llm.engine.source.arch.vocab_size)
    elif args.outputs:
        results += run_conformance(llm, args.outputs)
    results += run_fill_threads(llm, args.batch)
    results += run_throughput(llm, args.batch, args.tokens, args.rounds, args.profile)
    results += run_compile_overlap(llm, args.batch)
    records.write(args.json, results)


if __name__ == "__main__":
    main()
