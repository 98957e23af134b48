"""The Redis job engine when Redis does not answer: job routes are a clean 503 `state_unavailable`
(never a 500 or a hang), and the job workers keep running through it."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
from tests.conftest import gateway_settings

from imagegate.app import create_app
from imagegate.jobs.redis_store import RedisJobStore


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_job_routes_answer_503_while_redis_is_down(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    app = create_app(gateway_settings(tmp_path, redis={"url": url, "timeout_seconds": 0.5},
                                      jobs={"workers": 2, "poll_seconds": 0.05}))
    assert isinstance(app.state.jobs.store, RedisJobStore)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=10) as client:
            started = time.monotonic()
            for method, path in (("GET", "/v1/images/jobs/imgjob_0123"), ("GET", "/v1/images/jobs"),
                                 ("POST", "/v1/images/jobs/imgjob_0123/cancel")):
                response = await client.request(method, path)
                assert response.status_code == 503, response.text
                error = response.json()["error"]
                assert error["code"] == "state_unavailable" and error["type"] == "server_error"
                assert response.headers["retry-after"] == "1"
            body = {"model": "sandbox-image", "prompt": "p"}  # a model this gateway could serve
            submit = await client.post("/v1/images/generations", json=body, headers={"prefer": "respond-async"})
            assert submit.status_code == 503 and submit.json()["error"]["code"] == "state_unavailable"
            assert time.monotonic() - started < 8
        assert all(not task.done() for task in app.state.jobs.runner._tasks)  # the workers survive the outage
