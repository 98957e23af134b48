"""The plain path's response (`upstream_plain.UpstreamClient`): `_PlainResponse` is an
`httpx.Response` in the state httpx's `read()` leaves one, with what callers seldom read of it
(`headers`, `extensions`, `stream`, `request`, `elapsed`) built on first use from what the call
sent (`_Sent`) and what the upstream answered (`upstream_wire.WireResponse`); `response_header`
reads one header of any response without building those `headers`.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from itertools import chain
from typing import Any, NamedTuple

import httpx

from imagegate.upstream_http import decode_slices, response_extensions
from imagegate.upstream_wire import MAX_BODY, WireResponse

__all__ = ["decoded", "response_header"]


class _Sent(NamedTuple):
    """What a plain call sent: enough to build its `httpx.Request` when one is asked for."""

    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes | None
    timeout: httpx.Timeout

    def request(self) -> httpx.Request:
        """The `httpx.Request` httpx would have built for this call."""
        # `content`: read, as httpx's own request is (the headers already say all it would add)
        return httpx.Request(
            self.method, self.url, headers=self.headers, content=self.body or b"",
            extensions={"timeout": self.timeout.as_dict()},
        )


class _Slices(httpx.SyncByteStream):
    """A body in hand, in `decode_slices`: what one step of httpx's decoder gets."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def __iter__(self) -> Iterator[bytes]:
        return decode_slices(self.raw)


def decoded(response: httpx.Response) -> bytes:
    """The body of an encoded response as httpx's `read()` decodes it, at most MAX_BODY bytes of it:
    a body that decodes to more (a compression bomb) is an `httpx.DecodingError`, with no more than
    one slice's expansion held beyond the bound."""
    parts, size = [], 0
    for part in response.iter_bytes():
        size += len(part)
        if size > MAX_BODY:
            response.close()
            raise httpx.DecodingError(f"response body decodes to more than {MAX_BODY} bytes", request=response.request)
        parts.append(part)
    return b"".join(parts)


class _PlainResponse(httpx.Response):
    """A response of the plain path, in the state httpx's `read()` leaves one. What callers seldom
    read is built on first use: `headers`, `extensions`, `stream`, `request`, `elapsed`."""

    _sent: _Sent
    _raw_headers: list[tuple[bytes, bytes]]
    _reason: str | None
    _seconds: float

    @classmethod
    def read_from(
        cls, answer: WireResponse, raw: bytes, sent: _Sent, default_encoding: Any, seconds: float
    ) -> httpx.Response:
        """The response to `sent`: `answer`'s status and headers, `raw` its body as read."""
        if answer.header(b"content-encoding") is not None:  # httpx decodes the body, as on its own path
            encoded = cls(
                answer.status, headers=answer.raw_headers, stream=_Slices(raw), request=sent.request(),
                extensions=response_extensions(answer.reason), default_encoding=default_encoding,
            )
            encoded._content = decoded(encoded)  # a decoding error names its request, as httpx's does
            encoded.elapsed = datetime.timedelta(seconds=seconds)
            return encoded
        # What httpx.Response(...) and then read() set, without running the identity decoder.
        response = cls.__new__(cls)
        response.status_code = answer.status
        response.next_request = None
        response.history = []
        response.is_closed = True
        response.is_stream_consumed = True
        response.default_encoding = default_encoding
        response._num_bytes_downloaded = len(raw)
        response._content = raw
        response._sent = sent
        response._raw_headers = answer.raw_headers
        response._reason = answer.reason
        response._seconds = seconds
        return response

    def __getattr__(self, name: str) -> Any:
        """The attributes httpx sets in `Response.__init__` and `read()` that `read_from` leaves
        to first use (only then is this called)."""
        if "_sent" not in self.__dict__:  # built by httpx.Response(...): nothing left to build
            raise AttributeError(name)
        value: Any
        if name == "headers":
            raw = self._raw_headers
            value = httpx.Headers.__new__(httpx.Headers)  # as httpx.Headers(raw pairs), without re-checking bytes
            value._list = [(key, key.lower(), item) for key, item in raw]
            # the encoding httpx settles on when all of it is ASCII (else it works it out on first use)
            value._encoding = "ascii" if b"".join(chain.from_iterable(raw)).isascii() else None
        elif name == "extensions":
            value = response_extensions(self._reason)
        elif name == "stream":
            value = httpx.ByteStream(self._content)
        elif name == "_request":
            value = self._sent.request()
        elif name == "_elapsed":
            value = datetime.timedelta(seconds=self._seconds)
        else:
            raise AttributeError(name)
        setattr(self, name, value)
        return value


def response_header(response: httpx.Response, name: str) -> str | None:
    """`response.headers.get(name)` for a lower-case `name`, without building the `headers` of a
    plain-path response that has not built them (a lookup per call reads one header, e.g. fal's
    `x-fal-request-id`). The same value: found values that are all ASCII decode alike in every
    encoding httpx may pick; any other goes through `headers`."""
    state = response.__dict__
    raw = state.get("_raw_headers")
    if raw is None or "headers" in state:
        found: str | None = response.headers.get(name)
        return found
    key = name.encode("ascii")
    values = [value for header, value in raw if header.lower() == key]
    if not values:
        return None
    joined = b", ".join(values)
    return joined.decode("ascii") if joined.isascii() else response.headers.get(name)
