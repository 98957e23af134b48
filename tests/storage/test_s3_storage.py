"""S3Storage against a real S3-compatible server (moto's server mode) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from tests.fakes.images import png_bytes
from tests.fakes.s3 import LocalS3

from imagegate.settings import StorageSettings
from imagegate.storage import s3 as s3_module
from imagegate.storage.s3 import EXPIRES_META, S3Storage


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3]:
    with LocalS3() as server:
        yield server


def storage_for(s3: LocalS3, clock: list[float] | None = None, **options: object) -> tuple[S3Storage, str]:
    bucket = s3.create_bucket()
    settings = StorageSettings.model_validate(s3.storage_settings(bucket, **options))
    if clock is None:
        return S3Storage(settings), bucket
    return S3Storage(settings, clock=lambda: clock[0]), bucket


async def test_put_get_round_trip_keeps_bytes_type_and_expiry(s3: LocalS3) -> None:
    storage, bucket = storage_for(s3, url_style="gateway")
    data = png_bytes(32, 16)
    image_id = await storage.put(data, content_type="image/png", extension="png", ttl_seconds=600)
    assert image_id.endswith(".png") and len(image_id) == 36
    stored = await storage.get(image_id)
    assert stored is not None
    assert stored.data == data and stored.content_type == "image/png"
    assert 595 <= stored.expires_at - time.time() <= 600
    head = s3.client().head_object(Bucket=bucket, Key=f"outputs/{image_id}")
    assert head["ContentType"] == "image/png"
    assert float(head["Metadata"][EXPIRES_META]) == pytest.approx(stored.expires_at, abs=0.01)
    assert await storage.url_for(image_id, ttl_seconds=600) is None  # gateway style: served by the gateway


async def test_expired_objects_are_not_served_and_are_deleted(s3: LocalS3) -> None:
    now = [1_000_000.0]
    storage, bucket = storage_for(s3, clock=now, url_style="gateway")
    image_id = await storage.put(b"bytes", content_type="image/webp", extension="webp", ttl_seconds=60)
    now[0] += 59
    assert (await storage.get(image_id)) is not None
    now[0] += 1
    assert await storage.get(image_id) is None
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix="outputs/")
    assert listed.get("KeyCount", 0) == 0


@pytest.mark.parametrize("image_id", ["", "../x.png", "a" * 32 + ".PNG", "a" * 31 + ".png", "a" * 32 + "/.png"])
async def test_malformed_and_unknown_ids_are_none(s3: LocalS3, image_id: str) -> None:
    storage, _ = storage_for(s3)
    assert await storage.get(image_id) is None
    assert await storage.get("A" * 32 + ".png") is None


async def test_put_rejects_bad_extension_and_ttl(s3: LocalS3) -> None:
    storage, _ = storage_for(s3)
    with pytest.raises(ValueError):
        await storage.put(b"x", content_type="image/png", extension="p/ng", ttl_seconds=60)
    with pytest.raises(ValueError):
        await storage.put(b"x", content_type="image/png", extension="png", ttl_seconds=0)


async def test_presigned_url_downloads_the_object_and_carries_its_lifetime(s3: LocalS3) -> None:
    storage, bucket = storage_for(s3, url_style="presigned")
    data = png_bytes(8, 8)
    image_id = await storage.put(data, content_type="image/png", extension="png", ttl_seconds=900)
    url = await storage.url_for(image_id, ttl_seconds=900)
    assert url is not None and url.startswith(f"{s3.url}/{bucket}/outputs/{image_id}?")
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["900"] and "X-Amz-Signature" in query
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
        assert response.status_code == 200
        assert response.content == data and response.headers["content-type"] == "image/png"


async def test_presigned_url_lifetime_is_the_ttl_signed_now(s3: LocalS3) -> None:
    """S3 refuses a presigned URL after X-Amz-Date + X-Amz-Expires (moto does not enforce it,
    so the signed values are checked here)."""
    storage, _ = storage_for(s3, url_style="presigned")
    image_id = await storage.put(b"x", content_type="image/png", extension="png", ttl_seconds=5)
    url = await storage.url_for(image_id, ttl_seconds=5)
    assert url is not None
    query = parse_qs(urlsplit(url).query)
    signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert abs(signed_at.timestamp() - time.time()) < 5
    assert query["X-Amz-Expires"] == ["5"]


async def test_public_endpoint_url_signs_for_the_public_host(s3: LocalS3) -> None:
    storage, bucket = storage_for(s3, public_endpoint_url="https://images.example.com")
    url = await storage.url_for("A" * 32 + ".png", ttl_seconds=60)
    assert url is not None and url.startswith(f"https://images.example.com/{bucket}/outputs/")


async def test_ready_on_a_bucket_and_not_without_one() -> None:
    with LocalS3() as s3:
        bucket = s3.create_bucket()
        settings = StorageSettings.model_validate(s3.storage_settings(bucket))
        storage = S3Storage(settings, ready_cache_seconds=0)
        assert await storage.ready() is True
        missing = S3Storage(StorageSettings.model_validate(s3.storage_settings("no-such-bucket-here")))
        with pytest.raises(Exception):  # noqa: B017 - obstore's error for a missing bucket
            await missing.ready()
        s3.stop()
        started = time.monotonic()
        with pytest.raises(Exception):  # noqa: B017 - connection refused
            await storage.ready()
        assert time.monotonic() - started < 6


def test_settings_require_a_bucket_and_a_presignable_ttl() -> None:
    with pytest.raises(ValueError, match="bucket"):
        StorageSettings.model_validate({"backend": "s3"})
    with pytest.raises(ValueError, match="7 days"):
        StorageSettings.model_validate({"backend": "s3", "ttl_seconds": 700_000, "s3": {"bucket": "b"}})
    gateway = StorageSettings.model_validate(
        {"backend": "s3", "ttl_seconds": 700_000, "s3": {"bucket": "b", "url_style": "gateway", "endpoint_url": ""}}
    )
    assert gateway.s3.endpoint_url is None


async def test_ready_probes_are_single_flight_and_cached(s3: LocalS3, monkeypatch: pytest.MonkeyPatch) -> None:
    storage, bucket = storage_for(s3)
    probes: list[str] = []
    original = s3_module.obstore.put_async

    async def counting(*args: object, **kwargs: object) -> object:
        probes.append(str(args[1]))
        return await original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(s3_module.obstore, "put_async", counting)
    results = await asyncio.gather(*(storage.ready() for _ in range(20)))
    assert all(results) and probes == ["outputs/.imagegate-ready"]  # 20 callers, one S3 write
    await asyncio.sleep(1.05)
    assert await storage.ready() and len(probes) == 2  # the success stood for a second
    assert s3.client().head_object(Bucket=bucket, Key="outputs/.imagegate-ready")["ContentLength"] == 0


def test_unusable_credentials_fail_when_built() -> None:
    settings = StorageSettings.model_validate({"backend": "s3", "s3": {"bucket": "b", "secret_access_key": "x" * 20}})
    with pytest.raises(ValueError, match=r"storage\.s3 is not usable: .*AccessKeyId") as info:
        S3Storage(settings)
    assert "x" * 20 not in str(info.value)
