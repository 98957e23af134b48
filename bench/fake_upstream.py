"""A lean fake fal for load tests, in a process of its own: the queue protocol (submit, status,
result, cancel), the sync run (`/sync/{model}`, what LiteLLM calls) and a CDN URL for the output.

    python bench/fake_upstream.py --port 0 --model-time 5 --image photo   # prints "READY <url>"

A job is COMPLETED `--model-time` seconds after its submit (a sync run answers after that long);
every status poll before that answers IN_PROGRESS. The output is one pre-rendered 1024x1024 PNG
(`photo`: a photo-like synthetic picture, `flat`: one colour), so serving it costs no CPU.
Plain ASGI, no framework: the fake must cost far less per request than what it measures.
`GET /__stats` reports requests by kind and the process's CPU seconds.

Protocol shapes follow tests/fakes/fal.py (and /work/shared/reference/fal-protocol.md).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KEY = "test-fal-key"
SIZE = 1024


def render(kind: str) -> bytes:
    from bench._common import photo_like
    from PIL import Image

    img = photo_like(SIZE, SIZE) if kind == "photo" else Image.new("RGB", (SIZE, SIZE), (46, 120, 190))
    out = io.BytesIO()
    img.save(out, "PNG", compress_level=1)
    return out.getvalue()


class FakeFal:
    def __init__(self, model_time: float, image: bytes) -> None:
        self.model_time = model_time
        self.image = image
        self.jobs: dict[str, float] = {}  # request id -> submitted at
        self.stats: Counter[str] = Counter()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, payload, ctype = await self.handle(scope, body)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def handle(self, scope: dict[str, Any], body: bytes) -> tuple[int, bytes, bytes]:
        path: str = scope["path"]
        method: str = scope["method"]
        if path.startswith("/cdn/"):
            self.stats["download"] += 1
            return 200, self.image, b"image/png"
        if path == "/__stats":
            cpu = os.times()
            return 200, _json({"requests": dict(self.stats), "cpu_seconds": cpu.user + cpu.system}), b"application/json"
        headers = dict(scope["headers"])
        if headers.get(b"authorization") != f"Key {KEY}".encode():
            return 401, _json({"detail": "No user found for Key ID and Secret"}), b"application/json"
        base = f"http://{headers.get(b'host', b'').decode()}"
        if method == "POST" and path.startswith("/sync/"):
            self.stats["sync"] += 1
            await asyncio.sleep(self.model_time)
            return 200, _json(self.output(base)), b"application/json"
        parts = path.strip("/").split("/")
        if method == "POST":  # submit: /{owner}/{app}[/{path}]
            self.stats["submit"] += 1
            rid = str(uuid.uuid4())
            self.jobs[rid] = time.monotonic()
            app = "/".join(parts[:2])
            return (
                200,
                _json({"status": "IN_QUEUE", "request_id": rid, "queue_position": 0, **_urls(base, app, rid)}),
                b"application/json",
            )
        # /{owner}/{app}/requests/{id}[/status|/cancel]
        if len(parts) < 4 or parts[2] != "requests" or parts[3] not in self.jobs:
            return 404, _json({"detail": "Request not found"}), b"application/json"
        app, rid, suffix = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        done = time.monotonic() - self.jobs[rid] >= self.model_time
        if suffix == "status":
            self.stats["status"] += 1
            state = "COMPLETED" if done else "IN_PROGRESS"
            return (
                (200 if done else 202),
                _json({"status": state, "request_id": rid, **_urls(base, app, rid), "logs": None}),
                b"application/json",
            )
        if suffix == "cancel":
            self.stats["cancel"] += 1
            return 200, _json({"status": "CANCELLATION_REQUESTED"}), b"application/json"
        self.stats["result"] += 1
        if not done:
            return 202, _json({"status": "IN_PROGRESS", "request_id": rid}), b"application/json"
        del self.jobs[rid]
        return 200, _json(self.output(base)), b"application/json"

    def output(self, base: str) -> dict[str, Any]:
        name = f"{uuid.uuid4().hex[:20]}.png"
        return {
            "images": [
                {
                    "url": f"{base}/cdn/{name}",
                    "width": SIZE,
                    "height": SIZE,
                    "content_type": "image/png",
                    "file_name": name,
                    "file_size": len(self.image),
                }
            ],
            "seed": 42,
            "has_nsfw_concepts": [False],
            "prompt": "",
            "timings": {"inference": self.model_time},
        }


def _urls(base: str, app: str, rid: str) -> dict[str, str]:
    root = f"{base}/{app}/requests/{rid}"
    return {"response_url": root, "status_url": f"{root}/status", "cancel_url": f"{root}/cancel"}


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model-time", type=float, default=0.0, help="seconds a job takes (default 0)")
    parser.add_argument("--image", choices=("photo", "flat"), default="photo")
    parser.add_argument("--lifetime", type=float, default=1800, help="exit after this many seconds at the latest")
    args = parser.parse_args(argv)

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    port = sock.getsockname()[1]
    app = FakeFal(args.model_time, render(args.image))
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", ws="none", timeout_keep_alive=75, backlog=16384
    )
    server = uvicorn.Server(config)

    async def run() -> None:
        asyncio.get_running_loop().call_later(args.lifetime, lambda: setattr(server, "should_exit", True))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        print(f"READY http://127.0.0.1:{port}", flush=True)
        await task

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
