"""ipc/PROTOCOL.md against the code: its offset tables must be the compiled layout, and its worked
hex examples must be what the encoder produces, so the document cannot drift from the wire."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from minivllm.sampling_params import SamplingParams, StructuredOutputsParams
from minivllm.transport import protocol
import wire_spec

DOC = (Path(__file__).resolve().parent.parent / "ipc" / "PROTOCOL.md").read_text()


def _section(title: str) -> str:
    """The text under heading `### title` (or `## title`) up to the next heading."""
    m = re.search(rf"^##+ {re.escape(title)}\n(.*?)(?=^#)", DOC, re.S | re.M)
    assert m, f"PROTOCOL.md has no section {title!r}"
    return m.group(1)


def _rows(text: str) -> list[list[str]]:
    """Table rows (cells stripped), header and rule rows left out."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[1:] if rows else rows


def _fields(text: str, offset_col: int, size_col: int,
            field_col: int) -> dict[str, tuple[int, int]]:
    """field -> (offset, size) for table rows with a plain integer offset and a `field` name."""
    out = {}
    for row in _rows(text):
        name = re.fullmatch(r"`(\w+)`", row[field_col])
        if name and row[offset_col].isdigit() and row[size_col].isdigit():
            out[name.group(1)] = (int(row[offset_col]), int(row[size_col]))
    return out


def _layout(struct: str) -> dict[str, tuple[int, int]]:
    return {field: (offset, wire_spec.field_size(kind))
            for field, offset, kind in wire_spec.LAYOUT[struct][1]}


@pytest.mark.parametrize("section, struct", [
    ("Header", "mv_header"), ("Submit", "mv_submit"), ("Abort", "mv_abort"),
    ("Step output", "mv_step_output"), ("Error", "mv_error"),
    ("Status query", "mv_status_query"), ("Status", "mv_status"),
    ("Prompt logprobs", "mv_prompt_logprobs")])
def test_record_tables_match_the_layout(section, struct):
    text = _section(section)
    documented = _fields(text.split("`mv_sampling` (80 bytes")[0], 0, 1, 3)
    assert documented == _layout(struct)


def test_sampling_table_matches_the_layout():
    text = _section("Submit").split("`mv_sampling` (80 bytes")[1]
    in_struct = _fields(text, 1, 2, 4)
    assert in_struct == _layout("mv_sampling")
    in_record = _fields(text, 0, 2, 4)
    assert in_record == {f: (o + 24, s) for f, (o, s) in in_struct.items()}


def _hex_dumps() -> list[bytes]:
    """Every hex dump in the document (lines `XXXX  hh hh ...`), split at blank lines."""
    dumps, current = [], None
    for line in DOC.splitlines():
        m = re.match(r"^([0-9a-f]{4})  ((?:[0-9a-f]{2} {1,2}){0,15}[0-9a-f]{2})(?: |$)", line)
        if m:
            if int(m.group(1), 16) == 0:
                current = bytearray()
                dumps.append(current)
            assert int(m.group(1), 16) == len(current), line
            current += bytes.fromhex(m.group(2))
    return [bytes(d) for d in dumps]


def test_worked_examples_are_what_the_encoder_writes():
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_tokens=16, logprobs=2,
                            seed=42, stop_token_ids=[151645])
    rids, toks, fins = (np.array([7, 9], np.uint64), np.array([42, 2], np.int32),
                        np.array([0, 1], np.uint8))
    nan = np.nan
    expected = [
        protocol.encode_submit(7, [101, 102, 103, 104], params),
        protocol.encode_submit(7, [101, 102], SamplingParams(
            temperature=0, max_tokens=4,
            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))),
        protocol.encode_step_output(5, rids, toks, fins),
        protocol.encode_step_output(
            5, rids, toks, fins, logprobs=np.array([-0.5, nan], np.float32),
            top_token_ids=np.array([[42, 17], [-1, -1]], np.int32),
            top_logprobs=np.array([[-0.5, -1.25], [nan, nan]], np.float32)),
        protocol.encode_abort(7),
        protocol.encode_error(protocol.ERR_INVALID_REQUEST, "top_k must be -1 or >= 1", 7),
    ]
    assert _hex_dumps() == expected


def _coded(section: str, prefix: str) -> dict[str, int]:
    """name -> value from a section's `| value | `MV_...` |` table rows."""
    return {m.group(2): int(m.group(1)) for m in re.finditer(
        rf"^\| *(\d+) *\| *`MV_{prefix}_(\w+)`", _section(section), re.M)}


def test_code_tables_are_the_header_codes():
    """The error and finish codes PROTOCOL.md lists are the ones the code uses (which come from
    ipc/minivllm_ipc.h through the compiled codecs), and none is left out on either side."""
    for section, prefix in (("Error codes", "ERR"), ("Finish reasons", "FINISH")):
        documented = _coded(section, prefix)
        in_code = {name[len(prefix) + 1:]: getattr(protocol, name) for name in dir(protocol)
                   if name.startswith(prefix + "_") and name != "FINISH_REASONS"}
        assert documented == in_code, section
    assert protocol.FINISH_REASONS[protocol.FINISH_STOP] == "stop"
    assert len(protocol.FINISH_REASONS) == len(_coded("Finish reasons", "FINISH"))
    kinds = _rows(_section("Header"))[2][4]  # the `kind` row: "1 submit, 2 abort, ..."
    assert kinds == ", ".join(f"{getattr(protocol, 'KIND_' + k.upper().replace(' ', '_'))} {k}"
                              for k in ("submit", "abort", "step output", "error",
                                        "status query", "status", "prompt logprobs"))
    flags = {"MV_SAMPLING_HAS_SEED": "bit 0", "MV_SAMPLING_IGNORE_EOS": "bit 1",
             "MV_STEP_HAS_LOGPROBS": "bit 0", "MV_ERROR_HAS_REQUEST": "bit 0",
             "MV_SUBMIT_HAS_STRUCTURED": "bit 0", "MV_SUBMIT_HAS_TOKEN_CHOICE": "bit 1",
             "MV_SAMPLING_PROMPT_LOGPROBS": "bit 2"}
    for name, bit in flags.items():
        assert f"{bit} `{name}`" in DOC
        assert getattr(protocol, name[3:]) == 1 << int(bit[-1])


def test_the_quoted_refusal_is_what_the_engine_says():
    """PROTOCOL.md quotes the refusal of an out-of-range value (logprobs -2): the same words
    as the decoder's, in the protocol's terms."""
    quoted = re.search(r"e\.g\. `(logprobs must be [^`]+)`", _section("Submit")).group(1)
    offset = {f: o for f, o, _ in wire_spec.LAYOUT["mv_submit"][1]}["sampling"] + \
        {f: o for f, o, _ in wire_spec.LAYOUT["mv_sampling"][1]}["logprobs"]
    frame = bytearray(protocol.encode_submit(1, [5], SamplingParams()))
    frame[offset:offset + 4] = (-2).to_bytes(4, "little", signed=True)
    with pytest.raises(ValueError) as refused:
        protocol.decode(bytes(frame)).sampling_params()
    assert str(refused.value) == quoted
