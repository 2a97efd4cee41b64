"""Command line: `minivllm generate "prompt"`, `minivllm chat`, `minivllm serve`,
`minivllm run-batch`."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from minivllm.config import KERNEL_SETS, QUANTIZATIONS, ServerConfig, ZmqEndpointConfig

_MODEL_HELP = ("HF directory, .gguf file, or dummy preset (default: the embedded "
               "SmolLM2-135M-Instruct)")


def _engine_args(p: argparse.ArgumentParser, model_flag: bool = True) -> None:
    if model_flag:
        p.add_argument("--model", default=None, help=_MODEL_HELP)
    p.add_argument("--load-format", default="auto", choices=["auto", "hf", "gguf", "dummy"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kernels", default=None, choices=["auto", *KERNEL_SETS],
                   help="kernel set (default: $MINIVLLM_KERNELS, else auto)")
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
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)


def _make_llm(args):
    from minivllm import LLM
    return LLM(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
               max_model_len=args.max_model_len, seed=args.seed, kernels=args.kernels,
               **_parallel(args),
               generation_config=args.generation_config, quantization=args.quantization)


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
    params = _params(args)
    llm = _make_llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    prompts = list(args.message) if args.message else None
    while True:
        if prompts is not None:
            if not prompts:
                return 0
            user = prompts.pop(0)
        else:
            try:
                user = input("you> ")
            except EOFError:
                return 0
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        reply = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
        print(reply if prompts is not None else f"assistant> {reply}", flush=True)
        messages.append({"role": "assistant", "content": reply})


def _scheduler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    p.add_argument("--policy", default="decode-first", choices=["decode-first", "prefill-first"])
    p.add_argument("--batch-wait-ms", type=float, default=0.0)
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule the next step while the GPU runs this one (default: on CUDA)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (default: "
                   "from --cpu-kv-cache-bytes or --gpu-memory-utilization)")
    p.add_argument("--cpu-kv-cache-bytes", type=int, default=1 << 30)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")


def _engine_config(args):
    from minivllm.llm import build_engine_config

    return build_engine_config(
        args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
        max_model_len=args.max_model_len, seed=args.seed, kernels=args.kernels,
        **_parallel(args), data_parallel_size=getattr(args, "data_parallel_size", 1),
        generation_config=args.generation_config, quantization=args.quantization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=args.enable_chunked_prefill, policy=args.policy,
        batch_wait_ms=args.batch_wait_ms, async_scheduling=args.async_scheduling,
        block_size=args.block_size,
        num_blocks=args.num_blocks, cpu_kv_cache_bytes=args.cpu_kv_cache_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching)


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
        max_in_flight=args.zmq_max_in_flight, curve_secret_key=args.zmq_curve_secret_key,
        curve_clients=args.zmq_curve_clients))
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="minivllm")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete one or more prompts")
    gen.add_argument("prompt", nargs="+")
    chat = sub.add_parser("chat", help="chat with the model (interactive, or --message)")
    chat.add_argument("--message", action="append", help="send this and exit (repeatable)")
    chat.add_argument("--system", default=None)
    for p in (gen, chat):
        _engine_args(p)
        _sampling_args(p)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("model", nargs="?", default=None, help=_MODEL_HELP)
    _engine_args(serve, model_flag=False)
    _scheduler_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
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
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--stream-interval-ms", type=float, default=0.0,
                       help="a streamed response sends at most one chunk per this many ms, "
                            "the tokens of the steps between together: less CPU per token "
                            "(default 0: a chunk per engine step)")
    serve.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                       help="do not serve the live dashboard at /dashboard")
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--chat-template", default=None, metavar="FILE",
                       help="a jinja chat template used instead of the model's, e.g. "
                            "examples/tool_chat_template_smollm2.jinja (tools)")
    serve.add_argument("--tool-call-parser", default=None, choices=["hermes"],
                       help="take tool calls out of tool_choice=auto outputs "
                            "(<tool_call>{json}</tool_call>)")
    serve.add_argument("--zmq-endpoint", default=None,
                       help="also serve the binary protocol here (ipc/PROTOCOL.md), e.g. "
                            "tcp://127.0.0.1:5557")
    zmq_limits = ZmqEndpointConfig()
    serve.add_argument("--zmq-max-message-bytes", type=int, default=None,
                       help="a larger frame disconnects its peer (default: a whole context's "
                            "prompt, at least 64 KiB)")
    serve.add_argument("--zmq-max-in-flight-per-peer", type=int,
                       default=zmq_limits.max_in_flight_per_peer,
                       help="unfinished requests per ZeroMQ connection before OVERLOADED")
    serve.add_argument("--zmq-max-in-flight", type=int, default=zmq_limits.max_in_flight,
                       help="unfinished requests of all ZeroMQ connections before OVERLOADED")
    serve.add_argument("--zmq-curve-secret-key", default=None,
                       help="CURVE: the server's certificate file with its secret key "
                            "(zmq.auth.create_certificates writes NAME.key_secret)")
    serve.add_argument("--zmq-curve-clients", default=None,
                       help="CURVE: directory of the allowed clients' public certificates "
                            "(*.key); only they can connect")
    batch = sub.add_parser("run-batch", help="OpenAI batch file (JSONL) in, results out; "
                           "resumable: a rerun keeps the results written and runs the rest")
    batch.add_argument("-i", "--input-file", required=True)
    batch.add_argument("-o", "--output-file", required=True)
    batch.add_argument("--max-concurrency", type=int, default=256,
                       help="requests in flight at once")
    batch.add_argument("--served-model-name", default=None)
    _engine_args(batch)
    _scheduler_args(batch)
    args = parser.parse_args(argv)
    try:
        from minivllm.distributed.launch import run_launched_worker

        if run_launched_worker():  # under torchrun, as a rank > 0
            return 0
        return {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve,
                "run-batch": cmd_run_batch}[args.command](args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
