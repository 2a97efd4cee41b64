"""AsyncEngineClient: the frontend's asyncio face of the engine process (no torch here).

    client = await AsyncEngineClient.connect(control_endpoint)
    async for out in client.generate("Hello", SamplingParams(max_tokens=32)):
        print(out.outputs[0].delta_text, end="")
    final = await client.submit([1, 2, 3], params)       # the same path, as a future
    await client.shutdown()   # README.md, "Python async client", has the whole script

One reader task drains the output ring into the output processor (the same one `LLM` uses); a
consumer wakes once per engine step however many tokens arrived (`RequestState` coalesces
them), or, one that listens (`RequestStream.listen`, the server's way), is called by the reader
itself in the same pass, or has its running tokens taken by a TextSink in C before the rest of
the pass (`RequestStream.sink`, the server's plain streams). Requests go out as submit records
into the request ring. The reader spins `spin_us` when the ring runs dry, then sleeps on the
doorbell; every `ENGINE_CHECK_S` it checks that the engine process still lives. If it died,
every request in flight fails with EngineDeadError at once, new ones are refused with it, the
reader leaves the rings alone (they hold the dead engine's records), and the client
re-attaches, emptying them, as soon as a (restarted) engine answers on the control socket.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import AsyncIterator, Callable, Optional, Union

import zmq

from minivllm._cext import text_sink
from minivllm.config import TransportConfig
from minivllm.frontend.output_processor import CompletionStream, OutputProcessor, RequestState
from minivllm.inputs import PromptType, check_prompt, parse_prompt, resolve_bad_words
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams
from minivllm.transport import protocol
from minivllm.transport.channel import EngineChannel
from minivllm.transport.shm import pid_alive
from minivllm.transport.zmq_context import readable

logger = logging.getLogger(__name__)

ENGINE_CHECK_S = 0.1    # how often the reader checks that the engine process lives
RECONNECT_POLL_S = 0.2  # how often a client whose engine died asks for a new one
REATTACH_ATTEMPT_S = 1.0  # one attempt to register with it (a shutdown waits for one to end)


class EngineError(RuntimeError):
    """The engine could not serve a request; `code` is the protocol's MV_ERR_*."""

    def __init__(self, message: str, code: int = protocol.ERR_INTERNAL) -> None:
        super().__init__(message)
        self.code = code


class InvalidRequestError(EngineError, ValueError):
    """The engine rejected the request's contents (a field out of range, a prompt too long)."""


class EngineDeadError(EngineError):
    """The engine process died (or is restarting): the request cannot complete."""


class EngineDrainingError(EngineError):
    """The engine is shutting down and takes no new requests."""


_ERRORS = {protocol.ERR_INVALID_REQUEST: InvalidRequestError,
           protocol.ERR_DUPLICATE_ID: InvalidRequestError,
           protocol.ERR_DRAINING: EngineDrainingError}


class AsyncEngineClient:
    def __init__(self, channel: EngineChannel, tokenizer) -> None:
        self.channel = channel
        self.tokenizer = tokenizer
        self._apply_info(channel.info)
        self._wire_ids = itertools.count(1)
        self.processor = OutputProcessor(tokenizer, self.eos_token_ids)
        self._requests: dict[str, RequestState] = {}
        self._request_ids = itertools.count()
        # id(state) -> its consumer's wake-up
        self._events: dict[int, Union[Wakeup, Listener]] = {}
        self.state = "ready"  # ready | dead (the engine died; re-attaching) | closed
        self.restarts = 0     # engine restarts this client re-attached after
        self._control_lock = asyncio.Lock()
        self._reader: Optional[asyncio.Task] = None
        self._reconnect: Optional[asyncio.Task] = None

    @classmethod
    async def connect(cls, control: str, model: Optional[str] = None, load_format: str = "auto",
                      transport: Optional[TransportConfig] = None, name: Optional[str] = None,
                      timeout: float = 120.0, tokenizer=None) -> "AsyncEngineClient":
        """Register with the engine at `control`; load `model`'s tokenizer (not its weights)
        unless one is given."""
        loop = asyncio.get_running_loop()
        if tokenizer is None:
            from minivllm.loader import load_tokenizer, resolve_model

            tokenizer = await loop.run_in_executor(
                None, lambda: load_tokenizer(resolve_model(model, load_format)))
        channel = await loop.run_in_executor(
            None, lambda: EngineChannel(control, transport, name, register_timeout=timeout))
        client = cls(channel, tokenizer)
        client._reader = asyncio.create_task(client._read_loop())
        return client

    def _apply_info(self, info: dict) -> None:
        self.engine_pid = info["pid"]
        self.events_endpoint: str = info["events"]  # the engine's dashboard events (XPUB)
        self.model_name = info["model"]
        self.max_model_len = info["max_model_len"]
        self.vocab_size = info["vocab_size"]
        self.eos_token_ids = tuple(info["eos_token_ids"])
        # the model's generation config (--generation-config), for requests that leave it unset
        self.sampling_defaults: dict = info["sampling_defaults"]

    @property
    def in_flight(self) -> int:
        """Requests of this client not finished (or not yet read to their end)."""
        return len(self._requests)

    # ---- requests -------------------------------------------------------------------------
    async def generate(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every engine step that advanced it; the last one
        is finished. Cancelling the consumer (or closing the generator) aborts the request."""
        stream = self.open(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def open(self, prompt: PromptType, params: Optional[SamplingParams] = None,
             request_id: Optional[str] = None, copy_lists: bool = True) -> "RequestStream":
        """generate(), but the request is checked and sent now (a server answers 400 before
        it starts a response); close() the stream if you stop reading before it finishes.
        copy_lists=False: each output's token_ids and logprobs (and prompt_logprobs) are the
        sequence's own lists, which later tokens extend, not copies (for a reader that reads an
        output's lists as it comes or once finished, as the server: the copies grow with the
        output)."""
        params = params or SamplingParams(**self.sampling_defaults)
        state = self._add(prompt, params, request_id)
        state.copy_lists = copy_lists
        return RequestStream(self, state)

    def submit(self, prompt: PromptType, params: Optional[SamplingParams] = None,
               request_id: Optional[str] = None) -> "asyncio.Task[RequestOutput]":
        """The request's final output, as a task (cancel it to abort the request). Bad input
        raises here, before anything is sent."""
        stream = self.open(prompt, params, request_id)

        async def last() -> RequestOutput:
            async for out in stream:
                pass
            return out
        return asyncio.ensure_future(last())

    async def abort(self, request_id: str) -> bool:
        """Abort a request by id; its consumer gets a last output with reason "abort"."""
        state = self._requests.get(request_id)
        if state is None:
            return False
        for stream in state.streams:
            if not stream.finished:
                self._abort_stream(stream)
        self._wake(state)
        return True

    def _add(self, prompt: PromptType, params: SamplingParams,
             request_id: Optional[str]) -> RequestState:
        if self.state != "ready":
            raise EngineDeadError(f"the engine is not available ({self.state}): retry once it "
                                  f"has restarted", protocol.ERR_INTERNAL)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        text, ids = parse_prompt(prompt, self.tokenizer)
        check_prompt(ids, self.max_model_len, self.vocab_size)
        params = resolve_bad_words(params, self.tokenizer)
        params.check_vocab(self.vocab_size)
        request_id = str(next(self._request_ids)) if request_id is None else str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        state = self.processor.add_request(request_id, text, ids, params,
                                           lambda: next(self._wire_ids))
        self._requests[request_id] = state
        self._events[id(state)] = Wakeup()
        try:
            for stream in state.streams:
                self.channel.submit(stream.key, ids, stream.params)
        except BaseException:
            # Nobody holds a stream of this request to close it: forget it here (aborting
            # what was sent), or it stays in _requests/processor/_events for good.
            self._release(state)
            raise
        return state

    def _release(self, state: RequestState) -> None:
        for key in self.processor.release(state):
            if self.state == "ready":
                self._send_abort(key)
        self._requests.pop(state.request_id, None)
        self._events.pop(id(state), None)

    def _abort_stream(self, stream: CompletionStream) -> None:
        stream.fail("abort")
        self.processor.streams.pop(stream.key, None)
        self._send_abort(stream.key)

    def _send_abort(self, key: int) -> None:
        try:
            self.channel.abort(key)
        except Exception:  # noqa: BLE001  (a dead engine: nothing left to abort)
            logger.debug("abort of wire request %d not sent", key)

    def _wake(self, state: RequestState) -> None:
        event = self._events.get(id(state))
        if event is not None:
            event.set()

    # ---- the reader -----------------------------------------------------------------------
    async def _read_loop(self) -> None:
        ring = self.channel.output_ring
        spin_s = self.channel.config.spin_us * 1e-6
        # Spin only while records come within spin_s of each other: an engine whose steps take
        # milliseconds would have the reader spin spin_s per step for nothing (at a chunk per
        # stream per step, 0.4 us of CPU per streamed token). A sleep the engine ends sooner
        # than that turns spinning back on.
        spinning = True
        next_check = time.monotonic() + ENGINE_CHECK_S
        bell = BellWaiter(self.channel.listener.socket)
        try:
            while self.state != "closed":
                if self.state == "dead":  # the rings hold the dead engine's records until
                    await asyncio.sleep(ENGINE_CHECK_S)  # re-attachment empties them
                    continue
                if self._drain():
                    await asyncio.sleep(0)  # let the consumers run, then read on
                elif spinning and ring.spin(spin_s):
                    pass
                elif ring.prepare_sleep():
                    slept = time.monotonic()
                    try:
                        rang = await bell.wait(ENGINE_CHECK_S)
                    finally:
                        ring.awake()
                    spinning = rang and time.monotonic() - slept < spin_s
                    if not rang:
                        self.channel.listener.check_timeout(ring.readable())
                    self.channel.listener.drain()
                else:
                    ring.awake()
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + ENGINE_CHECK_S
                    if not pid_alive(self.engine_pid):
                        self._engine_died()
        finally:
            bell.close()

    def _drain(self) -> bool:
        """Read what the engine wrote, a batch of step outputs at a time (their arrays made
        once per batch, not per step), up to READ_BATCH_RECORDS records, then yield to the
        consumers."""
        left = self.channel.READ_BATCH_RECORDS
        got = False
        while left > 0:
            try:
                record = self.channel.read_batch(left)
            except protocol.ProtocolError as exc:
                logger.error("dropped a malformed record from the engine: %s", exc)
                left -= 1
                continue
            if record is None:
                break
            got = True
            if isinstance(record, protocol.StepBatch):
                self._on_step(record)
                left -= len(record)
            elif isinstance(record, protocol.PromptLogprobs):
                self.processor.process_prompt_logprobs({record.request_id: (
                    record.first_position, record.logprobs, record.top_token_ids,
                    record.top_logprobs)})
                left -= 1
            else:
                self._on_error(record)
                left -= 1
        return got

    def _on_step(self, rec: protocol.StepBatch) -> None:
        """Apply a batch's entries in order (the steps' boundaries do not matter here)."""
        logprobs = None if rec.logprobs is None else (rec.logprobs, rec.top_token_ids,
                                                      rec.top_logprobs)
        keys, tokens, finish = rec.request_ids, rec.token_ids, rec.finish_reasons
        rest = text_sink.take(self.processor.streams, self.processor.sinks, keys, tokens,
                              finish)
        if rest is not None:  # the streams with a TextSink took the other entries
            if not len(rest):
                return  # (a step of running sinks only: the common one while streaming)
            keys, tokens, finish = keys[rest], tokens[rest], finish[rest]
            if logprobs is not None:
                logprobs = tuple(a[rest] for a in logprobs)
        # An abort this client asked for has already taken its stream out of the processor:
        # one still there was ended by the engine (a drain deadline, a shutdown). (A sink
        # takes no finish: every abort is among the entries left.)
        cut = [self.processor.streams[key][1] for key in
               keys[finish == protocol.FINISH_ABORT].tolist() if key in self.processor.streams]
        touched, stopped = self.processor.process(keys, tokens, finish, logprobs)
        for key in stopped:
            self._send_abort(key)
        for state in cut:
            self._fail(state, EngineDrainingError("the engine stopped this request before it "
                                                  "finished (a shutdown, or its drain "
                                                  "deadline)", protocol.ERR_DRAINING))
        events = self._events
        for state in touched:  # (_wake's lookup, inline: this runs per request per step)
            event = events.get(id(state))
            if event is not None:
                event.set()

    def _on_error(self, rec: protocol.ErrorRecord) -> None:
        entry = (self.processor.streams.pop(rec.request_id, None)
                 if rec.request_id is not None else None)
        if entry is not None:
            entry[0].fail("error")
            self._fail(entry[1], _ERRORS.get(rec.code, EngineError)(rec.message, rec.code))
        elif rec.request_id is None:
            logger.error("engine error (code %d): %s", rec.code, rec.message)
        else:  # a request this client has already ended (failed, aborted)
            logger.debug("engine error for ended request %d: %s", rec.request_id, rec.message)

    def _fail(self, state: RequestState, error: EngineError) -> None:
        """End a request as a whole with `error` (its consumer raises it); its streams still
        running in a live engine are aborted there."""
        if state.error is None:
            state.error = error
        for stream in state.streams:
            if self.processor.streams.pop(stream.key, None) is not None \
                    and self.state == "ready":
                self._send_abort(stream.key)
            stream.fail("error")
        self._wake(state)

    def fail_all(self, message: str) -> None:
        """End every request in flight with EngineDrainingError(message): the server's drain
        deadline has passed."""
        for _, state in list(self.processor.streams.values()):
            self._fail(state, EngineDrainingError(message, protocol.ERR_DRAINING))

    # ---- engine death and re-attachment ---------------------------------------------------
    def _engine_died(self) -> None:
        logger.error("the engine process %d died: failing %d requests in flight",
                     self.engine_pid, len(self._requests))
        self.state = "dead"  # no aborts: nobody is left to take them
        for _, state in list(self.processor.streams.values()):
            self._fail(state, EngineDeadError("the engine process died while serving this "
                                              "request"))
        self._reconnect = asyncio.create_task(self._reattach())

    async def _reattach(self) -> None:
        loop = asyncio.get_running_loop()
        while self.state == "dead":
            try:
                async with self._control_lock:
                    info = await loop.run_in_executor(
                        None, lambda: self.channel.register(timeout=REATTACH_ATTEMPT_S))
            except (TimeoutError, RuntimeError):
                await asyncio.sleep(RECONNECT_POLL_S)
                continue
            if self.state != "dead":
                return  # shut down meanwhile
            self._apply_info(info)
            self.restarts += 1
            self.state = "ready"
            logger.info("re-attached to the restarted engine (pid %d)", self.engine_pid)

    # ---- control --------------------------------------------------------------------------
    async def call(self, op: str, timeout: float = 5.0, **args) -> dict:
        """A control-channel request (stats, health, drain, ...), off the event loop."""
        async with self._control_lock:
            return await asyncio.get_running_loop().run_in_executor(
                None, lambda: self.channel.call(op, timeout=timeout, **args))

    async def shutdown(self) -> None:
        """Abort what is in flight, detach from the engine, remove this frontend's rings."""
        if self.state == "closed":
            return
        for state in list(self._requests.values()):
            await self.abort(state.request_id)
        self.state = "closed"
        # The reader is cancelled; a re-attachment ends by itself after its attempt, which
        # uses the control socket from another thread: close() must not run beside it.
        if self._reader is not None:
            self._reader.cancel()
        await asyncio.gather(*(t for t in (self._reader, self._reconnect) if t is not None),
                             return_exceptions=True)
        async with self._control_lock:
            await asyncio.get_running_loop().run_in_executor(None, self.channel.close)


class BellWaiter:
    """A sleep on a BellListener's socket in the event loop: its file descriptor watched for
    the reader's life (loop.add_reader), a bare future and a timer per sleep. (zmq.asyncio's
    poll() makes a Poller, three futures and their callbacks per call, and the reader sleeps
    once per engine step or more.)"""

    def __init__(self, socket: zmq.Socket) -> None:
        self.socket = socket
        self.fd = socket.getsockopt(zmq.FD)
        self.loop = asyncio.get_running_loop()
        self._waiter: Optional[asyncio.Future] = None
        self.loop.add_reader(self.fd, self._on_fd)

    def _on_fd(self) -> None:
        # ZeroMQ's descriptor says only that the socket's state may have changed: readable()
        # processes the change (which clears the descriptor) and tells if a bell is queued.
        if readable(self.socket) and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)

    async def wait(self, timeout: float) -> bool:
        """Until a bell is queued (True) or `timeout` seconds pass (False)."""
        if readable(self.socket):
            return True
        self._waiter = waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, _resolve, waiter, False)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def close(self) -> None:
        self.loop.remove_reader(self.fd)


def _resolve(future: asyncio.Future, result) -> None:
    if not future.done():
        future.set_result(result)


class Wakeup:
    """asyncio.Event for a request's one consumer, set by the reader per engine step that
    advanced the request, cleared by the wait it ends: a bare future per wait, without Event's
    waiter deque (a step wakes every request in flight)."""

    __slots__ = ("is_set", "_waiter")

    def __init__(self) -> None:
        self.is_set = False
        self._waiter: Optional[asyncio.Future] = None

    def set(self) -> None:
        self.is_set = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self) -> None:
        if not self.is_set:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self.is_set = False


class Listener:
    """A request's consumer that the reader calls (RequestStream.listen) where it would set a
    Wakeup."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback

    def set(self) -> None:
        try:
            self.callback()
        except Exception:  # the reader serves every request: one consumer's bug must not stop it
            logger.exception("a request's output listener failed")


class RequestStream:
    """The outputs of one request, as an async iterator. Cancelling a wait on it, close(), or
    an error aborts what is still running in the engine and forgets the request."""

    def __init__(self, client: AsyncEngineClient, state: RequestState) -> None:
        self.client, self.state = client, state
        self.request_id = state.request_id
        self._event = client._events[id(state)]
        self._closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._closed:
            raise StopAsyncIteration
        await self._wait()
        return self.poll()

    async def _wait(self) -> None:
        try:
            await self._event.wait()
        except BaseException:
            self.close()
            raise

    def poll(self) -> RequestOutput:
        """The request's output now (what the next iteration returns once the reader has
        advanced it): raises the request's error; closes the stream once it has finished."""
        if self.state.error is not None:
            self.close()
            raise self.state.error
        out = self.state.snapshot()
        if self.state.finished:
            self.close()
        return out

    def running_delta(self) -> Optional[tuple[str, int]]:
        """For a request of one sequence, running, without error: its text and the number of
        its tokens new since the last output, taken as poll() takes them (a server's common
        chunk, without building the output); None otherwise (poll() then)."""
        state = self.state
        if state.error is not None or len(state.streams) != 1 \
                or state.streams[0].finish_reason is not None:
            return None
        return state.streams[0].news()

    def sink(self, prefix: bytes, suffix: bytes, writer, last: list, index: int,
             tally: text_sink.Tally) -> bool:
        """For a request whose running_delta() is its output: have the reader write its
        running tokens itself from now on, without calling the listener for them (a TextSink,
        csrc/text_sink.pyx: `prefix`, the new text as a JSON string and `suffix` as one chunk
        to `writer` per read, gaps from `last[index]` into `tally`). Whether it could: one
        sequence, running, no stop strings, no logprobs, a byte-level tokenizer."""
        state = self.state
        if state.error is not None or len(state.streams) != 1 \
                or not state.streams[0].sinkable():
            return False
        stream = state.streams[0]
        stream.sink = text_sink.TextSink(stream, self.client.processor.sinks, prefix, suffix,
                                         writer, last, index, tally)
        return True

    async def ready(self) -> None:
        """Until the request has an output (or an error, raised here), which stays to be
        taken."""
        await self._wait()
        self._event.is_set = True
        if self.state.error is not None:
            self.close()
            raise self.state.error

    def listen(self, callback: Callable[[], None]) -> None:
        """Have the reader itself call `callback()` after each read of engine steps that
        advanced or ended the request (and now, if an output already waits), instead of waking
        an iterator; the callback takes the output with poll(). A consumer that handles each
        output at once (the server's streams) then costs no task switch per request per step:
        one reader pass serves every request. Call it once, before any poll()."""
        if self._closed:
            return
        waiting = self._event.is_set
        self._event = self.client._events[id(self.state)] = Listener(callback)
        if waiting:
            self._event.set()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.client._release(self.state)
            # A listener's callback holds its consumer, which holds this stream: a cycle that
            # would leave every request's objects to the collector's full collections.
            self._event = None

    async def aclose(self) -> None:
        self.close()

