"""`minivllm run-batch -i requests.jsonl -o results.jsonl`: OpenAI batch files, as `vllm run-batch`.

Each input line is `{"custom_id", "method": "POST", "url": "/v1/completions" or
"/v1/chat/completions", "body"}`; each output line is `{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error": null}`, the shape of OpenAI's Batch API (a request
the server refuses has its 4xx status and OpenAI error body there). The lines go through the
server's own app in this process (httpx's ASGI transport, no socket) to an engine process, so a
line gets exactly the answer `minivllm serve` would give.

Resumable: every result is appended and flushed as it comes, so a killed run leaves complete
lines (and at most one torn last line, cut on restart); a restart sends only the lines whose
custom_id has no result yet. Answers a retry may change (429, 5xx: the engine restarting) are
not written: the run says how many and exits 1, and running it again finishes them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Optional

from minivllm.config import EngineConfig, ServerConfig, SupervisorConfig, TransportConfig
from minivllm.server.protocol import APIError

logger = logging.getLogger(__name__)

URLS = ("/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class BatchConfig:
    input_path: str
    output_path: str
    max_concurrency: int = 256  # lines in flight at once: the engine batches them
    served_model_name: Optional[str] = None

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if os.path.abspath(self.input_path) == os.path.abspath(self.output_path):
            raise ValueError("the output file must not be the input file")


def read_requests(path: str) -> list[dict]:
    """The input lines, checked up front: a bad line fails the run before the model loads."""
    requests, seen = [], set()
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            req = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(req, dict) or not isinstance(req.get("custom_id"), str):
            raise ValueError(f"{where}: needs a string custom_id")
        if req.get("method", "POST") != "POST" or req.get("url") not in URLS:
            raise ValueError(f"{where}: method must be POST and url one of {URLS}, got "
                             f"{req.get('method')} {req.get('url')}")
        if not isinstance(req.get("body"), dict):
            raise ValueError(f"{where}: body must be a JSON object")
        if req["custom_id"] in seen:  # results are matched to lines by it
            raise ValueError(f"{where}: custom_id {req['custom_id']!r} is used twice")
        seen.add(req["custom_id"])
        requests.append(req)
    return requests


def completed_ids(path: str) -> set[str]:
    """custom_ids with a result in `path`; a torn last line (a kill mid-write) is cut off."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            f.truncate(keep)
    return {json.loads(line)["custom_id"] for line in data[:keep].splitlines() if line.strip()}


def result_line(custom_id: str, status: int, body: dict) -> str:
    request_id = f"batch-{uuid.uuid4().hex}"
    return json.dumps({"id": request_id, "custom_id": custom_id,
                       "response": {"status_code": status, "request_id": request_id,
                                    "body": body},
                       "error": None}, ensure_ascii=False) + "\n"


def run_batch(engine_config: EngineConfig, config: BatchConfig) -> int:
    """Run every line of the input without a result in the output; the exit status."""
    requests = read_requests(config.input_path)
    done = completed_ids(config.output_path)
    todo = [r for r in requests if r["custom_id"] not in done]
    print(f"minivllm run-batch: {len(requests)} requests, {len(requests) - len(todo)} already "
          f"in {config.output_path}, {len(todo)} to run", flush=True)
    if not todo:
        return 0
    from minivllm.engine.supervisor import Supervisor

    supervisor = Supervisor(engine_config, TransportConfig(), SupervisorConfig())
    supervisor.start()
    try:
        failed = asyncio.run(_run(supervisor, engine_config, config, todo, len(requests)))
    finally:
        supervisor.shutdown(drain=False, timeout=15.0)
    if failed:
        print(f"minivllm run-batch: {failed} requests got a retriable error (429/5xx) and have "
              f"no result: run the same command again to finish them", flush=True)
    return 1 if failed else 0


async def _run(supervisor, engine_config: EngineConfig, config: BatchConfig, todo: list[dict],
               total: int) -> int:
    """`max_concurrency` workers take the lines in turn; returns how many got no result."""
    import httpx
    from tqdm import tqdm

    from minivllm.frontend.data_parallel_client import DataParallelClient
    from minivllm.server.app import ServerState, build_app

    model = engine_config.model
    client = await DataParallelClient.connect([supervisor.control], model.model,
                                              model.load_format, supervisor.transport,
                                              name="run-batch")
    state = ServerState(ServerConfig(max_pending=config.max_concurrency,
                                     served_model_name=config.served_model_name))
    state.client = client
    state.model_name = config.served_model_name or client.model_name
    lines, failed = iter(todo), 0
    try:
        with open(config.output_path, "a", encoding="utf-8") as out, \
                tqdm(total=total, initial=total - len(todo), unit="req") as bar:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(state)),
                                         base_url="http://run-batch", timeout=None) as http:
                async def worker() -> None:
                    nonlocal failed
                    for req in lines:
                        status, body = await _answer(http, state.model_name, req)
                        if status == 429 or status >= 500:
                            failed += 1
                            continue
                        out.write(result_line(req["custom_id"], status, body))
                        out.flush()
                        bar.update(1)
                await asyncio.gather(*(worker() for _ in
                                       range(min(config.max_concurrency, len(todo)))))
    finally:
        await client.shutdown()
    return failed


async def _answer(http, model_name: str, req: dict) -> tuple[int, dict]:
    """The server's answer to one line (a stream is refused: a batch result is one body)."""
    body = {"model": model_name, **req["body"]}
    if body.get("stream"):
        return 400, APIError(400, "stream is not supported in a batch", param="stream").body()
    resp = await http.post(req["url"], json=body)
    return resp.status_code, resp.json()
