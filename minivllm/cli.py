"""Command line: `minivllm generate "prompt"` and `minivllm chat` (serve and bench come later)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory, .gguf file, or dummy preset "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--load-format", default="auto", choices=["auto", "hf", "gguf", "dummy"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)


def _make_llm(args):
    from minivllm import LLM
    return LLM(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
               max_model_len=args.max_model_len, seed=args.seed)


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
    args = parser.parse_args(argv)
    try:
        return {"generate": cmd_generate, "chat": cmd_chat}[args.command](args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
