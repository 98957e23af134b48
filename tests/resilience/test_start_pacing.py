"""New requests start at most `server.starts_per_tick` per event-loop iteration (server/pacing.py):
the rest wait in arrival order and lose nothing; health checks never wait."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.integration.gateway_process import GatewayProcess, write_config

from imagegate.server.pacing import StartPacer


async def _next_iteration() -> None:
    await asyncio.sleep(0)  # the pacer's tick was scheduled before this task's wake-up


async def test_starts_per_iteration_are_bounded_and_fifo() -> None:
    pacer = StartPacer(asyncio.get_running_loop(), per_tick=2)
    resumed: list[int] = []

    def resume(n: int, alive: bool = True) -> bool:
        if alive:
            resumed.append(n)
        return alive

    assert pacer.try_start() and pacer.try_start()
    assert not pacer.try_start()  # the third of this iteration waits
    for n in range(5):
        pacer.defer(lambda n=n: resume(n, alive=n != 1))  # request 1's connection closes while waiting
    assert not pacer.try_start()  # nobody jumps the queue
    await _next_iteration()
    assert resumed == [0, 2]  # 1 was gone: it took no start
    await _next_iteration()
    assert resumed == [0, 2, 3, 4]
    await _next_iteration()
    assert pacer.try_start() and not pacer.waiting


async def test_long_iterations_start_fewer_until_they_are_short_again() -> None:
    """An iteration that overran the budget (the loop is saturated by work in flight) lets fewer
    requests start in the next one; short iterations bring the full rate back."""
    pacer = StartPacer(asyncio.get_running_loop(), per_tick=8, budget=0.05)
    resumed: list[int] = []
    for n in range(200):
        pacer.defer(lambda n=n: resumed.append(n) is None)
    await _next_iteration()
    assert len(resumed) == 8  # no iteration measured yet: the full rate
    time.sleep(0.2)  # this iteration's other work takes 4x the budget
    await _next_iteration()
    assert 1 <= len(resumed) - 8 <= 2  # 8 * 0.05 / 0.2
    counts = []
    for _ in range(8):
        before = len(resumed)
        await _next_iteration()
        counts.append(len(resumed) - before)
    assert counts[-1] == 8 and counts == sorted(counts)  # grows back (at most doubling) to the cap
    assert resumed == list(range(len(resumed)))  # still in arrival order


async def _exchange(port: int, requests: list[bytes]) -> list[int]:
    """Statuses of `requests` sent one after another on one keep-alive connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses = []
    try:
        for request in requests:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.lower().split(b"\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in lines if line.startswith(b"content-length"))
            await reader.readexactly(length)
            statuses.append(int(head.split(b" ", 2)[1]))
    finally:
        writer.close()
    return statuses


async def test_a_burst_paced_one_start_per_iteration_loses_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path / "imagegate.yaml", log_level="warning", server={"starts_per_tick": 1})
    models = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"
    health = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
    with GatewayProcess(tmp_path, config) as gateway:
        async with asyncio.timeout(20):
            results = await asyncio.gather(
                *(_exchange(gateway.port, [models, models, health]) for _ in range(300)),
                *(_exchange(gateway.port, [health]) for _ in range(20)),
            )
    assert all(statuses == [200, 200, 200] for statuses in results[:300])
    assert all(statuses == [200] for statuses in results[300:])
