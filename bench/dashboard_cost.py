"""What the dashboard's event stream costs the engine: step time with and without a listener,
and the time the step loop spends in the dashboard's code.

    python -m bench.dashboard_cost --json bench/results/dashboard_cost_cpu.json

An engine process's loop (EngineProc over the embedded SmolLM2, fp32) runs in a thread of this
process, so that its two dashboard hooks (EngineEvents.on_step, called each step, and
EngineEvents.tick, each loop pass) can be timed where they run. A bare EngineChannel sends the
same decode-heavy batch (`--requests` greedy requests of `--tokens` tokens, ignore_eos),
alternately with no subscriber on the events socket and with one (a SUB socket read by a
thread, as an API server with a dashboard open holds). Rounds alternate so that the drift of a
shared machine falls on both. Reported, as medians over rounds: wall time per engine step
(the engine's own step counter), the hooks' time per step, and the listener's messages per
second and bytes per message. The hooks' cost with no listener is also timed alone (timeit, no
other thread competing for the GIL): one on_step, and one tick that is not due.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
import timeit

import zmq

from bench.records import record, write
from minivllm.config import TransportConfig
from minivllm.engine.engine_core import EngineCore
from minivllm.engine.engine_proc import EngineProc
from minivllm.engine.events import EngineEvents
from minivllm.llm import build_engine_config
from minivllm.sampling_params import SamplingParams
from minivllm.transport.channel import EngineChannel


class Listener(threading.Thread):
    """A SUB on the engine's events, counting what it receives until stopped."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.socket = ctx.socket(zmq.SUB)
        self.socket.connect(endpoint)
        self.socket.subscribe(b"")
        self.messages = self.bytes = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            if self.socket.poll(100):
                self.bytes += len(self.socket.recv())
                self.messages += 1
        self.socket.close(linger=0)


class HookTimer:
    """Wall time spent in the engine's dashboard hooks (instance attributes shadow them)."""

    def __init__(self, events) -> None:
        self.seconds = 0.0
        for name in ("on_step", "tick"):
            setattr(events, name, self._timed(getattr(events, name)))

    def _timed(self, hook):
        def timed(*args):
            start = time.perf_counter()
            hook(*args)
            self.seconds += time.perf_counter() - start
        return timed


def idle_hooks_us(ctx: zmq.Context, endpoint: str, n: int = 200_000) -> tuple[float, float]:
    """(on_step, tick not due) in us, with no subscriber, timed alone."""
    events = EngineEvents(ctx, endpoint, 512)
    try:
        events.tick(None)  # due once: reads the (absent) subscriptions, returns before the proc
        on_step = timeit.timeit(lambda: events.on_step(None, 0.0, 1.0), number=n)
        tick = timeit.timeit(lambda: events.tick(None), number=n)
    finally:
        events.close()
    return 1e6 * on_step / n, 1e6 * tick / n


def batch(ch: EngineChannel, n: int, tokens: int, first_id: int) -> tuple[float, int]:
    """Run n requests to the end: (wall s, engine steps)."""
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    step0 = ch.call("stats")["step"]
    start = time.perf_counter()
    for i in range(n):
        ch.submit(first_id + i, [1, 100 + i, 200 + i, 300 + i], params)
    finished = 0
    while finished < n:
        ch.wait(1.0)
        while (rec := ch.read()) is not None:
            finished += int(rec.finish_reasons.astype(bool).sum())
    wall = time.perf_counter() - start
    return wall, ch.call("stats")["step"] - step0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4, help="of each: without, with a listener")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    proc = EngineProc(EngineCore(build_engine_config(None, dtype="float32")), TransportConfig())
    hooks = HookTimer(proc.events)
    engine = threading.Thread(target=proc.run, name="engine")
    engine.start()
    ctx = zmq.Context()
    step_ms: dict[bool, list[float]] = {False: [], True: []}
    hook_us: dict[bool, list[float]] = {False: [], True: []}
    received = {"messages": 0, "bytes": 0, "wall_s": 0.0}
    try:
        with EngineChannel(proc.control_endpoint, proc.transport) as ch:
            batch(ch, args.requests, 8, 0)  # warm-up
            for r in range(2 * args.rounds):
                listening = r % 2 == 1
                listener = Listener(ctx, ch.info["events"]) if listening else None
                if listener is not None:
                    listener.start()
                    while not listener.messages:  # subscribed: the engine publishes
                        time.sleep(0.01)
                hooks.seconds = 0.0
                wall, steps = batch(ch, args.requests, args.tokens, 1000 * (r + 1))
                step_ms[listening].append(1e3 * wall / steps)
                hook_us[listening].append(1e6 * hooks.seconds / steps)
                if listener is not None:
                    listener.stopping.set()
                    listener.join()
                    received["messages"] += listener.messages
                    received["bytes"] += listener.bytes
                    received["wall_s"] += wall
                print(f"round {r}: listener {listening}: {step_ms[listening][-1]:.2f} ms/step, "
                      f"hooks {hook_us[listening][-1]:.1f} us/step ({steps} steps)", flush=True)
            ch.call("shutdown", drain=False)
    finally:
        proc.stopping = True
        engine.join()
    alone_step, alone_tick = idle_hooks_us(ctx, proc.events.endpoint)
    ctx.term()
    off, on = (statistics.median(step_ms[k]) for k in (False, True))
    cfg = dict(requests=args.requests, max_tokens=args.tokens, rounds=args.rounds,
               step_ms_with=step_ms[True], step_ms_without=step_ms[False],
               hook_us_with=hook_us[True], hook_us_without=hook_us[False])
    write(args.json, [
        record("engine step time with a dashboard listener", on, "ms/step", peer=off,
               peer_name="no listener", **cfg),
        record("dashboard hooks in the step loop, with a listener",
               statistics.median(hook_us[True]), "us/step", **cfg),
        record("dashboard hooks in the step loop, no listener",
               statistics.median(hook_us[False]), "us/step", **cfg),
        record("dashboard on_step, no listener, timed alone", alone_step, "us/call"),
        record("dashboard tick not due, no listener, timed alone", alone_tick, "us/call"),
        record("dashboard events received", received["messages"] / received["wall_s"],
               "messages/s", **cfg),
        record("dashboard event size", received["bytes"] / max(1, received["messages"]),
               "bytes/message", **cfg),
    ])


if __name__ == "__main__":
    main()
