"""Record codecs: the compiled layout equals the specification, encoders agree with an encoder
built from the specification table alone, every record survives a round trip, and malformed
bytes of every kind give ProtocolError (never a crash, never a bogus record)."""
import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minivllm._cext.records import StepBatch, read_batch
from minivllm.sampling_params import SamplingParams
from minivllm.transport import protocol, shm
from minivllm.transport.protocol import ProtocolError
from wire_spec import LAYOUT, check_layout, pack


def _header(kind, size, flags=0):
    return {"magic": protocol.MAGIC, "version": protocol.VERSION, "kind": kind, "size": size,
            "flags": flags}


def _pad(b):
    return b + bytes(-len(b) % 8)


def test_compiled_layout_is_the_specification_and_drift_is_caught(monkeypatch):
    check_layout()
    size, fields = LAYOUT["mv_abort"]
    monkeypatch.setitem(LAYOUT, "mv_abort", (size, [fields[0], ("request_id", 20, "Q")]))
    with pytest.raises(AssertionError, match="differs from the specification"):
        check_layout()


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


def _submit_with(**sampling) -> protocol.Submit:
    """A decoded submit whose sampling fields are the given wire values (defaults otherwise)."""
    fields = {**dict(temperature=1.0, top_p=1.0, repetition_penalty=1.0, top_k=-1,
                     max_tokens=8, logprobs=-1), **sampling}
    frame = pack("mv_submit", header=_header(protocol.KIND_SUBMIT, 120), request_id=3,
                 sampling=fields, num_prompt_tokens=1) + struct.pack("<ii", 5, 0)
    return protocol.decode(frame)


@pytest.mark.parametrize("field, value", [
    ("logprobs", -2), ("logprobs", -2**31), ("logprobs", 21), ("max_tokens", -1),
    ("max_tokens", -2**31), ("top_k", 0), ("top_k", -2), ("min_tokens", -1), ("min_tokens", 9),
    ("temperature", -1.0), ("temperature", float("nan")), ("top_p", 0.0), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("frequency_penalty", -3.0)])
def test_submit_values_outside_the_documented_range_are_refused_in_protocol_terms(field, value):
    """Repro of a bug: logprobs -2 (or any negative) was taken for -1, "none", where
    PROTOCOL.md allows -1 or 0-20 only; and the refusals spoke Python ("or None")."""
    with pytest.raises(ValueError) as refused:
        _submit_with(**{field: value}).sampling_params()
    message = str(refused.value)
    assert message.startswith(field) and "None" not in message, message


def test_submit_edge_values_inside_the_documented_range_are_taken():
    assert _submit_with(logprobs=-1).sampling_params().logprobs is None
    assert _submit_with(logprobs=20).sampling_params().logprobs == 20
    assert _submit_with(logprobs=0).sampling_params().logprobs == 0
    assert _submit_with(max_tokens=0).sampling_params().max_tokens is None
    assert _submit_with(top_k=1, min_tokens=8).sampling_params().min_tokens == 8


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


def test_submit_token_choice_part_round_trips_and_its_counts_are_checked():
    p = SamplingParams(logit_bias={5: -100.0, 7: 2.5}, allowed_token_ids=[1, 2, 3],
                       bad_words_token_ids=[[4, 5], [6]])
    frame = protocol.encode_submit(9, [1, 2, 3], p)
    # pad8(112 + 4 * 3) = 128, then counts (16) and 2 + 2 + 3 + 2 + 3 four-byte values, padded
    assert struct.unpack_from("<I", frame, 12)[0] == protocol.SUBMIT_HAS_TOKEN_CHOICE
    assert len(frame) == 128 + 16 + 48
    back = protocol.decode(frame).sampling_params()
    assert (back.logit_bias, back.allowed_token_ids, back.bad_words_token_ids) == \
        ({5: -100.0, 7: 2.5}, [1, 2, 3], [[4, 5], [6]])
    empty_word = bytearray(frame)
    struct.pack_into("<II", empty_word, 128 + 16 + 28, 3, 0)  # bad-word lengths [3, 0]
    with pytest.raises(ProtocolError, match="one is empty"):
        protocol.decode(bytes(empty_word))
    version_2 = frame[:4] + struct.pack("<H", 2) + frame[6:]  # the part came with version 3
    with pytest.raises(ProtocolError, match="flag"):
        protocol.decode(version_2)


def test_prompt_logprobs_record_round_trips_and_is_checked():
    lp, ids, top = (np.array([-1.5, -2.0], np.float32), np.array([[3, 9], [4, 1]], np.int32),
                    np.array([[-0.5, -0.9], [-0.7, -1.0]], np.float32))
    frame = protocol.encode_prompt_logprobs(7, 5, lp, ids, top)
    assert len(frame) == 40 + 8 + 32
    rec = protocol.decode(frame)
    assert (rec.request_id, rec.first_position) == (7, 5)
    assert (rec.logprobs == lp).all() and (rec.top_token_ids == ids).all() \
        and (rec.top_logprobs == top).all()
    for bad in (frame[:28] + struct.pack("<I", 3) + frame[32:],  # n lies
                frame[:24] + struct.pack("<I", 0) + frame[28:],  # position 0 has no logprob
                frame[:4] + struct.pack("<H", 2) + frame[6:]):  # kind 7 came with version 3
        with pytest.raises(ProtocolError):
            protocol.decode(bad)
    params = SamplingParams(logprobs=2, prompt_logprobs=2)
    assert protocol.decode(protocol.encode_submit(1, [1, 2], params)).sampling_params() == params
    with pytest.raises(ValueError, match="prompt_logprobs"):
        protocol.encode_submit(1, [1, 2], SamplingParams(logprobs=2, prompt_logprobs=1))


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
    (lambda f: f[:4] + struct.pack("<H", 4) + f[6:], "version 4 is not supported"),
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


@pytest.fixture
def rings(ring_pair):
    return ring_pair(1 << 14)


def test_step_output_padding_is_zeroed_over_dirty_ring_memory(rings):
    """The writer zeroes only the padding (not the whole record first): none may be missed."""
    writer, reader = rings
    args = (np.arange(3, dtype=np.uint64), np.arange(3, dtype=np.int32), np.ones(3, np.uint8),
            np.full(3, 0.5, np.float32), np.ones((3, 1), np.int32), np.full((3, 1), 2, np.float32))
    expected = (pack("mv_step_output", header=_header(3, 128, protocol.STEP_HAS_LOGPROBS),
                     step=7, num_entries=3, num_top_logprobs=1)
                + struct.pack("<3Q", 0, 1, 2) + _pad(struct.pack("<3i", 0, 1, 2))
                + _pad(bytes([1, 1, 1])) + _pad(struct.pack("<3f", 0.5, 0.5, 0.5))
                + _pad(struct.pack("<3i", 1, 1, 1)) + _pad(struct.pack("<3f", 2, 2, 2)))
    writer.write(b"\xff" * len(expected))
    assert reader.read() == b"\xff" * len(expected)
    writer.reset()
    reader.reset()
    protocol.put_step_output(writer, 7, *args)  # over the 0xff bytes
    assert reader.read() == expected
    assert protocol.encode_step_output(7, *args) == expected


# ---- batched reads: read_batch gives what read_record gives, record by record ------------------


def _step_frame(step, n, k=None, seed=0):
    """A step output of n entries; with k top logprobs per entry unless k is None."""
    rng = np.random.default_rng(seed)
    lp = () if k is None else (rng.standard_normal(n).astype(np.float32),
                               rng.integers(0, 1000, (n, k), dtype=np.int32),
                               rng.standard_normal((n, k)).astype(np.float32))
    return protocol.encode_step_output(step, rng.integers(0, 2**64 - 1, n, dtype=np.uint64),
                                       rng.integers(-1, 2**31 - 1, n, dtype=np.int32),
                                       rng.integers(0, 4, n, dtype=np.uint8), *lp)


_STEP_FIELDS = ("request_ids", "token_ids", "finish_reasons", "logprobs", "top_token_ids",
                "top_logprobs")


def _as_rows(rec):
    """A record as comparable values: arrays as their dtypes, shapes and bytes (bitwise: a
    mutated record may carry a NaN)."""
    if not isinstance(rec, protocol.StepOutput):
        return (type(rec).__name__, repr(rec))
    return ("step", rec.step) + tuple(
        None if a is None else (a.dtype.str, a.shape, a.tobytes())
        for a in (getattr(rec, f) for f in _STEP_FIELDS))


def _batch_rows(batch):
    """A StepBatch cut back into per-record rows, by its offsets."""
    assert batch.steps.dtype == np.uint64 and batch.offsets.dtype == np.int64
    assert len(batch.offsets) == len(batch) + 1 and batch.offsets[0] == 0
    assert batch.offsets[-1] == len(batch.token_ids)
    rows = []
    for r, step in enumerate(batch.steps.tolist()):
        lo, hi = batch.offsets[r], batch.offsets[r + 1]
        rows.append(("step", step) + tuple(
            None if a is None else (a.dtype.str, a[lo:hi].shape, a[lo:hi].tobytes())
            for a in (getattr(batch, f) for f in _STEP_FIELDS)))
    return rows


def _read_all(reader, read):
    """Everything in the ring, as rows; a ProtocolError is a row too."""
    rows = []
    while True:
        try:
            rec = read(reader)
        except ProtocolError:
            rows.append("malformed")
            continue
        if rec is None:
            return rows
        rows.extend(_batch_rows(rec) if isinstance(rec, StepBatch) else [_as_rows(rec)])


_frames = st.one_of(
    st.tuples(st.just("step"), st.integers(0, 40), st.one_of(st.none(), st.integers(0, 3))),
    st.tuples(st.just("error"), st.integers(0, 5), st.none()),
    st.tuples(st.just("bad"), st.integers(0, 3), st.none()),
    st.tuples(st.just("mutant"), st.integers(0, 2**32), st.none()))


def _frame(kind, a, b, step):
    if kind == "step":
        return _step_frame(step, a, b, seed=step)
    if kind == "error":
        return protocol.encode_error(a + 1, f"error {step}", None if a == 0 else step)
    frame = bytearray(_step_frame(step, 3, 2, seed=step))
    if kind == "mutant":  # a few random bytes changed: decodes to something, or is malformed
        rng = random.Random(a)
        for _ in range(rng.randint(1, 4)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        return bytes(frame)
    if a == 0:
        frame[:4] = b"XXXX"
    elif a == 1:
        struct.pack_into("<I", frame, 24, 1000)  # num_entries the frame cannot hold
    elif a == 2:
        struct.pack_into("<I", frame, 12, 0x80)  # an unknown flag
    else:
        struct.pack_into("<I", frame, 8, len(frame) - 8)  # a header size that lies
    return bytes(frame)


@settings(max_examples=150, deadline=None)
@given(groups=st.lists(st.lists(_frames, min_size=1, max_size=5), min_size=1, max_size=12),
       max_records=st.integers(1, 7))
def test_read_batch_equals_read_record_record_by_record(groups, max_records):
    """Steps with and without logprobs (of several widths), errors, malformed and randomly
    mutated records, in a 16 KiB ring that the frames wrap around many times."""
    one = shm.create_ring("test", 1 << 14)
    batched = shm.create_ring("test", 1 << 14)
    try:
        step = 0
        for group in groups:
            for kind, a, b in group:
                frame = _frame(kind, a, b, step)
                one.write(frame)
                batched.write(frame)
                step += 1
            expected = _read_all(one, protocol.read_record)
            assert _read_all(batched, lambda r: read_batch(r, max_records)) == expected
    finally:
        one.close()
        batched.close()


def test_read_batch_gathers_steps_and_stops_at_other_records(rings):
    writer, reader = rings
    for frame in (_step_frame(0, 5), _step_frame(1, 0), _step_frame(2, 7),
                  protocol.encode_error(2, "bad request", 9), _step_frame(3, 4, 2),
                  _step_frame(4, 1, 2), _step_frame(5, 2, 3), _step_frame(6, 2)):
        writer.write(frame)
    batch = read_batch(reader)
    assert batch.steps.tolist() == [0, 1, 2] and batch.offsets.tolist() == [0, 5, 5, 12]
    assert batch.logprobs is None and batch.top_token_ids is None and len(batch.token_ids) == 12
    assert isinstance(read_batch(reader), protocol.ErrorRecord)
    batch = read_batch(reader)  # one logprobs width per batch
    assert batch.steps.tolist() == [3, 4] and batch.top_logprobs.shape == (5, 2)
    assert read_batch(reader).top_token_ids.shape == (2, 3)
    assert read_batch(reader).steps.tolist() == [6]
    assert read_batch(reader) is None


def test_read_batch_respects_max_records(rings):
    writer, reader = rings
    for i in range(5):
        writer.write(_step_frame(i, 2))
    assert read_batch(reader, 2).steps.tolist() == [0, 1]
    assert read_batch(reader, 1).steps.tolist() == [2]
    assert read_batch(reader).steps.tolist() == [3, 4]
    with pytest.raises(ValueError, match="max_records"):
        read_batch(reader, 0)


def test_read_batch_spans_the_wrap_in_one_batch(rings):
    writer, reader = rings
    frame = _step_frame(0, 200)  # 2,640 bytes with its frame header: 6 fit in 16 KiB
    for i in range(4):
        writer.write(frame)
        read_batch(reader)
    sent = [_step_frame(i, 200, seed=i) for i in range(4)]
    for f in sent:
        writer.write(f)
    assert reader.used_bytes() == 4 * 2640 + (1 << 14) % 2640  # the third is behind a pad
    batch = read_batch(reader)
    assert len(batch) == 4
    assert _batch_rows(batch) == [_as_rows(protocol.decode(f)) for f in sent]
    assert reader.used_bytes() == 0


def test_read_batch_ends_before_a_malformed_record_which_the_next_call_consumes(rings):
    writer, reader = rings
    bad = bytearray(_step_frame(1, 3))
    struct.pack_into("<I", bad, 24, 4)  # one entry more than the frame holds
    for frame in (_step_frame(0, 3), bytes(bad), _step_frame(2, 3)):
        writer.write(frame)
    assert read_batch(reader).steps.tolist() == [0]
    with pytest.raises(ProtocolError, match="cannot hold the 4 entries"):
        read_batch(reader)
    assert read_batch(reader).steps.tolist() == [2]


def test_read_batch_stops_at_a_lying_frame_length(rings):
    from multiprocessing import shared_memory
    writer, reader = rings
    first, second = _step_frame(0, 3), _step_frame(1, 3)
    writer.write(first)
    writer.write(second)
    raw = shared_memory.SharedMemory(writer.name)
    try:  # the second frame's length word: far past what was published
        struct.pack_into("<I", raw.buf, 256 + 8 + len(first), 1_000_000)
        assert read_batch(reader).steps.tolist() == [0]  # the good record before it
        with pytest.raises(ProtocolError, match=f"{8 + len(second)} bytes discarded"):
            read_batch(reader)
        assert read_batch(reader) is None
        writer.write(_step_frame(2, 1))  # the ring goes on working
        assert read_batch(reader).steps.tolist() == [2]
    finally:
        raw.close()


def test_read_batch_on_a_closed_ring_raises():
    writer = shm.create_ring("test", 4096)
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        read_batch(writer)
