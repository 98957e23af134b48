"""Caller image URLs the gateway must fetch itself (JSON-form edits for providers that need bytes).

`fetch_image` is the one path: fetch through the SSRF guard (`GuardedFetcher`), then probe the bytes
exactly like an upload (`probe_image`, which `api.parsing` uses for uploads and data URIs).

SSRF guard rules, for the first URL and again for every redirect hop (at most `MAX_REDIRECTS`, followed by hand):

- only `http` and `https`;
- the host is resolved (`loop.getaddrinfo`, async) and *every* address must be globally routable:
  loopback, private, link-local, CGNAT, multicast, reserved, unspecified and cloud-metadata
  addresses (169.254.169.254, fd00:ec2::254, 100.100.100.200, ...) are refused, including when they
  hide inside IPv6 (IPv4-mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4, Teredo);
- hosts in `fetch.allow_hosts` skip the address check (operators' own buckets, tests);
- the connection goes to the vetted address itself (the URL is rewritten to the IP; `Host` and
  TLS SNI/certificate checks keep the real name), so a second DNS answer cannot rebind it;
- the body is streamed with a `fetch.max_bytes` cap (413) and the whole fetch, redirects
  included, has a `fetch.timeout_seconds` deadline.

Every refusal is a 400 (`InvalidRequest`) naming the request parameter the URL came from
(`images` or `mask`, the JSON edit form's names).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from imagegate.core import imaging
from imagegate.core.errors import InvalidRequest, PayloadTooLarge
from imagegate.core.request import InputImage
from imagegate.settings import FetchSettings

__all__ = [
    "MAX_REDIRECTS",
    "GuardedFetcher",
    "ImageFetcher",
    "Resolver",
    "fetch_image",
    "is_public_address",
    "probe_image",
    "read_capped",
]

MAX_REDIRECTS = 3
Resolver = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, ... instance metadata
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud metadata
        "168.63.129.16",  # Azure wire server (a public-range address)
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class ImageFetcher(Protocol):
    """Fetches a caller's image URL through the SSRF guard (`GuardedFetcher`)."""

    async def fetch(self, url: str, *, param: str) -> bytes: ...


async def fetch_image(
    image: InputImage,
    fetcher: ImageFetcher,
    *,
    pool: imaging.ImagePool,
    max_pixels: int,
    param: str = "images",
) -> InputImage:
    """The bytes of a URL image (fetched through the SSRF guard, then probed like an upload).

    An image that already holds bytes is returned unchanged. The result holds bytes only
    (`url=None`), so later stages treat it as an uploaded image."""
    if image.data is not None:
        return image
    if image.url is None:
        raise ValueError("an InputImage needs data or url")
    data = await fetcher.fetch(image.url, param=param)
    name = urlsplit(image.url).path.rsplit("/", 1)[-1] or None
    label = f"'{param}' ({urlsplit(image.url).hostname or '?'})"
    return await probe_image(pool, data, label=label, param=param, filename=name, max_pixels=max_pixels)


async def probe_image(
    pool: imaging.ImagePool, data: bytes, *, label: str, param: str, filename: str | None, max_pixels: int
) -> InputImage:
    """`data` identified from its bytes (`imaging.probe(verify=True)` in the pool) as an InputImage.

    Empty, undecodable or over-`max_pixels` bytes are a 400 naming `label` (and `filename`)."""
    shown = f"{label} ({filename})" if filename and filename != "upload" else label
    if not data:
        raise InvalidRequest(f"Invalid image {shown}: the file is empty (0 bytes).", param=param, code="invalid_image")
    try:
        info = await pool.run(imaging.probe, data, max_pixels=max_pixels, verify=True)
    except imaging.TooManyPixels as exc:
        raise InvalidRequest(
            f"Invalid image {shown}: it has too many pixels ({_ADDRESS.sub('', exc.reason)}). "
            f"The limit is {max_pixels} pixels per image.",
            param=param,
            code="image_too_large",
        ) from None
    except imaging.ImageError as exc:
        raise InvalidRequest(
            f"Invalid image {shown}: {_ADDRESS.sub('', exc.reason)}. "
            "Supported formats: PNG, JPEG, WebP, GIF, AVIF, BMP.",
            param=param,
            code="invalid_image",
        ) from None
    return InputImage(data=data, format=info.format, width=info.width, height=info.height, filename=filename)


def is_public_address(address: str | IPAddress) -> bool:
    """True if `address` is a globally routable unicast address that is not a metadata endpoint."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ip.ipv4_mapped or ip
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None and not is_public_address(embedded):
            return False
    if ip in _METADATA:
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


async def _system_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class GuardedFetcher:
    """Fetches untrusted image URLs without letting them reach internal addresses.

    `resolver(host, port) -> [address, ...]` defaults to the system resolver (tests inject one).
    """

    def __init__(self, http: httpx.AsyncClient, settings: FetchSettings, *, resolver: Resolver | None = None) -> None:
        self._http = http
        self._settings = settings
        self._allow = {h.strip().lower().rstrip(".") for h in settings.allow_hosts if h.strip()}
        self._resolve = resolver or _system_resolver

    async def fetch(self, url: str, *, param: str) -> bytes:
        """The body of `url` (following at most MAX_REDIRECTS vetted redirects). Raises InvalidRequest
        (400) for a refused, unreachable or failing URL, PayloadTooLarge (413) above the size cap."""
        host = "?"
        try:
            async with asyncio.timeout(self._settings.timeout_seconds):
                current = self._parse(url, param)
                for _ in range(MAX_REDIRECTS + 1):
                    host = current.host
                    location = await self._get(current, param)
                    if isinstance(location, bytes):
                        return location
                    current = self._parse(str(current.join(location)), param)
        except TimeoutError:
            raise InvalidRequest(
                f"Timed out fetching the image from '{host}' after {self._settings.timeout_seconds:g} seconds.",
                param=param,
                code="image_fetch_failed",
            ) from None
        raise InvalidRequest(
            f"Too many redirects fetching the image (more than {MAX_REDIRECTS}).",
            param=param,
            code="image_fetch_failed",
        )

    def _parse(self, url: str, param: str) -> httpx.URL:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError):
            raise InvalidRequest("The image URL is not a valid URL.", param=param, code="invalid_url") from None
        if parsed.scheme not in ("http", "https"):
            raise InvalidRequest(
                f"The image URL scheme '{parsed.scheme}' is not allowed; use http or https.",
                param=param,
                code="invalid_url",
            )
        if not parsed.host:
            raise InvalidRequest("The image URL has no host.", param=param, code="invalid_url")
        return parsed

    async def _vetted_address(self, url: httpx.URL, param: str) -> str | None:
        """The address to connect to, or None for an allow-listed host (connect by name)."""
        host = url.host.lower().rstrip(".")
        if host in self._allow:
            return None
        refused = InvalidRequest(
            f"The image URL host '{url.host}' resolves to a private, loopback, link-local or otherwise "
            "non-public address; the gateway does not fetch from those.",
            param=param,
            code="url_not_allowed",
        )
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            if not is_public_address(literal):
                raise refused
            return str(literal)
        try:
            addresses = await self._resolve(url.raw_host.decode("ascii"), _port(url))
        except (OSError, UnicodeError):
            raise InvalidRequest(
                f"Could not resolve the image URL host '{url.host}'.", param=param, code="image_fetch_failed"
            ) from None
        try:
            vetted = [ipaddress.ip_address(a.split("%", 1)[0]) for a in addresses]  # drop an IPv6 zone id
        except ValueError:
            raise refused from None
        if not vetted or not all(is_public_address(a) for a in vetted):
            raise refused
        return str(vetted[0])

    async def vetted(self, url: str, *, param: str) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
        """Where to send a request for `url` (also for other requests than image GETs, e.g. webhooks):
        the target URL on a vetted public address, the Host header and the TLS extensions.
        InvalidRequest naming `param` for a refused URL."""
        return await self._target(self._parse(url, param), param)

    async def _target(self, url: httpx.URL, param: str) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
        address = await self._vetted_address(url, param)
        target = url
        headers: dict[str, str] = {}
        extensions: dict[str, str] = {}
        if address is not None:  # connect to the vetted address, keep the name for Host and TLS
            target = url.copy_with(host=address)
            headers["Host"] = url.netloc.decode("ascii")
            if url.scheme == "https":
                extensions["sni_hostname"] = url.host
        return target, headers, extensions

    async def _get(self, url: httpx.URL, param: str) -> bytes | str:
        """One hop: the body, or the Location of a redirect."""
        target, headers, extensions = await self._target(url, param)
        request = self._http.build_request(
            "GET",
            target,
            headers={**headers, "Accept": "image/*,*/*;q=0.5"},
            extensions=extensions,
            timeout=self._settings.timeout_seconds,
        )
        try:
            response = await self._http.send(request, stream=True, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise InvalidRequest(
                f"Could not fetch the image from '{url.host}' ({type(exc).__name__}).",
                param=param,
                code="image_fetch_failed",
            ) from None
        try:
            if response.status_code in _REDIRECTS:
                location: str | None = response.headers.get("location")
                if not location:
                    raise InvalidRequest(
                        f"'{url.host}' answered a redirect without a Location.", param=param, code="image_fetch_failed"
                    )
                return location
            if not response.is_success:
                raise InvalidRequest(
                    f"Could not fetch the image from '{url.host}': it answered HTTP {response.status_code}.",
                    param=param,
                    code="image_fetch_failed",
                )
            return await self._read_capped(response, url, param)
        finally:
            await response.aclose()

    async def _read_capped(self, response: httpx.Response, url: httpx.URL, param: str) -> bytes:
        cap = self._settings.max_bytes
        too_large = PayloadTooLarge(f"The image at '{url.host}' is larger than the limit of {cap} bytes.", param=param)
        try:
            return await read_capped(response, cap, too_large)
        except httpx.HTTPError as exc:
            raise InvalidRequest(
                f"Could not read the image from '{url.host}' ({type(exc).__name__}).",
                param=param,
                code="image_fetch_failed",
            ) from None


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


async def read_capped(response: httpx.Response, limit: int, too_large: Exception) -> bytes:
    """A streamed response's body, refusing more than `limit` bytes: the declared Content-Length
    is checked first, then the bytes are counted as they arrive (the rest is never read)."""
    declared = response.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
