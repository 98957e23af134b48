"""A burst of slow requests against a real `imagegate serve` process: every connection is answered,
none is reset.

At 10,000 concurrent 5-s requests the gateway lost 2-7 % of them to `ConnectionResetError`: uvicorn
listened with an accept queue of 2048 (4096 in the benchmark), the event loop, busy starting
thousands of requests, accepted only between callbacks, the kernel's queue overflowed and
connections left out of it past the SYN-ACK retries were reset before the gateway saw them
(`TcpExtListenOverflows`). `imagegate serve` now listens with the kernel's maximum queue on
enough SO_REUSEPORT sockets to hold its connection cap (`imagegate.server.listen`), and a
connection beyond its own caps is answered `503 server_busy`, not reset.

The fake fal (tests.fakes.lean_fal, 1-s jobs) and the raw-socket clients share this test's event
loop; every connection is opened at once, unpaced. Bounded: the whole burst has BURST_SECONDS.
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from tests.fakes.lean_fal import LeanFal
from tests.integration.gateway_process import GatewayProcess, write_config

from imagegate.server.listen import somaxconn

K = 2200  # more than uvicorn's default accept queue (2048)
MODEL_SECONDS = 1.0
BURST_SECONDS = 25.0
BODY = json.dumps({"model": "qwen-image", "prompt": "a lighthouse at dusk", "response_format": "url"}).encode()
REQUEST = (
    b"POST /v1/images/generations HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < need:
        pytest.skip(f"needs {need} open files (hard limit {hard})")


async def _one(port: int) -> tuple[int, bytes] | str:
    """(status, body) of one POST on its own connection, or what went wrong instead."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return f"connect: {type(exc).__name__}"
    try:
        writer.write(REQUEST)
        response = await reader.read()  # `connection: close`: until the server closes
    except ConnectionResetError:
        return "reset"
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        return f"no response ({len(response)} bytes)"
    return int(head.split(b" ", 2)[1]), head.lower() + b"\r\n\r\n" + body


def _gateway(tmp_path: Path, fal_url: str, **server: object) -> GatewayProcess:
    fal = {"key": "test-fal-key", "queue_url": fal_url, "run_url": fal_url, "rest_url": fal_url, "mode": "queue"}
    config = write_config(
        tmp_path / "imagegate.yaml",
        log_level="warning",
        delivery={"url_mode": "passthrough"},
        providers={"fal": fal},
        server=server,
    )
    return GatewayProcess(tmp_path, config)


async def _burst(port: int, k: int) -> list[tuple[int, bytes] | str]:
    async with asyncio.timeout(BURST_SECONDS):
        return await asyncio.gather(*(_one(port) for _ in range(k)))


def _listen_queues(port: int) -> list[int]:
    """The accept-queue size of every socket listening on `port` (`ss`: Send-Q of a LISTEN socket)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[2]) for line in out.splitlines() if line.strip()]


async def test_a_burst_beyond_the_old_accept_queue_all_succeeds(tmp_path: Path) -> None:
    _raise_nofile(3 * K + 256)
    fake = LeanFal(key="test-fal-key", model_seconds=MODEL_SECONDS)
    fal_url = await fake.start()
    try:
        with _gateway(tmp_path, fal_url) as gateway:
            if shutil.which("ss"):
                queues = _listen_queues(gateway.port)
                assert queues and all(q == somaxconn() for q in queues), queues
            started = time.monotonic()
            outcomes = await _burst(gateway.port, K)
            took = time.monotonic() - started
            log = gateway.output()
    finally:
        await fake.close()
    failures = [o for o in outcomes if isinstance(o, str) or o[0] != 200]
    assert not failures, (len(failures), sorted({str(f)[:300] for f in failures})[:5], log[-2000:])
    assert all(fal_url.encode() in body for _, body in outcomes)  # type: ignore[misc]
    assert (fake.stats.submits, fake.stats.cancels) == (K, 0)
    assert took < BURST_SECONDS


async def test_beyond_the_connection_cap_is_a_503_never_a_reset(tmp_path: Path) -> None:
    cap, reserve = 150, 40
    k = cap + 2 * reserve  # the cap, its health reserve, and as many again refused
    fake = LeanFal(key="test-fal-key", model_seconds=MODEL_SECONDS)
    fal_url = await fake.start()
    try:
        with _gateway(tmp_path, fal_url, max_connections=cap, reserved_connections=reserve) as gateway:
            outcomes = await _burst(gateway.port, k)
    finally:
        await fake.close()
    statuses = [o[0] if not isinstance(o, str) else o for o in outcomes]
    assert all(s in (200, 503) for s in statuses), sorted({str(s) for s in statuses})
    assert statuses.count(200) >= cap // 2  # some of the cap was busy with the clients' own connects
    for outcome in outcomes:
        if not isinstance(outcome, str) and outcome[0] == 503:
            assert b"retry-after: 1" in outcome[1] and b'"code": "server_busy"' in outcome[1]
