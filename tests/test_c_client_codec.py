"""The C client of ipc/clients/c against a pyzmq ROUTER standing in for the engine.

The client's submit frame must be byte-for-byte what the Python encoder makes of the same
request, its printed stream must follow the step-output records it gets, and frames that are
no valid record (or malicious ones) must be reported and survived, never read out of bounds:
the fuzz case runs a build with AddressSanitizer and UBSan where the compiler has them.
The test against the real engine (greedy tokens equal to the Python client's) is separate.
"""
from __future__ import annotations

import queue
import random
import shutil
import signal
import struct
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

zmq = pytest.importorskip("zmq", reason="pyzmq is a dependency of the package")

from minivllm.sampling_params import SamplingParams  # noqa: E402
from minivllm.transport import protocol  # noqa: E402

CLIENT_DIR = Path(__file__).resolve().parent.parent / "ipc" / "clients" / "c"
RID = 0x0123456789ABCDEF  # every byte distinct: a client that garbles the id is caught
OTHER = RID + 1


def _compiler_missing() -> str | None:
    if shutil.which("cc") is None or shutil.which("make") is None:
        return "needs cc and make"
    probe = subprocess.run(["cc", "-E", "-x", "c", "-"], input="#include <zmq.h>\n",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return "needs zmq.h (Debian: apt-get install libzmq3-dev)"
    return None


def _make(build_dir: Path, **variables: str) -> Path:
    """Build with the Makefile (outside the source tree); the compiler's output must be empty:
    the client compiles without a warning."""
    args = [f"{k}={v}" for k, v in variables.items()]
    proc = subprocess.run(["make", "-s", "-C", str(CLIENT_DIR), f"BUILD={build_dir}", *args],
                          check=True, capture_output=True, text=True)
    assert "warning" not in proc.stderr + proc.stdout, proc.stderr
    return build_dir / "minivllm-client"


@pytest.fixture(scope="module")
def client_bin(tmp_path_factory) -> Path:
    missing = _compiler_missing()
    if missing:
        pytest.skip(reason=missing)
    return _make(tmp_path_factory.mktemp("c-client"))


@pytest.fixture(scope="module")
def asan_client_bin(tmp_path_factory, client_bin) -> Path:
    try:
        return _make(tmp_path_factory.mktemp("c-client-asan"),
                     CFLAGS="-O1 -g -std=c11 -fsanitize=address,undefined "
                            "-fno-sanitize-recover=all -fno-omit-frame-pointer")
    except subprocess.CalledProcessError as exc:
        pytest.skip(reason=f"the compiler cannot build with sanitizers: {exc.stderr[-200:]}")


class Client:
    """A running minivllm-client whose stdout lines arrive in a queue as it prints them."""

    def __init__(self, binary: Path, endpoint: str, *args: str) -> None:
        self.proc = subprocess.Popen([str(binary), "--endpoint", endpoint, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stderr = ""

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def line(self, timeout: float = 5.0) -> str:
        return self.lines.get(timeout=timeout)

    def wait(self, timeout: float = 10.0) -> tuple[int, list[str], str]:
        """Exit status, the stdout lines not yet taken, stderr."""
        self.stderr = self.proc.stderr.read()
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout)
        rest = []
        while not self.lines.empty():
            rest.append(self.lines.get())
        return rc, rest, self.stderr

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Router:
    """The engine's side of the endpoint: a ROUTER that hands out whole messages."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(endpoint)
        self.endpoint = endpoint
        self.peer = None

    def recv(self, timeout_ms: int = 5000):
        """The next record from the client, decoded; remembers who sent it."""
        assert self.sock.poll(timeout_ms), "the client sent nothing"
        parts = self.sock.recv_multipart()
        assert len(parts) == 2, f"one record per message, got {len(parts) - 1} frames"
        self.peer = parts[0]
        self.raw = parts[1]
        return protocol.decode(parts[1])

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart([self.peer, *frames])

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def router(tmp_path):
    r = Router(f"ipc://{tmp_path}/engine")
    yield r
    r.close()


@pytest.fixture
def run(client_bin, router):
    """run(*args, binary=client_bin) starts a client on the router's endpoint."""
    started = []

    def start(*args: str, binary: Path = client_bin) -> Client:
        c = Client(binary, router.endpoint, *args)
        started.append(c)
        return c

    yield start
    for c in started:
        c.kill()


def step(n: int, entries, **logprob_arrays) -> bytes:
    """A step output of (request_id, token_id, finish_reason) entries."""
    rids, toks, fins = zip(*entries)
    return protocol.encode_step_output(n, np.array(rids, np.uint64), np.array(toks, np.int32),
                                       np.array(fins, np.uint8), **logprob_arrays)


def test_submit_is_byte_exact_and_tokens_stream(router, run):
    c = run("--request-id", str(RID), "--max-tokens", "5", "--min-tokens", "1",
            "--temperature", "0.25", "--top-p", "0.5", "--top-k", "40", "--min-p", "0.05",
            "--repetition-penalty", "1.1", "--presence-penalty", "-0.5",
            "--frequency-penalty", "0.3", "--seed", str(2**64 - 1), "--ignore-eos",
            "--stop-token-id", "7", "--stop-token-id", "151645", "--priority", "-3",
            "--", "1", "2", "2147483647", "-2147483648", "0")
    sub = router.recv()
    assert isinstance(sub, protocol.Submit)
    assert sub.request_id == RID
    assert sub.prompt_token_ids.tolist() == [1, 2, 2**31 - 1, -2**31, 0]
    assert sub.stop_token_ids.tolist() == [7, 151645]
    assert (sub.temperature, sub.top_p, sub.top_k, sub.min_p) == (0.25, 0.5, 40, 0.05)
    assert (sub.repetition_penalty, sub.presence_penalty, sub.frequency_penalty) == (1.1, -0.5, 0.3)
    assert (sub.max_tokens, sub.min_tokens, sub.logprobs) == (5, 1, -1)
    assert (sub.seed, sub.ignore_eos, sub.priority) == (2**64 - 1, True, -3)
    params = SamplingParams(temperature=0.25, top_p=0.5, top_k=40, min_p=0.05, seed=2**64 - 1,
                            repetition_penalty=1.1, presence_penalty=-0.5, frequency_penalty=0.3,
                            max_tokens=5, min_tokens=1, stop_token_ids=[7, 151645],
                            ignore_eos=True)
    # Byte-exact, padding included (5 + 2 ids: 28 bytes after the fixed part, 4 zero bytes pad).
    assert router.raw == protocol.encode_submit(RID, [1, 2, 2**31 - 1, -2**31, 0], params,
                                                priority=-3)
    assert len(router.raw) == 144 and router.raw[-4:] == bytes(4)

    # Each token shows up before the next record is sent: the client streams and flushes.
    router.send(step(0, [(RID, 11, 0), (OTHER, 99, 0)]))
    assert c.line() == "token 11"
    router.send(step(1, [(OTHER, 98, 0)]))  # not ours: nothing to print
    router.send(step(2, [(OTHER, 97, 2), (RID, 12, 0)]))
    assert c.line() == "token 12"
    router.send(step(3, [(RID, 13, protocol.FINISH_LENGTH)]))
    assert c.wait() == (0, ["token 13", "finish length"], "")


def test_defaults_are_sampling_params_defaults(router, run):
    c = run("5")
    router.recv()
    assert router.raw == protocol.encode_submit(1, [5], SamplingParams())
    router.send(step(0, [(1, 6, protocol.FINISH_STOP)]))
    assert c.wait() == (0, ["token 6", "finish stop"], "")


def test_prompt_file(router, run, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("  10 11\n12\t13\r\n14")
    c = run("--prompt-file", str(path), "--max-tokens", "0")
    sub = router.recv()
    assert sub.prompt_token_ids.tolist() == [10, 11, 12, 13, 14]
    assert sub.max_tokens == 0 and sub.sampling_params().max_tokens is None
    router.send(step(0, [(1, 3, protocol.FINISH_LENGTH)]))
    assert c.wait()[0] == 0


def test_logprobs(router, run):
    c = run("--logprobs", "2", "--request-id", str(RID), "--temperature", "0", "1")
    assert router.recv().logprobs == 2
    # k = 3 because another request asked for 3; ours asked 2, so its third column is -1.
    lp = np.array([-0.1, -1.5], np.float32)
    top_ids = np.array([[42, 7, -1], [5, 6, 8]], np.int32)
    top_lps = np.array([[-0.1, -2.75, np.nan], [-0.2, -0.3, -0.4]], np.float32)
    router.send(step(4, [(RID, 42, protocol.FINISH_STOP), (OTHER, 5, 0)], logprobs=lp,
                     top_token_ids=top_ids, top_logprobs=top_lps))
    rc, lines, err = c.wait()
    assert rc == 0 and err == "" and lines[1] == "finish stop"
    token, tok_id, logprob, *tops = lines[0].split()
    assert (token, tok_id) == ("token", "42")
    assert np.float32(float(logprob)) == lp[0]  # %.9g round-trips a float32 exactly
    assert [t.split(":")[0] for t in tops] == ["42", "7"]
    assert [np.float32(float(t.split(":")[1])) for t in tops] == [top_lps[0, 0], top_lps[0, 1]]


@pytest.mark.parametrize("record, expected", [
    (protocol.encode_error(protocol.ERR_INVALID_REQUEST, "top_p must be in (0, 1]", RID),
     "error 2 top_p must be in (0, 1]\n"),
    (protocol.encode_error(protocol.ERR_MALFORMED, "bad magic"), "error 1 bad magic\n"),
    # The server's text reaches a terminal: control characters are replaced.
    (protocol.encode_error(protocol.ERR_INTERNAL, "a\x1b[2Jb\nc", RID), "error 6 a?[2Jb?c\n"),
])
def test_error_record_exits_2(router, run, record, expected):
    c = run("--request-id", str(RID), "1", "2")
    router.recv()
    router.send(step(0, [(RID, 3, 0)]))
    router.send(record)
    assert c.wait() == (2, ["token 3"], expected)


def test_another_requests_error_is_not_ours(router, run):
    c = run("--request-id", str(RID), "1")
    router.recv()
    router.send(protocol.encode_error(protocol.ERR_DUPLICATE_ID, "in flight", OTHER))
    router.send(step(0, [(RID, 3, protocol.FINISH_STOP)]))
    assert c.wait() == (0, ["token 3", "finish stop"], "")


def _patched(record: bytes, fmt: str, offset: int, value) -> bytes:
    out = bytearray(record)
    struct.pack_into("<" + fmt, out, offset, value)
    return bytes(out)


def _malformed_frames() -> list[bytes]:
    ok = step(7, [(RID, 1, 0), (OTHER, 2, 0)])
    with_lp = step(8, [(RID, 1, 0)], logprobs=np.zeros(1, np.float32),
                   top_token_ids=np.zeros((1, 2), np.int32),
                   top_logprobs=np.zeros((1, 2), np.float32))
    err = protocol.encode_error(2, "message", RID)
    return [
        b"",                                         # empty
        ok[:12],                                     # shorter than a header
        ok[:-8],                                     # truncated: size no longer matches
        _patched(ok, "I", 0, 0x4D564950),            # magic in the wrong byte order
        _patched(ok, "H", 4, 4),                     # a version this client does not speak
        _patched(ok, "I", 8, len(ok) + 8),           # size lies: more than the frame
        _patched(ok + bytes(4), "I", 8, len(ok) + 4),  # size not a multiple of 8
        _patched(ok, "I", 24, 2**32 - 1),            # num_entries lies (would read 32 GiB)
        _patched(ok, "I", 24, 3),                    # num_entries lies by one
        _patched(ok, "I", 12, 2),                    # unknown step flag
        _patched(ok, "I", 28, 2),                    # top logprobs without MV_STEP_HAS_LOGPROBS
        _patched(with_lp, "I", 28, 21),              # more top logprobs than the protocol allows
        _patched(with_lp, "I", 28, 3),               # k lies
        _patched(ok, "H", 6, 9),                     # unknown kind
        protocol.encode_submit(RID, [1], SamplingParams()),  # a kind engines do not send
        _patched(err, "I", 28, 2**32 - 1),           # message_len lies
        _patched(err, "I", 12, 3),                   # unknown error flag
    ]


def test_malformed_frames_are_reported_and_survived(router, run):
    c = run("--request-id", str(RID), "1")
    router.recv()
    bad = _malformed_frames()
    for frame in bad:
        router.send(frame)
    router.send(step(0, [(RID, 4, 0)]), step(0, [(RID, 4, 0)]))  # two frames in one message
    router.send(step(1, [(RID, 5, protocol.FINISH_STOP)]))
    rc, lines, err = c.wait()
    assert (rc, lines) == (0, ["token 5", "finish stop"])
    reports = err.splitlines()
    assert len(reports) == len(bad) + 1 and all(r.startswith("malformed frame: ") for r in reports)
    assert "bad magic 0x4d564950" in reports[3] and "frames" in reports[-1]


def test_timeout_exits_3_and_aborts(router, run):
    c = run("--request-id", str(RID), "--timeout-ms", "300", "1")
    router.recv()
    router.send(b"\x00" * 16)  # a malformed frame is no progress: the timeout still runs
    router.send(step(0, [(OTHER, 1, 0)]))  # nor is another request's token
    rc, lines, err = c.wait()
    assert (rc, lines) == (3, [])
    assert "malformed frame" in err and "timeout: no token of request" in err
    abort = router.recv()  # so that a slow engine stops generating for no one
    assert isinstance(abort, protocol.Abort) and abort.request_id == RID


def test_interrupt_aborts_and_waits_for_the_finish(router, run):
    c = run("--request-id", str(RID), "1")
    router.recv()
    router.send(step(0, [(RID, 3, 0)]))
    assert c.line() == "token 3"
    c.proc.send_signal(signal.SIGINT)
    abort = router.recv()
    assert isinstance(abort, protocol.Abort) and abort.request_id == RID
    assert router.raw == protocol.encode_abort(RID)
    router.send(step(1, [(RID, -1, protocol.FINISH_ABORT)]))  # -1: no token, only the finish
    rc, lines, err = c.wait()
    assert (rc, lines) == (130, ["finish abort"])
    assert f"interrupted: aborting request {RID}" in err


def test_fuzzed_frames_under_sanitizers(router, run, asan_client_bin):
    """Random corruptions of valid records, some with the size field fixed up so that the
    deeper checks are reached. The client must survive all of them, then finish normally."""
    rng = random.Random(5)
    seeds = [
        step(1, [(OTHER, 1, 0), (OTHER + 1, 2, 1)]),
        step(2, [(OTHER, 1, 0)], logprobs=np.zeros(1, np.float32),
             top_token_ids=np.zeros((1, 3), np.int32), top_logprobs=np.zeros((1, 3), np.float32)),
        protocol.encode_error(4, "overloaded", OTHER),
    ]
    c = run("--request-id", str(RID), "--logprobs", "3", "1", binary=asan_client_bin)
    router.recv()
    for _ in range(400):
        frame = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            what = rng.random()
            if what < 0.5 and frame:
                frame[rng.randrange(len(frame))] = rng.randrange(256)
            elif what < 0.7:
                del frame[rng.randrange(len(frame) + 1):]
            else:
                frame += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 24)))
        if rng.random() < 0.5 and len(frame) >= 16:
            struct.pack_into("<I", frame, 8, len(frame))
        router.send(bytes(frame))
    router.send(step(3, [(RID, 9, protocol.FINISH_STOP)]))
    rc, lines, err = c.wait(timeout=30)
    assert "Sanitizer" not in err and "runtime error" not in err, err[-2000:]
    assert (rc, lines[-2:]) == (0, ["token 9", "finish stop"])


@pytest.mark.parametrize("args, message", [
    ([], "no prompt token ids"),
    (["--max-tokens", "-1", "1"], "--max-tokens: '-1' is not an integer"),
    (["--logprobs", "21", "1"], "--logprobs: '21' is not an integer in [0, 20]"),
    (["--seed", "-5", "1"], "--seed: '-5' is not an unsigned 64-bit integer"),
    (["--temperature", "0.5x", "1"], "--temperature: '0.5x' is not a number"),
    (["1", "2147483648"], "token id: '2147483648' is not an integer"),
    (["--top-k"], "--top-k needs a value"),
    (["--bogus", "1"], "unknown option --bogus"),
])
def test_usage_errors_exit_1(client_bin, args, message):
    proc = subprocess.run([str(client_bin), *args], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 1 and message in proc.stderr and proc.stdout == ""


def test_unreachable_engine_times_out(client_bin, tmp_path):
    proc = subprocess.run([str(client_bin), "--endpoint", f"ipc://{tmp_path}/nobody",
                           "--timeout-ms", "200", "1"], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 3 and "cannot reach the engine" in proc.stderr
