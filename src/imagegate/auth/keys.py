"""The configured client keys (`auth.keys`) and the constant-time lookup of a presented key.

Every key is kept only as its SHA-256 digest (`key` is hashed at start; `key_sha256` is given as
one), and a presented key is hashed and compared with *every* digest through `hmac.compare_digest`,
so neither the comparison nor the number of comparisons depends on how much of a key matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from imagegate.core.errors import GatewayError
from imagegate.settings import AuthSettings, ClientKeyConfig

__all__ = ["ClientKey", "KeyLimits", "KeyRing", "ModelNotAllowed", "digest"]


class ModelNotAllowed(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


@dataclass(frozen=True, slots=True)
class KeyLimits:
    rpm: int | None = None
    images_per_minute: int | None = None
    max_concurrent: int | None = None

    def __bool__(self) -> bool:
        return self.rpm is not None or self.images_per_minute is not None or self.max_concurrent is not None


@dataclass(frozen=True, slots=True)
class ClientKey:
    """An authenticated client: its name (what logs, metrics and usage show; never the key)."""

    name: str
    models: frozenset[str] | None = None  # None: every model
    limits: KeyLimits = KeyLimits()
    admin: bool = False
    webhook_url: str | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def check_model(self, model: str) -> None:
        if not self.allows(model):
            raise ModelNotAllowed(f"The API key '{self.name}' may not use the model `{model}`.", param="model")


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyRing:
    """The configured keys. Empty: the gateway is open (`open` is True)."""

    def __init__(self, entries: Sequence[tuple[bytes, ClientKey]]) -> None:
        self._entries = tuple(entries)

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> KeyRing:
        return cls([(_digest_of(config), _client_of(config)) for config in settings.keys])

    @property
    def open(self) -> bool:
        return not self._entries

    def by_name(self, name: str) -> ClientKey | None:
        """The configured key called `name` (async jobs run under the key that submitted them)."""
        return next((client for _, client in self._entries if client.name == name), None)

    def authenticate(self, presented: Iterable[str]) -> ClientKey | None:
        """The key whose secret is one of `presented`, or None. Constant time in the secrets."""
        found: ClientKey | None = None
        for candidate in presented:
            candidate_digest = digest(candidate)
            for key_digest, client in self._entries:
                if hmac.compare_digest(candidate_digest, key_digest) and found is None:
                    found = client
        return found


def _digest_of(config: ClientKeyConfig) -> bytes:
    if config.key is not None:
        return digest(config.key.get_secret_value())
    assert config.key_sha256 is not None  # the settings model requires one of the two
    return bytes.fromhex(config.key_sha256)


def _client_of(config: ClientKeyConfig) -> ClientKey:
    return ClientKey(
        name=config.name,
        models=frozenset(config.models) if config.models is not None else None,
        limits=KeyLimits(config.rpm, config.images_per_minute, config.max_concurrent),
        admin=config.admin,
        webhook_url=config.webhook_url,
    )
