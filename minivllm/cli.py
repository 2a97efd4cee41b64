"""Command line: `minivllm generate "prompt"`, `minivllm chat`, `minivllm serve`,
`minivllm run-batch`, and `minivllm reference`: the Markdown reference of every flag
(docs/configuration.md is its output; a test holds the two together)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from minivllm.config import (CUDA_GRAPH_MODES, DTYPES, KERNEL_SETS, LOAD_FORMATS, QUANTIZATIONS,
                             ServerConfig, ZmqEndpointConfig)

_MODEL_HELP = ("HF directory, .gguf file, or dummy preset (default: the embedded "
               "SmolLM2-135M-Instruct)")
_EXIT_WORDS = ("/exit", "/quit")  # chat commands handled here, never sent to the model


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows every default: argparse's own " (default: X)" unless the help already
    says what the default means (a None that stands for "the model's", say)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.required or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _engine_args(p: argparse.ArgumentParser, model_flag: bool = True) -> None:
    if model_flag:
        p.add_argument("--model", default=None, help=_MODEL_HELP)
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="how to read the model: auto guesses from the path; dummy makes random "
                        "weights of a named shape (qwen2.5-0.5b, llama-3-8b, ...)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights and activations; auto: the checkpoint's, bfloat16 on the CPU "
                        "kernels")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda if "
                   "available)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length, prompt + output (default: the model's)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampler and of dummy weights")
    p.add_argument("--kernels", default=None, choices=["auto", *KERNEL_SETS],
                   help="kernel set; a set the CPU lacks is an error at start (default: "
                        "$MINIVLLM_KERNELS, else auto: the best the machine has)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: every step launches its kernels one by one")
    p.add_argument("--cuda-graph-mode", default="full", choices=CUDA_GRAPH_MODES,
                   help="which steps replay CUDA graphs: full (every step up to the token "
                        "budget) or decode-only (prefill and mixed steps eager)")
    p.add_argument("--quantization", default="auto", choices=QUANTIZATIONS,
                   help="GGUF weights on the CPU kernels: gguf-native keeps them quantized, "
                        "gguf-native-q8 also quantizes their inputs to int8 (AVX512-VNNI), "
                        "none dequantizes at load, auto takes the fastest")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks the model is split over, one process each (rank 0 spawns the "
                        "others on this host)")
    p.add_argument("--generation-config", default="auto",
                   help="default sampling for requests that leave it unset: auto (the model "
                        "directory's generation_config.json), vllm (none), or a file or "
                        "directory path")


def _parallel(args) -> dict:
    """--tensor-parallel-size, or under torchrun (this being rank 0) its environment."""
    from minivllm.distributed.launch import from_env

    launch = from_env()
    if launch is None:
        return dict(tensor_parallel_size=args.tensor_parallel_size)
    if args.tensor_parallel_size not in (1, launch.world_size):
        raise ValueError(f"--tensor-parallel-size {args.tensor_parallel_size} contradicts "
                         f"WORLD_SIZE {launch.world_size}")
    return launch.parallel_options()


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens at most per answer")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 is greedy (the same answer every run)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens whose probabilities sum to this")
    p.add_argument("--top-k", type=int, default=-1,
                   help="sample from the k likeliest tokens (-1: all)")


# The flags whose dest is an engine option's keyword (LLM(...), build_engine_config).
_ENGINE_OPTIONS = ("load_format", "dtype", "device", "max_model_len", "seed", "kernels",
                   "enforce_eager", "cuda_graph_mode",
                   "generation_config", "quantization", "data_parallel_size", "max_num_seqs",
                   "max_num_batched_tokens", "enable_chunked_prefill", "policy", "batch_wait_ms",
                   "async_scheduling", "block_size", "num_blocks", "cpu_kv_cache_bytes",
                   "gpu_memory_utilization", "enable_prefix_caching")


def _engine_options(args) -> dict:
    """The engine flags this subcommand has, as keywords."""
    return {**{k: getattr(args, k) for k in _ENGINE_OPTIONS if hasattr(args, k)},
            **_parallel(args)}


def _make_llm(args):
    from minivllm import LLM
    return LLM(args.model, **_engine_options(args))


def _params(args):
    from minivllm import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k)


def cmd_generate(args) -> int:
    params = _params(args)  # bad options fail before the model loads
    llm = _make_llm(args)
    for out in llm.generate(args.prompt, params, use_tqdm=False):
        print(out.outputs[0].text)
    return 0


def cmd_chat(args) -> int:
    """Chat turn by turn, the answer printed as it is generated. Interactive unless --message
    is given; /exit, /quit or end of input leaves (Ctrl-C too: main turns it into 130)."""
    params = _params(args)
    llm = _make_llm(args)
    tokenizer = llm.get_tokenizer()
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer, and this model has none: use generate with "
                         "token ids, or a model that has one")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    prompts = list(args.message) if args.message else None
    if prompts is None:
        print(f"Type a message; {' or '.join(_EXIT_WORDS)} (or Ctrl-D) leaves.", flush=True)
    while True:
        if prompts is not None:
            if not prompts:
                return 0
            user = prompts.pop(0)
        else:
            try:
                user = input("you> ")
            except EOFError:
                print()  # the prompt line was left open
                return 0
        if not user.strip():
            continue
        if user.strip().lower() in _EXIT_WORDS:
            return 0
        messages.append({"role": "user", "content": user})
        if prompts is None:
            print("assistant> ", end="", flush=True)
        reply = ""
        for out in llm.stream(tokenizer.apply_chat_template(messages, True), params):
            delta = out.outputs[0].delta_text
            reply += delta
            print(delta, end="", flush=True)
        print(flush=True)
        messages.append({"role": "assistant", "content": reply})


def _scheduler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-num-seqs", type=int, default=256,
                   help="requests running at once (the batch); the others wait")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens one engine step computes at most, prefill and decode together")
    p.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false",
                   help="prefill a prompt in one step instead of in chunks beside the decodes "
                        "(default: chunked)")
    p.add_argument("--policy", default="decode-first", choices=["decode-first", "prefill-first"],
                   help="what a step fills first: running decodes (steady inter-token times) "
                        "or waiting prompts (lower time to first token)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="an idle engine waits up to this long for more arrivals before its "
                        "first prefill (dynamic batching; 0: no wait)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule the next step while the GPU runs this one (default: on CUDA)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (default: "
                   "from --cpu-kv-cache-bytes or --gpu-memory-utilization)")
    p.add_argument("--cpu-kv-cache-bytes", type=int, default=1 << 30,
                   help="KV-cache size on the CPU, in bytes (1 GiB)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of the GPU's memory the weights, activations and KV cache may "
                        "take")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="do not reuse the KV blocks of a prompt prefix seen before (default: "
                        "reused)")


def _engine_config(args):
    from minivllm.llm import build_engine_config

    return build_engine_config(args.model, **_engine_options(args))


def cmd_serve(args) -> int:
    from minivllm.config import SupervisorConfig, TransportConfig
    from minivllm.server.launcher import Launcher

    engine = _engine_config(args)
    server = ServerConfig(host=args.host, port=args.port, api_servers=args.api_servers,
                          max_pending=args.max_pending, drain_timeout_s=args.drain_timeout,
                          api_key=args.api_key, served_model_name=args.served_model_name,
                          max_body_bytes=args.max_body_bytes, dashboard=args.dashboard,
                          chat_template=args.chat_template,
                          tool_call_parser=args.tool_call_parser,
                          stream_interval_s=args.stream_interval_ms / 1000)
    transport = TransportConfig(zmq_endpoint=args.zmq_endpoint, zmq=ZmqEndpointConfig(
        max_message_bytes=args.zmq_max_message_bytes,
        max_in_flight_per_peer=args.zmq_max_in_flight_per_peer,
        max_in_flight=args.zmq_max_in_flight, max_refusals=args.zmq_max_refusals,
        curve_secret_key=args.zmq_curve_secret_key, curve_clients=args.zmq_curve_clients))
    from minivllm import logger as log_setup

    log_setup.configure()
    return Launcher(engine, server, transport, SupervisorConfig()).run()


def cmd_run_batch(args) -> int:
    from minivllm import logger as log_setup
    from minivllm.server.run_batch import BatchConfig, run_batch

    config = BatchConfig(args.input_file, args.output_file, args.max_concurrency,
                         args.served_model_name)
    engine = _engine_config(args)
    log_setup.configure()
    return run_batch(engine, config)


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and flag (also the source of docs/configuration.md)."""
    parser = argparse.ArgumentParser(prog="minivllm", formatter_class=_HelpFormatter,
                                     description="A small LLM inference engine and server "
                                                 "built the way vLLM is built.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)

    gen = add("generate", "complete one or more prompts and print each completion")
    gen.add_argument("prompt", nargs="+", help="the prompts, each one argument")
    chat = add("chat", "chat with the model, each answer streamed as it is generated "
                       "(interactive: /exit, /quit or Ctrl-D leaves; or --message)")
    chat.add_argument("--message", action="append",
                      help="send this and exit (repeatable: one turn each) (default: none, "
                           "interactive)")
    chat.add_argument("--system", default=None,
                      help="a system message opening the conversation (default: none)")
    for p in (gen, chat):
        _engine_args(p)
        _sampling_args(p)
    serve = add("serve", "OpenAI-compatible HTTP server (Ctrl-C or SIGTERM drains and stops)")
    serve.add_argument("model", nargs="?", default=None, help=_MODEL_HELP)
    _engine_args(serve, model_flag=False)
    _scheduler_args(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000,
                       help="TCP port (0: a free one, printed once serving)")
    serve.add_argument("--api-servers", type=int, default=1,
                       help="API-server processes sharing the port, each a frontend")
    serve.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                       help="engines behind the API servers, each on its own GPU or its own "
                            "CPU cores; each new request goes to the least loaded")
    serve.add_argument("--max-pending", type=int, default=1024,
                       help="requests in flight per API server before 429")
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish on SIGTERM/SIGINT")
    serve.add_argument("--max-body-bytes", type=int, default=ServerConfig.max_body_bytes,
                       help="a larger request body gets 413 before any work (default: 8 MiB)")
    serve.add_argument("--api-key", default=None,
                       help="require `Authorization: Bearer KEY` on /v1/*, /tokenize, "
                            "/detokenize and the dashboard's events (default: none, open)")
    serve.add_argument("--stream-interval-ms", type=float, default=0.0,
                       help="a streamed response sends at most one chunk per this many ms, "
                            "the tokens of the steps between together: less CPU per token "
                            "(default: 0, a chunk per engine step)")
    serve.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                       help="do not serve the live dashboard at /dashboard (default: served)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model's name in the API (default: the model's own)")
    serve.add_argument("--chat-template", default=None, metavar="FILE",
                       help="a jinja chat template used instead of the model's, e.g. "
                            "examples/tool_chat_template_smollm2.jinja (tools) (default: the "
                            "model's)")
    serve.add_argument("--tool-call-parser", default=None, choices=["hermes"],
                       help="take tool calls out of tool_choice=auto outputs "
                            "(<tool_call>{json}</tool_call>) (default: none, tool calls stay "
                            "text)")
    serve.add_argument("--zmq-endpoint", default=None,
                       help="also serve the binary protocol here (ipc/PROTOCOL.md), e.g. "
                            "tcp://127.0.0.1:5557 (default: none, HTTP only)")
    zmq_limits = ZmqEndpointConfig()
    serve.add_argument("--zmq-max-message-bytes", type=int, default=None,
                       help="a larger frame disconnects its peer (default: a whole context's "
                            "prompt, at least 64 KiB)")
    serve.add_argument("--zmq-max-in-flight-per-peer", type=int,
                       default=zmq_limits.max_in_flight_per_peer,
                       help="unfinished requests per ZeroMQ connection before OVERLOADED")
    serve.add_argument("--zmq-max-in-flight", type=int, default=zmq_limits.max_in_flight,
                       help="unfinished requests of all ZeroMQ connections before OVERLOADED")
    serve.add_argument("--zmq-max-refusals", type=int, default=zmq_limits.max_refusals,
                       help="OVERLOADED refusals in a row for its own limit after which a "
                            "ZeroMQ connection is cut off (its requests aborted, refused until "
                            "it reconnects)")
    serve.add_argument("--zmq-curve-secret-key", default=None,
                       help="CURVE: the server's certificate file with its secret key "
                            "(zmq.auth.create_certificates writes NAME.key_secret) (default: "
                            "none, no encryption)")
    serve.add_argument("--zmq-curve-clients", default=None,
                       help="CURVE: directory of the allowed clients' public certificates "
                            "(*.key); only they can connect (default: none)")
    batch = add("run-batch", "OpenAI batch file (JSONL) in, results out; resumable: a rerun "
                             "keeps the results written and runs the rest")
    batch.add_argument("-i", "--input-file", required=True,
                       help="one request a line: {custom_id, method, url, body}")
    batch.add_argument("-o", "--output-file", required=True,
                       help="one result a line, written as each finishes")
    batch.add_argument("--max-concurrency", type=int, default=256,
                       help="requests in flight at once")
    batch.add_argument("--served-model-name", default=None,
                       help="the model's name in the results (default: the model's own)")
    _engine_args(batch)
    _scheduler_args(batch)
    add("reference", "print the Markdown reference of every subcommand's flags (the source "
                     "of docs/configuration.md)")
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _cell(text: str) -> str:
    # escaped so that GitHub shows them as written: a table cell, a tag, emphasis
    text = " ".join(text.split())
    for char, escaped in (("|", "\\|"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*")):
        text = text.replace(char, escaped)
    return text


def configuration_reference(parser: Optional[argparse.ArgumentParser] = None) -> str:
    """docs/configuration.md: each subcommand's flags with their help and default, as
    `--help` shows them, in one Markdown table per subcommand."""
    parser = parser or build_parser()
    lines = ["# Configuration reference", "",
             "<!-- Generated from minivllm/cli.py by `python -m minivllm.cli reference > "
             "docs/configuration.md`; do not edit (tests/test_docs.py fails when they "
             "differ). -->", "",
             "Every flag of every `minivllm` subcommand, as `minivllm COMMAND --help` prints "
             "it. `LLM(...)` takes the engine and scheduler flags as keywords: "
             "`--max-num-seqs 8` is `max_num_seqs=8`, `--no-prefix-caching` is "
             "`enable_prefix_caching=False`.", ""]
    for name, sub in _subcommands(parser).items():
        # no usage line: argparse lays it out differently from one Python to the next
        lines += [f"## `minivllm {name}`", "", sub.description or "", ""]
        rows = [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        if not rows:
            continue
        lines += ["| flag | default | meaning |", "|---|---|---|"]
        formatter = sub._get_formatter()
        for action in rows:
            flag = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
            if action.choices is not None:
                flag += " {" + ", ".join(f"`{c}`" for c in action.choices) + "}"
            text = formatter._expand_help(action)
            default = "required" if action.required else ""
            if text.endswith(")") and "(default: " in text:
                text, default = text[:-1].rsplit("(default: ", 1)
            lines.append(f"| {flag} | {_cell(default)} | {_cell(text)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "reference":
        sys.stdout.write(configuration_reference())
        return 0
    try:
        from minivllm.distributed.launch import run_launched_worker

        if run_launched_worker():  # under torchrun, as a rank > 0
            return 0
        return {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve,
                "run-batch": cmd_run_batch}[args.command](args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the requests were aborted on the way out
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
