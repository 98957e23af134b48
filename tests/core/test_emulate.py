"""Post-processing: untouched bytes when nothing is needed, URL passthrough, conversions."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from PIL import Image

from imagegate.core import emulate
from imagegate.core.emulate import OutputSpec, deliver_image, format_from_content_type
from imagegate.core.errors import UpstreamError
from imagegate.core.imaging import ImagePool
from imagegate.core.params import ParamTable
from imagegate.core.request import Operation
from imagegate.core.sizes import Size
from imagegate.providers import common
from imagegate.providers.base import CallContext, Provider, ProviderImage, ProviderResult, Route
from imagegate.settings import Settings
from imagegate.storage.base import Storage, StoredImage


def encoded(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(out, fmt)
    return out.getvalue()


class Downloads(Provider):
    name = "d"

    def __init__(self, data: bytes) -> None:
        super().__init__(httpx.AsyncClient(), Settings())
        self.data = data
        self.fetched = 0

    def check_configured(self) -> None: ...
    def models(self) -> Sequence[str]:
        return ()

    def table(self, model: str, operation: Operation) -> ParamTable:
        raise KeyError(model)

    async def prepare_images(self, images: Any, route: Route, *, dry_run: bool = False) -> list[str]:
        return []

    async def run(self, payload: dict[str, Any], route: Route, ctx: CallContext) -> ProviderResult:
        raise NotImplementedError

    async def fetch(self, image: ProviderImage) -> bytes:
        self.fetched += 1
        return self.data


class Memory(Storage):
    def __init__(self) -> None:
        self.stored: list[bytes] = []

    async def put(self, data: bytes, *, content_type: str, extension: str, ttl_seconds: int) -> str:
        self.stored.append(data)
        return f"id.{extension}"

    async def get(self, image_id: str) -> StoredImage | None:
        return None


def spec(**overrides: Any) -> OutputSpec:
    base: dict[str, Any] = dict(format="png", size=None, compression=None, background=None, response_format="b64_json",
                                url_mode="rehost", max_pixels=10_000_000, ttl_seconds=60,
                                public_base_url="http://gw")
    base.update(overrides)
    return OutputSpec(**base)


@pytest.fixture
def pool() -> ImagePool:
    return ImagePool(1)


async def test_matching_bytes_go_out_untouched(pool: ImagePool) -> None:
    original = encoded("PNG")
    provider = Downloads(original)
    out = await deliver_image(ProviderImage(url="https://cdn/x.png"), spec(size=Size(64, 48)), provider=provider,
                              storage=Memory(), pool=pool)
    assert base64.b64decode(out.image.b64_json or "") == original  # byte for byte: no re-encode
    assert provider.fetched == 1


async def test_passthrough_url_when_nothing_to_do(pool: ImagePool) -> None:
    provider = Downloads(b"")
    image = ProviderImage(url="https://cdn/x.png", content_type="image/png", width=64, height=48)
    out = await deliver_image(image, spec(response_format="url", url_mode="passthrough", size=Size(64, 48)),
                              provider=provider, storage=Memory(), pool=pool)
    assert out.image.url == "https://cdn/x.png" and provider.fetched == 0


@pytest.mark.parametrize(
    "overrides",
    [{"format": "webp"}, {"size": Size(32, 32)}, {"compression": 50, "format": "jpeg"}],
    ids=["format", "size", "compression"],
)
async def test_passthrough_falls_back_to_rehost_when_work_is_needed(pool: ImagePool, overrides: dict[str, Any]) -> None:
    provider = Downloads(encoded("JPEG" if overrides.get("format") == "jpeg" else "PNG"))
    storage = Memory()
    image = ProviderImage(url="https://cdn/x.png" if "format" not in overrides or overrides["format"] != "jpeg"
                          else "https://cdn/x.jpg", width=64, height=48)
    out = await deliver_image(image, spec(response_format="url", url_mode="passthrough", **overrides),
                              provider=provider, storage=storage, pool=pool)
    assert out.image.url and out.image.url.startswith("http://gw/v1/files/images/")
    stored = Image.open(io.BytesIO(storage.stored[0]))
    assert stored.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[overrides.get("format", "png")]
    if "size" in overrides:
        assert stored.size == (32, 32)


def test_format_from_content_type_and_extension() -> None:
    assert format_from_content_type(ProviderImage(url="https://x/a.JPG?sig=1")) == "jpeg"
    assert format_from_content_type(ProviderImage(content_type="image/webp; q=1")) == "webp"
    assert format_from_content_type(ProviderImage(url="data:image/png;base64,AA")) is None


# -- data: URL outputs (decoded in the pool) -------------------------------------------------------


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
def decode_threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The threads `decode_data_uri` ran in, as seen by `_finish`."""
    threads: list[int] = []

    def recording(uri: str) -> tuple[bytes, str]:
        threads.append(threading.get_ident())
        return common.decode_data_uri(uri)

    monkeypatch.setattr(emulate, "decode_data_uri", recording)
    return threads


async def test_data_url_output_is_decoded_in_the_pool_and_converted(pool: ImagePool, decode_threads: list[int]) -> None:
    provider = Downloads(b"")
    image = ProviderImage(url=data_url(encoded("PNG")), content_type="image/png", width=64, height=48)
    out = await deliver_image(image, spec(format="webp", size=Size(32, 24)), provider=provider, storage=Memory(),
                              pool=pool)
    delivered = Image.open(io.BytesIO(base64.b64decode(out.image.b64_json or "")))
    assert (delivered.format, delivered.size) == ("WEBP", (32, 24))
    assert (out.width, out.height, out.format) == (32, 24, "webp")
    assert provider.fetched == 0  # never downloaded
    assert decode_threads and threading.get_ident() not in decode_threads  # not on the event loop's thread


async def test_data_url_output_untouched_when_nothing_to_do(pool: ImagePool, decode_threads: list[int]) -> None:
    original = encoded("PNG")
    out = await deliver_image(ProviderImage(url=data_url(original)), spec(size=Size(64, 48)), provider=Downloads(b""),
                              storage=Memory(), pool=pool)
    assert base64.b64decode(out.image.b64_json or "") == original
    assert len(decode_threads) == 1


async def test_data_url_output_is_never_passed_through(pool: ImagePool) -> None:
    original = encoded("PNG")
    storage = Memory()
    image = ProviderImage(url=data_url(original), content_type="image/png", width=64, height=48)
    out = await deliver_image(image, spec(response_format="url", url_mode="passthrough", size=Size(64, 48)),
                              provider=Downloads(b""), storage=storage, pool=pool)
    assert out.image.url == "http://gw/v1/files/images/id.png"  # rehosted, byte for byte
    assert storage.stored == [original]


@pytest.mark.parametrize(
    "url",
    ["data:image/png;base64,!!!not-base64", "data:image/png,rawbytes", "data:image/png;base64", "DATA:image/png;x,AA"],
)
async def test_malformed_data_url_output_is_upstream_error(pool: ImagePool, url: str) -> None:
    provider = Downloads(encoded("PNG"))
    with pytest.raises(UpstreamError) as err:
        await deliver_image(ProviderImage(url=url), spec(), provider=provider, storage=Memory(), pool=pool)
    assert err.value.status == 502 and "data URI" in err.value.message
    assert provider.fetched == 0


async def test_data_url_output_that_is_no_image_is_upstream_error(pool: ImagePool) -> None:
    with pytest.raises(UpstreamError, match="cannot read"):
        await deliver_image(ProviderImage(url=data_url(b"not an image")), spec(), provider=Downloads(b""),
                            storage=Memory(), pool=pool)


async def test_data_url_outputs_are_capped(pool: ImagePool) -> None:
    provider = Downloads(b"")
    provider.settings = Settings(fetch={"max_bytes": 100})
    uri = "data:image/png;base64," + base64.b64encode(encoded("PNG", (64, 64)) + b"\0" * 200).decode()
    with pytest.raises(UpstreamError, match="larger than the limit"):
        await deliver_image(ProviderImage(url=uri), spec(), provider=provider, storage=Memory(), pool=pool)
