"""The key ring: digests only, constant-time lookup, the headers a key may come in."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from imagegate.auth import keys as keys_module
from imagegate.auth.keys import KeyLimits, KeyRing, ModelNotAllowed
from imagegate.auth.middleware import presented_keys
from imagegate.settings import AuthSettings


def ring() -> KeyRing:
    return KeyRing.from_settings(
        AuthSettings.model_validate(
            {
                "keys": [
                    {"name": "a", "key": "secret-a", "models": ["m1"], "rpm": 5, "admin": True},
                    {"name": "b", "key_sha256": hashlib.sha256(b"secret-b").hexdigest().upper()},
                    {"name": "c", "key": "secret-c", "webhook_url": "https://hooks.example/x"},
                ]
            }
        )
    )


def test_lookup_by_key_or_digest() -> None:
    keys = ring()
    a = keys.authenticate(["secret-a"])
    assert a is not None and a.name == "a" and a.admin and a.limits == KeyLimits(rpm=5)
    b = keys.authenticate(["secret-b"])
    assert b is not None and b.name == "b" and b.models is None and not b.limits
    assert keys.authenticate(["wrong", "secret-c"]) == keys.authenticate(["secret-c"])
    assert keys.authenticate(["secret-"]) is None and keys.authenticate([]) is None
    assert not keys.open and KeyRing.from_settings(AuthSettings()).open
    c = keys.authenticate(["secret-c"])
    assert c is not None and c.webhook_url == "https://hooks.example/x"


def test_every_key_is_compared_whatever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(x: bytes, y: bytes) -> bool:
        calls.append(1)
        return real(x, y)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", counting)
    keys = ring()
    assert keys.authenticate(["secret-a"]) is not None  # the first key matches ...
    assert len(calls) == 3  # ... and the other two are still compared


def test_allow_list() -> None:
    a = ring().authenticate(["secret-a"])
    assert a is not None and a.allows("m1") and not a.allows("m2")
    with pytest.raises(ModelNotAllowed) as info:
        a.check_model("m2")
    assert (info.value.status, info.value.code, info.value.param) == (403, "model_not_allowed", "model")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"authorization", b"Bearer k1")], ["k1"]),
        ([(b"Authorization", b"bearer   k1 ")], ["k1"]),
        ([(b"api-key", b"k2")], ["k2"]),
        ([(b"api-key", b"k2"), (b"authorization", b"Bearer k1")], ["k1", "k2"]),
        ([(b"authorization", b"Basic dXNlcjpwYXNz")], []),
        ([(b"authorization", b"Bearer ")], []),
        ([(b"api-key", b"")], []),
        ([(b"api-key", b"k")] * 10, ["k"] * 4),
    ],
)
def test_presented_keys(headers: list[tuple[bytes, bytes]], expected: list[str]) -> None:
    assert presented_keys({"headers": headers}) == expected
