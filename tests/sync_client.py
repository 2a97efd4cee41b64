"""EngineClient, the tests' synchronous client: AsyncEngineClient on an event loop in a
background thread.

    with EngineClient(control_endpoint) as client:
        outs = client.generate(["Hello", "Bonjour"], SamplingParams(max_tokens=16))
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Optional, Sequence, Union

from minivllm.frontend.async_client import AsyncEngineClient
from minivllm.inputs import PromptType
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams


class EngineClient:
    def __init__(self, control: str, model: Optional[str] = None, **connect_args: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="minivllm-client",
                                        daemon=True)
        self._thread.start()
        try:
            self.client: AsyncEngineClient = self._run(
                AsyncEngineClient.connect(control, model, **connect_args))
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 params: Optional[SamplingParams] = None) -> list[RequestOutput]:
        """Final outputs, one per prompt in order; all run concurrently in the engine."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]

        async def run_all() -> list[RequestOutput]:
            tasks = [self.client.submit(p, params) for p in prompts]
            try:
                return await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                raise
        return self._run(run_all())

    def call(self, op: str, **args: Any) -> dict:
        return self._run(self.client.call(op, **args))

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self.client.shutdown())
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> "EngineClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
