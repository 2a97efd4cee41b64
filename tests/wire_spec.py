"""The wire specification as a table, for the tests: ipc/PROTOCOL.md's record layouts in Python.

`LAYOUT` gives, for each struct, its size and each field's offset and `struct`-module type. The
tests compare it with the layout the C compiler makes of ipc/minivllm_ipc.h
(`compiled_layout()`) and with PROTOCOL.md's tables, and `pack()` builds records from it alone:
an encoder independent of the C codecs it checks.
"""
from __future__ import annotations

import functools
import os
import shlex
import struct
import subprocess
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# struct -> (size, [(field, offset, struct-module type)]); "sub:<struct>" nests a struct.
LAYOUT: dict[str, tuple[int, list[tuple[str, int, str]]]] = {
    "mv_header": (16, [("magic", 0, "I"), ("version", 4, "H"), ("kind", 6, "H"),
                       ("size", 8, "I"), ("flags", 12, "I")]),
    "mv_sampling": (80, [("temperature", 0, "d"), ("top_p", 8, "d"), ("min_p", 16, "d"),
                         ("repetition_penalty", 24, "d"), ("presence_penalty", 32, "d"),
                         ("frequency_penalty", 40, "d"), ("top_k", 48, "i"),
                         ("max_tokens", 52, "i"), ("min_tokens", 56, "i"), ("logprobs", 60, "i"),
                         ("seed", 64, "Q"), ("flags", 72, "I"), ("priority", 76, "i")]),
    "mv_submit": (112, [("header", 0, "sub:mv_header"), ("request_id", 16, "Q"),
                        ("sampling", 24, "sub:mv_sampling"), ("num_prompt_tokens", 104, "I"),
                        ("num_stop_token_ids", 108, "I")]),
    "mv_structured": (8, [("kind", 0, "I"), ("spec_len", 4, "I")]),
    "mv_token_choice": (16, [("num_logit_bias", 0, "I"), ("num_allowed_token_ids", 4, "I"),
                             ("num_bad_words", 8, "I"), ("num_bad_word_tokens", 12, "I")]),
    "mv_prompt_logprobs": (40, [("header", 0, "sub:mv_header"), ("request_id", 16, "Q"),
                                ("first_position", 24, "I"), ("num_positions", 28, "I"),
                                ("num_top_logprobs", 32, "I"), ("reserved", 36, "I")]),
    "mv_abort": (24, [("header", 0, "sub:mv_header"), ("request_id", 16, "Q")]),
    "mv_step_output": (32, [("header", 0, "sub:mv_header"), ("step", 16, "Q"),
                            ("num_entries", 24, "I"), ("num_top_logprobs", 28, "I")]),
    "mv_error": (32, [("header", 0, "sub:mv_header"), ("request_id", 16, "Q"), ("code", 24, "I"),
                      ("message_len", 28, "I")]),
    "mv_status_query": (24, [("header", 0, "sub:mv_header"), ("tag", 16, "Q")]),
    "mv_status": (176, [("header", 0, "sub:mv_header"), ("tag", 16, "Q")]
                  + [(f, 24 + 4 * i, "I") for i, f in enumerate(
                      ("state", "pid", "max_message_bytes", "max_model_len", "vocab_size",
                       "max_in_flight_per_peer", "max_in_flight", "peer_in_flight",
                       "zmq_in_flight", "zmq_peers", "running", "waiting", "num_blocks",
                       "free_blocks"))]
                  + [(f, 80 + 8 * i, "Q") for i, f in enumerate(
                      ("step", "requests", "finished", "aborted", "errors", "overloaded",
                       "prompt_tokens", "generation_tokens", "preemptions", "prefix_queries",
                       "prefix_hits"))]
                  + [("step_p99_s", 168, "d")]),
}


def field_size(kind: str) -> int:
    return LAYOUT[kind[4:]][0] if kind.startswith("sub:") else struct.calcsize("<" + kind)


@functools.cache
def compiled_layout() -> tuple[tuple[str, str, int, int], ...]:
    """(struct, field, offset, size) of every field ("" for the whole struct), as the compiler
    that builds the extensions lays ipc/minivllm_ipc.h out: tests/records_layout.c, run."""
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "records_layout")
        subprocess.run([*cc, "-I", os.path.join(HERE, "..", "ipc"),
                        os.path.join(HERE, "records_layout.c"), "-o", exe], check=True)
        lines = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    return tuple((rec, field, int(offset), int(size))
                 for rec, field, offset, size in (line.split(",") for line in lines.split()))


def check_layout() -> None:
    """Raise if the compiled structs (ipc/minivllm_ipc.h as built) differ from LAYOUT."""
    spec = {}
    for name, (size, fields) in LAYOUT.items():
        spec[(name, "")] = (0, size)
        for field, offset, kind in fields:
            spec[(name, field)] = (offset, field_size(kind))
    compiled = {(rec, field): (offset, size) for rec, field, offset, size in compiled_layout()}
    if compiled != spec:
        diff = sorted(set(compiled.items()) ^ set(spec.items()))
        raise AssertionError(f"the compiled record layout differs from the specification: "
                             f"{diff}")


def pack(name: str, **values: object) -> bytes:
    """The fixed part of struct `name` from field values (0 for those not given), packed by the
    table alone: the tests' independent encoder. Nested structs take a dict."""
    size, fields = LAYOUT[name]
    out = bytearray(size)
    for field, offset, kind in fields:
        value = values.get(field, 0)
        if kind.startswith("sub:"):
            sub = pack(kind[4:], **(value or {}))
            out[offset:offset + len(sub)] = sub
        else:
            struct.pack_into("<" + kind, out, offset, value)
    return bytes(out)
