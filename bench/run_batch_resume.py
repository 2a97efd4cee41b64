"""`minivllm run-batch` killed halfway and run again: every request gets one result, none twice.

    python -m bench.run_batch_resume --requests 200 --kill-after 100 \
        --json bench/results/run_batch_resume_cpu.json

Writes a batch file of chat and completion requests (greedy, fixed lengths), starts run-batch
on it, SIGKILLs it once `--kill-after` results are written, appends a torn line as a kill in the
middle of a write leaves one, notes what the killed run left behind (its processes, shared
memory and socket files), runs the same command again, and counts the results: how many, how
many distinct custom_ids, whether the lines written before the kill are still there unchanged,
and whether anything of the killed run is left after the rerun. tests/test_cli.py runs the same
on a dozen requests.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bench import records
from bench.server_proc import leftovers

TORN = '{"id": "batch-torn", "custom_'  # what a kill in the middle of a write leaves


def write_requests(path: Path, n: int, max_tokens: int) -> list[str]:
    ids = []
    with open(path, "w") as f:
        for i in range(n):
            common = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            if i % 2:
                url, body = "/v1/chat/completions", {
                    "messages": [{"role": "user", "content": f"Tell me about the number {i}."}]}
            else:
                url, body = "/v1/completions", {"prompt": f"Fact {i}:"}
            ids.append(f"request-{i}")
            f.write(json.dumps({"custom_id": ids[-1], "method": "POST", "url": url,
                                "body": {**body, **common}}) + "\n")
    return ids


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.exists() else []


def _settled_leftovers(pids: list[int], settle: float = 10.0) -> dict[str, list]:
    """What the killed run left once its resource tracker had `settle` seconds to unlink its
    segments (socket files stay until the next start's cleanup_stale)."""
    deadline = time.monotonic() + settle
    left = leftovers(pids)
    while left["shm"] and time.monotonic() < deadline:
        time.sleep(0.2)
        left = leftovers(pids)
    return left


def kill_and_resume(workdir: Path, n: int, kill_after: int, concurrency: int,
                    max_tokens: int = 32, timeout: float = 900.0) -> dict:
    """The run described above; its figures (the caller asserts on them)."""
    requests, results = workdir / "requests.jsonl", workdir / "results.jsonl"
    ids = write_requests(requests, n, max_tokens)
    cmd = [sys.executable, "-m", "minivllm.cli", "run-batch", "-i", str(requests), "-o",
           str(results), "--dtype", "float32", "--num-blocks", "1024",
           "--max-concurrency", str(concurrency)]
    env = {**os.environ, "MINIVLLM_LOG_LEVEL": "WARNING"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    family: set[int] = {first.pid}
    while len(_lines(results)) < kill_after and first.poll() is None \
            and time.monotonic() < deadline:
        family.update(c.pid for c in psutil.Process(first.pid).children(recursive=True))
        time.sleep(0.05)
    first.kill()
    first.wait()
    before = _lines(results)
    with open(results, "a") as f:
        f.write(TORN)
    left = _settled_leftovers(sorted(family))
    t0 = time.monotonic()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    rerun_s = time.monotonic() - t0
    after = _lines(results)
    got = [json.loads(line)["custom_id"] for line in after]
    return {"requests": n, "results_at_kill": len(before),
            "killed_before_the_end": first.returncode == -9 and len(before) < n,
            "left_by_the_kill": left, "left_after_rerun": leftovers(sorted(family)),
            "rerun_exit": second.returncode, "rerun_said": second.stdout.strip().splitlines()[:1],
            "rerun_stderr_tail": second.stderr[-2000:] if second.returncode else "",
            "rerun_s": rerun_s,
            "results": len(after), "distinct": len(set(got)), "all_ids": set(got) == set(ids),
            "kept_unchanged": after[:len(before)] == before,
            "ok_status": sum(json.loads(line)["response"]["status_code"] == 200
                             for line in after)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--kill-after", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--workdir", default="/tmp/run_batch_resume")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("requests.jsonl", "results.jsonl"):
        (workdir / name).unlink(missing_ok=True)
    run = kill_and_resume(workdir, args.requests, args.kill_after, args.concurrency,
                          args.max_tokens)
    print(json.dumps(run, indent=1))
    records.write(args.json, [
        records.record("run-batch results after kill -9 and rerun", run["results"], "results",
                       **run),
        records.record("run-batch duplicated results", run["results"] - run["distinct"],
                       "results")])


if __name__ == "__main__":
    main()
