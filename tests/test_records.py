"""Record codecs: the compiled layout equals the specification, encoders agree with an encoder
built from the specification table alone, every record survives a round trip, and malformed
bytes of every kind give ProtocolError (never a crash, never a bogus record)."""
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minivllm.sampling_params import SamplingParams
from minivllm.transport import protocol
from minivllm.transport.protocol import ProtocolError, pack


def _header(kind, size, flags=0):
    return {"magic": protocol.MAGIC, "version": protocol.VERSION, "kind": kind, "size": size,
            "flags": flags}


def _pad(b):
    return b + bytes(-len(b) % 8)


def test_layout_check_passes_and_detects_drift(monkeypatch):
    protocol.check_layout()
    size, fields = protocol.LAYOUT["mv_abort"]
    monkeypatch.setitem(protocol.LAYOUT, "mv_abort", (size, [fields[0], ("request_id", 20, "Q")]))
    with pytest.raises(ImportError, match="differs from the protocol specification"):
        protocol.check_layout()


def test_submit_encoder_matches_the_specification():
    params = SamplingParams(temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, seed=-3,
                            repetition_penalty=1.1, presence_penalty=0.5,
                            frequency_penalty=-0.5, max_tokens=77, min_tokens=2,
                            stop_token_ids=[7, 8, 9], ignore_eos=True, logprobs=3)
    prompt = [1, 2, 3, 2**31 - 1, 0]
    expected = _pad(pack(
        "mv_submit", header=_header(1, 144), request_id=2**64 - 1,
        sampling=dict(temperature=0.5, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                      presence_penalty=0.5, frequency_penalty=-0.5, top_k=40, max_tokens=77,
                      min_tokens=2, logprobs=3, seed=2**64 - 3,
                      flags=protocol.SAMPLING_HAS_SEED | protocol.SAMPLING_IGNORE_EOS,
                      priority=-4),
        num_prompt_tokens=5, num_stop_token_ids=3) + struct.pack("<8i", *prompt, 7, 8, 9))
    got = protocol.encode_submit(2**64 - 1, prompt, params, priority=-4)
    assert got == expected
    assert protocol.encode_submit(2**64 - 1, np.array(prompt, np.int64), params, -4) == expected


def test_submit_defaults_encode_none_as_documented():
    rec = protocol.decode(protocol.encode_submit(1, [5], SamplingParams(max_tokens=None)))
    assert (rec.max_tokens, rec.logprobs, rec.seed, rec.ignore_eos) == (0, -1, None, False)
    params = rec.sampling_params()
    assert params.max_tokens is None and params.logprobs is None and params.seed is None


@settings(max_examples=200, deadline=None)
@given(prompt=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=300),
       stop=st.lists(st.integers(0, 2**31 - 1), max_size=5),
       rid=st.integers(0, 2**64 - 1),
       temperature=st.floats(0, 5), top_p=st.floats(0.01, 1), top_k=st.sampled_from([-1, 1, 50]),
       seed=st.one_of(st.none(), st.integers(-2**63, 2**64 - 1)),
       max_tokens=st.one_of(st.none(), st.integers(1, 2**31 - 1)),
       logprobs=st.one_of(st.none(), st.integers(0, 20)), ignore_eos=st.booleans())
def test_submit_round_trip(prompt, stop, rid, temperature, top_p, top_k, seed, max_tokens,
                           logprobs, ignore_eos):
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            max_tokens=max_tokens, stop_token_ids=stop, logprobs=logprobs,
                            ignore_eos=ignore_eos)
    frame = protocol.encode_submit(rid, prompt, params, priority=3)
    assert len(frame) % 8 == 0
    rec = protocol.decode(frame)
    assert rec.request_id == rid and rec.priority == 3
    assert rec.prompt_token_ids.tolist() == prompt
    back = rec.sampling_params()
    assert back.temperature == temperature and back.top_p == top_p and back.top_k == top_k
    assert back.max_tokens == max_tokens and back.logprobs == logprobs
    assert back.stop_token_ids == stop and back.ignore_eos == ignore_eos
    assert back.seed == (None if seed is None else seed % 2**64)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 300), k=st.integers(0, 20), with_lp=st.booleans(),
       step=st.integers(0, 2**64 - 1), data=st.data())
def test_step_output_round_trip(n, k, with_lp, step, data):
    rng = np.random.default_rng(n * 31 + k)
    ids = rng.integers(0, 2**63, n, dtype=np.uint64)
    toks = rng.integers(-1, 2**31 - 1, n, dtype=np.int32)
    fin = rng.integers(0, 4, n, dtype=np.uint8)
    lp = (rng.standard_normal(n).astype(np.float32),
          rng.integers(-1, 1000, (n, k), dtype=np.int32),
          rng.standard_normal((n, k)).astype(np.float32)) if with_lp else ()
    rec = protocol.decode(protocol.encode_step_output(step, ids, toks, fin, *lp))
    assert rec.step == step and len(rec) == n
    np.testing.assert_array_equal(rec.request_ids, ids)
    np.testing.assert_array_equal(rec.token_ids, toks)
    np.testing.assert_array_equal(rec.finish_reasons, fin)
    if with_lp:
        np.testing.assert_array_equal(rec.logprobs, lp[0])
        np.testing.assert_array_equal(rec.top_token_ids, lp[1])
        np.testing.assert_array_equal(rec.top_logprobs, lp[2])
    else:
        assert rec.logprobs is None and rec.top_token_ids is None


def test_step_output_layout_matches_the_specification():
    frame = protocol.encode_step_output(9, np.array([5, 6], np.uint64),
                                        np.array([10, 11], np.int32), np.array([0, 2], np.uint8))
    expected = (pack("mv_step_output", header=_header(3, 64), step=9, num_entries=2,
                     num_top_logprobs=0)
                + struct.pack("<2Q", 5, 6) + struct.pack("<2i", 10, 11) + bytes([0, 2]) + bytes(6))
    assert frame == expected


def test_abort_and_error_records():
    assert protocol.decode(protocol.encode_abort(42)).request_id == 42
    rec = protocol.decode(protocol.encode_error(protocol.ERR_INVALID_REQUEST, "top_p: é", 7))
    assert (rec.code, rec.message, rec.request_id) == (2, "top_p: é", 7)
    assert protocol.decode(protocol.encode_error(1, "no request")).request_id is None
    assert protocol.encode_error(1, "x") == _pad(pack("mv_error", header=_header(4, 40),
                                                      code=1, message_len=1) + b"x")


def test_encoders_reject_bad_input_with_the_field_named():
    p = SamplingParams()
    with pytest.raises(ValueError, match="prompt_token_ids is empty"):
        protocol.encode_submit(1, [], p)
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] = 4294967296 is outside int32"):
        protocol.encode_submit(1, [1, 2**32], p)
    with pytest.raises(ValueError, match=r"prompt_token_ids\[0\] must be an int"):
        protocol.encode_submit(1, ["a"], p)
    with pytest.raises(ValueError, match="one entry each"):
        protocol.encode_step_output(1, np.zeros(2, np.uint64), np.zeros(1, np.int32),
                                    np.zeros(2, np.uint8))


# ---- malformed input --------------------------------------------------------------------------
def _valid_frames():
    p = SamplingParams(stop_token_ids=[3])
    return [protocol.encode_submit(1, [1, 2, 3], p), protocol.encode_abort(3),
            protocol.encode_step_output(1, np.ones(3, np.uint64), np.ones(3, np.int32),
                                        np.zeros(3, np.uint8), np.zeros(3, np.float32),
                                        np.zeros((3, 2), np.int32), np.zeros((3, 2), np.float32)),
            protocol.encode_error(2, "bad", 1)]


@pytest.mark.parametrize("mutate, message", [
    (lambda f: b"XXXX" + f[4:], "bad magic"),
    (lambda f: f[:4] + struct.pack("<H", 2) + f[6:], "version 2 is not supported"),
    (lambda f: f[:6] + struct.pack("<H", 99) + f[8:], "unknown record kind 99"),
    (lambda f: f[:-8], "the header says"),
    (lambda f: f[:8] + struct.pack("<I", len(f) + 8) + f[12:] + bytes(8), "cannot hold|abort"),
    (lambda f: f[:12] + struct.pack("<I", 0x80) + f[16:], "flag"),
    (lambda f: f[:10], "truncated"),
    (lambda f: b"", "empty frame"),
])
def test_malformed_frames_are_rejected_with_a_reason(mutate, message):
    for frame in _valid_frames():
        with pytest.raises(ProtocolError, match=message):
            protocol.decode(mutate(frame))


def test_lying_counts_are_caught_before_any_copy():
    frame = bytearray(protocol.encode_submit(1, [1, 2, 3], SamplingParams()))
    struct.pack_into("<I", frame, 104, 2**32 - 1)  # num_prompt_tokens: 4 billion
    with pytest.raises(ProtocolError, match="cannot hold the 4294967295 prompt"):
        protocol.decode(bytes(frame))
    frame = bytearray(_valid_frames()[2])
    struct.pack_into("<I", frame, 24, 2**31)  # num_entries
    with pytest.raises(ProtocolError, match="cannot hold"):
        protocol.decode(bytes(frame))
    struct.pack_into("<II", frame, 24, 3, 1000)  # num_top_logprobs beyond 20
    with pytest.raises(ProtocolError, match="1000 top logprobs"):
        protocol.decode(bytes(frame))


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes_never_crash(data):
    try:
        protocol.decode(data)
    except ProtocolError:
        pass


@settings(max_examples=3000, deadline=None)
@given(which=st.integers(0, 3), edits=st.lists(st.tuples(st.integers(0, 10_000),
                                                         st.integers(0, 255)), max_size=6),
       cut=st.integers(0, 10_000))
def test_fuzz_mutated_records_decode_or_raise(which, edits, cut):
    frame = bytearray(_valid_frames()[which])
    for pos, value in edits:
        frame[pos % len(frame)] = value
    frame = bytes(frame[:max(0, len(frame) - cut % 24)])
    try:
        rec = protocol.decode(frame)
    except ProtocolError:
        return
    # Whatever decodes is self-consistent: re-encoding gives the record back.
    if isinstance(rec, protocol.StepOutput):
        args = (rec.logprobs, rec.top_token_ids, rec.top_logprobs) if rec.logprobs is not None \
            else ()
        again = protocol.decode(protocol.encode_step_output(
            rec.step, rec.request_ids, rec.token_ids, rec.finish_reasons, *args))
        np.testing.assert_array_equal(again.token_ids, rec.token_ids)
    elif isinstance(rec, protocol.Submit):  # values are the engine's to validate: cleanly
        try:
            rec.sampling_params()
        except ValueError:
            pass


def test_atheris_fuzz_run():
    pytest.importorskip("atheris", reason="atheris is not installed")
    import subprocess
    import sys
    from pathlib import Path
    harness = Path(__file__).with_name("fuzz_decode.py")
    out = subprocess.run([sys.executable, str(harness), "-runs=30000", "-max_len=512"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Done 30000 runs" in out.stderr
