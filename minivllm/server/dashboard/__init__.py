"""The live dashboard: `GET /dashboard`, one static page and its script shipped in the package
(no build step, nothing from a CDN), and `GET /dashboard/events`, the server-sent events of
hub.py. With --api-key the events need the key: the page asks for it and sends it in the
Authorization header of a fetch-read stream (an EventSource cannot send headers), never in a
URL; the page itself holds nothing secret. --no-dashboard leaves the routes out (404).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from minivllm.server.dashboard.hub import EventHub
from minivllm.server.protocol import APIError

if TYPE_CHECKING:  # app.py imports this module
    from minivllm.server.app import ServerState

STATIC = Path(__file__).parent / "static"
# The page may load only its own script and style, and talk only to this server.
POLICY = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"


def _static(name: str, media_type: str) -> Response:
    return Response((STATIC / name).read_bytes(), media_type=media_type,
                    headers={"Content-Security-Policy": POLICY, "Cache-Control": "no-cache"})


def add_dashboard(app: FastAPI, state: ServerState) -> None:
    hub = EventHub(state)

    @app.get("/dashboard")
    async def dashboard_page():
        return _static("index.html", "text/html; charset=utf-8")

    @app.get("/dashboard/dashboard.js")
    async def dashboard_script():
        return _static("dashboard.js", "text/javascript; charset=utf-8")

    @app.get("/dashboard/events")
    async def dashboard_events(request: Request):
        state.check_key(request)
        if state.client is None or state.draining:
            raise APIError(503, "the server is starting or shutting down",
                           type_="service_unavailable")
        return StreamingResponse(hub.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
