"""obstore (imagegate's S3 client) against aiobotocore, on the same local S3 server (moto), in one run.

    .venv/bin/pip install aiobotocore   # only for this comparison; imagegate does not need it
    .venv/bin/python bench/s3_clients.py [-n 60] [--size 300000] [--rounds 2]

For each round and client: N puts then N gets of one random object of --size bytes (an output
image), sequential, timed per operation; the report gives the median ms per put and per get for
each client and obstore's time as a ratio of aiobotocore's (the baseline) from the same run.
The server (moto in a thread) dominates both, so the ratio understates the client difference.
Bounded: N operations per phase, and the whole run stops after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fakes.s3 import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, LocalS3

Op = Callable[[int], Awaitable[None]]


async def timed(op: Op, n: int, stop_at: float) -> list[float]:
    times = []
    for i in range(n):
        if time.monotonic() > stop_at:
            break
        started = time.perf_counter()
        await op(i)
        times.append((time.perf_counter() - started) * 1000)
    return times


async def obstore_ops(url: str, bucket: str, data: bytes) -> tuple[Op, Op]:
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        bucket, endpoint=url, region=REGION, access_key_id=ACCESS_KEY_ID, secret_access_key=SECRET_ACCESS_KEY,
        client_options={"allow_http": True},
    )

    async def put(i: int) -> None:
        await obstore.put_async(store, f"o/{i}", data, attributes={"Content-Type": "image/png"})

    async def get(i: int) -> None:
        result = await obstore.get_async(store, f"o/{i}")
        assert len(bytes(await result.bytes_async())) == len(data)

    return put, get


async def run(args: argparse.Namespace) -> None:
    try:
        from aiobotocore.session import get_session
    except ImportError:
        sys.exit("pip install aiobotocore to run this comparison")
    data = os.urandom(args.size)
    stop_at = time.monotonic() + args.max_seconds
    results: dict[str, dict[str, list[float]]] = {name: {"put": [], "get": []} for name in ("obstore", "aiobotocore")}
    with LocalS3() as s3:
        bucket = s3.create_bucket()
        async with get_session().create_client(
            "s3", endpoint_url=s3.url, region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY,
        ) as client:

            async def boto_put(i: int) -> None:
                await client.put_object(Bucket=bucket, Key=f"b/{i}", Body=data, ContentType="image/png")

            async def boto_get(i: int) -> None:
                response = await client.get_object(Bucket=bucket, Key=f"b/{i}")
                async with response["Body"] as body:
                    assert len(await body.read()) == len(data)

            ob_put, ob_get = await obstore_ops(s3.url, bucket, data)
            clients = {"obstore": (ob_put, ob_get), "aiobotocore": (boto_put, boto_get)}
            for _ in range(args.rounds):
                for name, (put, get) in clients.items():
                    results[name]["put"] += await timed(put, args.n, stop_at)
                    results[name]["get"] += await timed(get, args.n, stop_at)
    for name, phases in results.items():
        put, get = (statistics.median(phases[p]) for p in ("put", "get"))
        print(f"{name:12s} put {put:6.2f} ms  get {get:6.2f} ms  (n={len(phases['put'])}+{len(phases['get'])})")
    for phase in ("put", "get"):
        ratio = statistics.median(results["obstore"][phase]) / statistics.median(results["aiobotocore"][phase])
        print(f"obstore/aiobotocore {phase}: {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=60)
    parser.add_argument("--size", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=60)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
