"""A real S3-compatible server on 127.0.0.1 for tests: moto's server mode in a thread.

with LocalS3() as s3:
    s3.create_bucket("imagegate-test-...")
    settings = s3.storage_settings(bucket, url_style="presigned")
"""

from __future__ import annotations

import logging
import uuid
from types import TracebackType
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

ACCESS_KEY_ID = "test-s3-access-key-id"
SECRET_ACCESS_KEY = "test-s3-secret-access-key-0123456789"
REGION = "us-east-1"


class LocalS3:
    """moto's S3 on an ephemeral 127.0.0.1 port. `stop()` closes the listening socket too, so a
    stopped server refuses connections (as a crashed one would)."""

    def __init__(self) -> None:
        self._server: ThreadedMotoServer | None = None
        self.url = ""

    def start(self) -> LocalS3:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        self._server = server
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.stop()
        inner = server._server
        if inner is not None:
            inner.server_close()

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )

    def create_bucket(self, name: str | None = None) -> str:
        bucket = name or f"imagegate-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def storage_settings(self, bucket: str, **s3: Any) -> dict[str, Any]:
        """The `storage` section of a gateway config for `bucket` on this server."""
        return {
            "backend": "s3",
            "s3": {
                "bucket": bucket,
                "endpoint_url": self.url,
                "region": REGION,
                "access_key_id": ACCESS_KEY_ID,
                "secret_access_key": SECRET_ACCESS_KEY,
                "prefix": "outputs/",
                "timeout_seconds": 5,
                **s3,
            },
        }
