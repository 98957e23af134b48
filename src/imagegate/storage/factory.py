"""`build_storage(settings)`: the backend `storage.backend` names (`local` or `s3`)."""

from __future__ import annotations

from imagegate.settings import StorageSettings
from imagegate.storage.base import Storage

__all__ = ["build_storage"]


def build_storage(settings: StorageSettings) -> Storage:
    if settings.backend == "s3":
        from imagegate.storage.s3 import S3Storage

        return S3Storage(settings)
    from imagegate.storage.local import LocalStorage

    return LocalStorage(settings)
