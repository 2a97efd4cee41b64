"""The live dashboard: the engine's event encoding, the routes' gates, and one test in a real
headless browser (Debian's chromium driven by playwright) against a real `minivllm serve` under
the load generator. The browser test skips when playwright or chromium is absent (.ci/run
installs both)."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.server_proc import ServeProcess, leftovers, wait_engine_idle, wait_healthy
from minivllm.config import ServerConfig
from minivllm.core.block_allocator_ref import BlockAllocator
from minivllm.engine.events import CACHED, FREE, OWNER, KVGrid
from minivllm.server.app import ServerState, build_app
from minivllm.server.dashboard.hub import quantile

KEY = "dashboard-test-key"
CHROMIUM = shutil.which("chromium")
WAIT_S = 300.0  # bound on every wait for the page (a loaded 2-core machine is slow, not hung)


def _apply(grid: np.ndarray, runs: list[int]) -> None:
    for start, length, value in zip(runs[::3], runs[1::3], runs[2::3]):
        grid[start:start + length] = value


def test_kv_grid_shows_owners_cached_and_free_as_run_deltas():
    alloc = BlockAllocator(10_000, 4, 4, 64)
    grid = KVGrid(alloc.num_blocks)
    assert (grid.cells, grid.per_cell) == (3334, 3)  # at most 4000 cells: runs of 3 blocks
    key = grid.frame(alloc, key=False)  # the first frame is a key frame whatever is asked
    assert key["key"] and key["runs"] == [0, 3334, FREE]
    shown = np.full(grid.cells, -1)
    _apply(shown, key["runs"])
    tokens = np.arange(40)
    for seq in (0, 1):
        alloc.match_prefix(seq, tokens, 40)
        alloc.allocate(seq, 40 + 8 * seq)
        alloc.commit(seq, tokens, 40)
    delta = grid.frame(alloc, key=False)
    assert not delta["key"]
    _apply(shown, delta["runs"])
    # seq 0 holds blocks 0-9; seq 1 shares 0-8 (prefix hits) and holds 10-12: cells of
    # 3 blocks show the highest owner of their run
    assert shown[:5].tolist() == [OWNER + 1] * 5 and (shown[5:] == FREE).all()
    alloc.free(1)
    alloc.free(0)
    _apply(shown, grid.frame(alloc, key=False)["runs"])
    assert shown[:4].tolist() == [CACHED] * 4  # registered, evictable
    assert (shown[5:] == FREE).all()
    assert grid.frame(alloc, key=False)["runs"] == []  # nothing changed: nothing sent


def test_percentiles_are_prometheus_histogram_quantile():
    bounds, cumulative = [0.1, 0.5, 1.0, float("inf")], [2, 6, 10, 12]
    assert quantile(0.5, bounds, cumulative) == pytest.approx(0.1 + 0.4 * (6 - 2) / 4)
    assert quantile(0.25, bounds, cumulative) == pytest.approx(0.1 + 0.4 * (3 - 2) / 4)
    assert quantile(0.1, bounds, cumulative) == pytest.approx(0.1 * 1.2 / 2)
    assert quantile(0.99, bounds, cumulative) == 1.0  # in +Inf: the last finite bound
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None


def test_dashboard_routes_need_the_key_and_can_be_off():
    async def get(config: ServerConfig, path: str, headers=None) -> httpx.Response:
        app = build_app(ServerState(config))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                     base_url="http://t") as client:
            return await client.get(path, headers=headers)

    keyed = ServerConfig(api_key=KEY)
    page = asyncio.run(get(keyed, "/dashboard"))
    assert page.status_code == 200 and "dashboard.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert asyncio.run(get(keyed, "/dashboard/dashboard.js")).status_code == 200
    refused = asyncio.run(get(keyed, "/dashboard/events"))
    assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
    # the right key, but no engine attached yet: 503, not a stream
    assert asyncio.run(get(keyed, "/dashboard/events",
                           {"Authorization": f"Bearer {KEY}"})).status_code == 503
    for path in ("/dashboard", "/dashboard/events"):
        assert asyncio.run(get(ServerConfig(dashboard=False), path)).status_code == 404


# ---- the browser test ----------------------------------------------------------------------

class MetricsLog(threading.Thread):
    """/metrics read back to back (paced by PACE_S) as (start, end, {name: value}) samples;
    one without the engine's figures (its stats call timed out: a slow step) is left out."""

    PACE_S = 0.1

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.samples, self.stop = url, [], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.PACE_S):
            start = time.monotonic()
            try:
                values = scrape(self.url)
            except httpx.HTTPError:
                continue
            if "minivllm:num_requests_running" in values:
                self.samples.append((start, time.monotonic(), values))


def scrape(url: str) -> dict:
    """/metrics as {name: value} (labelled samples summed) and {name: [(le, count)]} buckets."""
    values: dict = {}
    text = httpx.get(url + "/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_bucket"):
                values.setdefault(s.name, []).append((float(s.labels["le"]), s.value))
            else:
                values[s.name] = values.get(s.name, 0.0) + s.value
    return values


def bucket_of(q: float, buckets: list[tuple[float, float]]) -> tuple[float, float]:
    """The bounds of the bucket that holds rank q x count."""
    buckets = sorted(buckets)
    rank = q * buckets[-1][1]
    i = next(i for i, (_, count) in enumerate(buckets) if count >= rank)
    return (buckets[i - 1][0] if i else 0.0), buckets[i][0]


def _open(p, url: str):
    """Chromium on the dashboard at 1280x800: (browser, page, the page's errors, wait_for)."""
    browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/dashboard")

    def wait_for(js: str, arg=None) -> None:
        page.wait_for_function(js, arg=arg, timeout=WAIT_S * 1000, polling=100)
    return browser, page, errors, wait_for


def test_dashboard_in_a_real_browser(tmp_path):
    """The page asks for the key, connects, its step timeline and KV grid update under the load
    generator, its figures equal /metrics, it renders at 1280x800 and phone width, and a kill -9
    of the engine shows the restart and recovers."""
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the test extra installs playwright")
    if CHROMIUM is None:
        pytest.skip(reason="no chromium on PATH (Debian: apt-get install chromium)")
    shots = Path(os.environ.get("MINIVLLM_DASHBOARD_SHOTS", tmp_path))
    srv = ServeProcess(["--dtype", "float32", "--num-blocks", "512", "--api-key", KEY])
    pids = srv.process_tree()
    load = log = None
    try:
        assert httpx.get(srv.url + "/dashboard/events").status_code == 401
        with sync_api.sync_playwright() as p:
            browser, page, errors, wait_for = _open(p, srv.url)

            def shown(k: str) -> str:
                return page.text_content(f'[data-k="{k}"]')

            wait_for("() => !document.getElementById('keyform').hidden")  # asks for the key
            page.fill("#key", KEY)
            page.click("#keyform button")
            wait_for("() => document.getElementById('status').textContent === 'connected'")

            # -- under the load generator: the timeline and the KV grid update
            log = MetricsLog(srv.url)
            log.start()
            load = subprocess.Popen(
                cwd=Path(__file__).resolve().parent.parent, args=[sys.executable, "-m", "bench.serve_load", "--url", srv.url, "--api-key", KEY,
                 "--endpoint", "chat", "--rate", "4", "--num-requests", "8",
                 "--max-concurrency", "4", "--prompt-len", "48", "--output-len", "128",
                 "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            wait_for("() => S.steps.length >= 8 && S.grid && S.grid.some((v) => v >= 2)")
            timeline = page.evaluate("document.getElementById('timeline').toDataURL()")
            steps = int(shown("step"))
            wait_for(f"() => S.steps.length && Number(document.querySelector("
                     f"'[data-k=\"step\"]').textContent) >= {steps + 3}")
            page.wait_for_timeout(100)  # one animation frame draws what came
            assert page.evaluate("document.getElementById('timeline').toDataURL()") != timeline
            page.screenshot(path=str(shots / "dashboard_1280x800.png"))
            # the grid's colours: owners (neither free, cached nor blank) are drawn
            assert page.evaluate("""() => {
                const c = document.getElementById('kvgrid');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                const plain = new Set(['43,49,61', '103,117,140', '0,0,0']);
                let owners = 0;
                for (let i = 0; i < d.length; i += 4)
                    if (d[i + 3] && !plain.has(`${d[i]},${d[i + 1]},${d[i + 2]}`)) owners++;
                return owners; }""") > 0
            _check_under_load(page, shown, log)

            page.set_viewport_size({"width": 390, "height": 844})
            page.wait_for_timeout(300)
            page.screenshot(path=str(shots / "dashboard_phone.png"), full_page=True)
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            page.set_viewport_size({"width": 1280, "height": 800})

            out, _ = load.communicate(timeout=WAIT_S)
            assert load.returncode == 0, out
            log.stop.set()
            wait_engine_idle(srv.url, timeout=WAIT_S)
            _check_at_rest(page, shown, srv.url)

            # -- kill -9 of the engine: the page says so, then shows the new one
            old = srv.engine_pid()
            os.kill(old, signal.SIGKILL)
            wait_for("() => document.getElementById('status').textContent.includes('restarting')")
            new = wait_healthy(srv.url, timeout=WAIT_S, engine_pid=old)
            wait_for("() => document.getElementById('status').textContent"
                     ".includes('engine restarted')")
            wait_for("(pid) => document.getElementById('engine-pid').textContent == pid", new)
            assert shown("restarts") == "1" == str(int(scrape(srv.url)["minivllm:engine_restarts"]))
            httpx.post(srv.url + "/v1/completions", timeout=WAIT_S,
                       headers={"Authorization": f"Bearer {KEY}"},
                       json={"prompt": "The dashboard", "max_tokens": 4}).raise_for_status()
            wait_for("() => document.querySelector('[data-k=\"finished\"]').textContent === '1'")
            page.screenshot(path=str(shots / "dashboard_after_restart.png"))
            assert not errors
            browser.close()
    finally:
        if log is not None:
            log.stop.set()
        if load is not None and load.poll() is None:
            load.kill()
        pids = sorted(set(pids + srv.process_tree()))
        code = srv.stop()
    assert code == 0
    assert leftovers(pids) == {"processes": [], "shm": [], "sockets": []}


# figures the page shows (data-k) and the /metrics sample that holds the same count
COUNTERS = {"prefix_queries": "minivllm:prefix_cache_queries_total",
            "prefix_hits": "minivllm:prefix_cache_hits_total",
            "preemptions": "minivllm:num_preemptions_total"}
GAUGES = {"running": "minivllm:num_requests_running", "waiting": "minivllm:num_requests_waiting"}


def _check_under_load(page, shown, log: MetricsLog) -> None:
    """Each figure equals what /metrics said within a second of the read (a counter: between
    /metrics of a second before and /metrics after; a gauge: one of those samples). A step
    longer than a second stretches that: the engine publishes between steps."""
    checks = 0
    while checks < 5:
        start = time.monotonic()
        figures = {k: float(shown(k)) for k in (*COUNTERS, *GAUGES)}
        end = time.monotonic()
        step_s = max([s[3] for s in page.evaluate("S.steps")] or [0]) / 1000
        window = 1.0 + step_s
        deadline = time.monotonic() + WAIT_S
        while not any(s0 >= end for s0, _, _ in log.samples):  # /metrics read after the page
            assert time.monotonic() < deadline and log.is_alive(), "no /metrics samples"
            page.wait_for_timeout(50)
        before = [v for s0, e0, v in log.samples if e0 <= start - window]
        after = [v for s0, e0, v in log.samples if s0 >= end]
        if not before:  # the log does not reach that far back yet
            page.wait_for_timeout(100)
            continue
        for k, name in COUNTERS.items():
            assert before[-1].get(name, 0) <= figures[k] <= after[0].get(name, 0), k
        near = [v for s0, e0, v in log.samples if start - window <= s0 and e0 <= end + window]
        for k, name in GAUGES.items():
            assert figures[k] in [v.get(name) for v in near], (k, figures[k])
        checks += 1


def _check_at_rest(page, shown, url: str) -> None:
    """At rest, within a second's events, every figure is what /metrics says; percentiles lie
    in the histogram bucket that holds them."""
    deadline = time.monotonic() + WAIT_S
    while "minivllm:num_requests_running" not in (m := scrape(url)):  # stats timed out
        assert time.monotonic() < deadline, "/metrics never had the engine's figures"
    expect = {"finished": m["minivllm:request_success_total"],
              "http_success": m["minivllm:request_success_total"],
              "generation_tokens": m["minivllm:generation_tokens_total"],
              "prompt_tokens": m["minivllm:prompt_tokens_total"],
              "kv_used": m["minivllm:kv_cache_usage_perc"] * 512,
              **{k: m.get(name, 0.0) for k, name in {**COUNTERS, **GAUGES}.items()}}
    page.wait_for_function(
        "(e) => Object.entries(e).every(([k, v]) => "
        "Number(document.querySelector(`[data-k=\"${k}\"]`).textContent) === v)",
        arg=expect, timeout=WAIT_S * 1000, polling=100)
    page.wait_for_function("(n) => document.querySelector('[data-k=\"ttft_count\"]')"
                           ".textContent == n", arg=int(m["minivllm:time_to_first_token_seconds_count"]),
                           timeout=WAIT_S * 1000, polling=100)
    for short, name in (("ttft", "time_to_first_token"), ("itl", "inter_token_latency")):
        buckets = m[f"minivllm:{name}_seconds_bucket"]
        for q in (50, 90, 99):
            lower, upper = bucket_of(q / 100, buckets)
            value = float(shown(f"{short}_p{q}")) / 1000
            assert lower - 1e-4 <= value <= upper + 1e-4, (short, q, value, lower, upper)


def test_dashboard_shows_every_data_parallel_engine(tmp_path):
    """With two engines the page lists both (pids as /health says), draws the one picked, and
    names the engine that a kill -9 took down and that came back."""
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the test extra installs playwright")
    if CHROMIUM is None:
        pytest.skip(reason="no chromium on PATH (Debian: apt-get install chromium)")
    shots = Path(os.environ.get("MINIVLLM_DASHBOARD_SHOTS", tmp_path))
    srv = ServeProcess(["--data-parallel-size", "2", "--dtype", "float32", "--num-blocks", "256"])
    pids = srv.process_tree()
    try:
        engines = srv.engine_pids()
        with sync_api.sync_playwright() as p:
            browser, page, errors, wait_for = _open(p, srv.url)
            wait_for("() => document.getElementById('status').textContent === 'connected'")

            def one(i: int) -> None:  # (playwright's sync API holds this thread's loop)
                httpx.post(srv.url + "/v1/completions", timeout=WAIT_S, json={
                    "prompt": f"Story {i}:", "max_tokens": 128,
                    "ignore_eos": True}).raise_for_status()
            with ThreadPoolExecutor(8) as pool:
                load = pool.map(one, range(8))
                wait_for("() => S.engines.length === 2 && S.engines.every((e) => e.last && "
                         "e.last.counters.generation_tokens > 0)")
                page.select_option("#engine-select", "1")
                wait_for("(pid) => document.getElementById('engine-pid').textContent == pid",
                         engines[1])
                page.wait_for_timeout(100)  # one animation frame draws what came
                assert page.evaluate("S.grid !== null && S.steps.length > 0")
                page.screenshot(path=str(shots / "dashboard_data_parallel.png"))
                list(load)
            rows = page.evaluate("[...document.querySelectorAll('#engines-table tbody tr')]"
                                 ".map((tr) => [...tr.cells].map((td) => td.textContent))")
            assert [int(r[2]) for r in rows] == engines and [r[1] for r in rows] == ["ready"] * 2

            os.kill(engines[1], signal.SIGKILL)
            new = wait_healthy(srv.url, timeout=WAIT_S, engine_pid=engines[1])
            assert new == engines[0]
            wait_for("() => document.getElementById('status').textContent"
                     ".includes('engine 1 restarted')")
            assert not errors
            browser.close()
    finally:
        pids = sorted(set(pids + srv.process_tree()))
        code = srv.stop()
    assert code == 0
    assert leftovers(pids) == {"processes": [], "shm": [], "sockets": []}
