"""The gateway's own /openapi.json, checked against the gateway: schemathesis generates requests
from the schema (valid and invalid ones) for every operation and sends them to the real server
(uvicorn on 127.0.0.1, sandbox provider: no network) and asserts no 5xx and that every status,
content type, header and body matches the schema. Bounded: a few examples per operation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from tests.conftest import gateway_settings
from tests.fakes.images import png_bytes
from tests.fakes.server import LocalServer

from imagegate.api.fields import _KNOWN
from imagegate.api.openapi import IMAGE_FIELDS
from imagegate.app import create_app

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp: Path = tmp_path_factory.mktemp("openapi")
    # At most the 1024x1024 default per image, so generated sizes and `n` stay cheap.
    settings_ = gateway_settings(tmp, limits={"max_pixels": 1_100_000, "max_image_bytes": 1_000_000})
    with LocalServer(create_app(settings_)) as server:
        yield server.url


@pytest.fixture(scope="module")
def api_schema(gateway: str) -> Any:
    return schemathesis.openapi.from_url(f"{gateway}/openapi.json")


def _operations(api_schema: Any) -> list[Any]:
    return [result.ok() for result in api_schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_api_matches_its_schema(api_schema: Any, mode: GenerationMode) -> None:
    """Every operation, MAX_EXAMPLES generated requests each (valid ones, then invalid ones)."""
    operations = _operations(api_schema)
    assert len(operations) >= 7
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
            phases=[Phase.explicit, Phase.generate],
        )
        def check(case: Any) -> None:
            case.call_and_validate(checks=CHECKS, timeout=30)

        try:
            check()
        except Unsatisfiable:  # nothing to make invalid: an operation without parameters or body
            bodiless = operation.method.upper() == "GET" or operation.label.endswith("/cancel")
            assert mode is GenerationMode.NEGATIVE and bodiless, operation.label


def _with_model(case: Any, model: str) -> Any:
    if isinstance(case.body, dict):
        case.body["model"] = model
    return case


@pytest.mark.parametrize(
    ("path", "model"), [("/v1/images/generations", "sandbox-image"), ("/v1/images/edits", "sandbox-edit")]
)
def test_generated_requests_for_a_real_model_conform(api_schema: Any, path: str, model: str) -> None:
    """Random models are 404s; with the sandbox model named, valid generated requests run for real."""
    operation = api_schema[path]["POST"]

    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE).map(lambda c: _with_model(c, model)))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
        phases=[Phase.explicit, Phase.generate],
    )
    def check(case: Any) -> None:
        case.call_and_validate(checks=CHECKS, timeout=30)

    check()


# -- the document itself -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def document(gateway: str) -> dict[str, Any]:
    response = httpx.get(f"{gateway}/openapi.json")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def test_the_image_endpoints_declare_their_bodies_and_never_a_422(document: dict[str, Any]) -> None:
    edits = document["paths"]["/v1/images/edits"]["post"]
    assert set(edits["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    generations = document["paths"]["/v1/images/generations"]["post"]
    assert set(generations["requestBody"]["content"]) == {"application/json"}
    for operation in (edits, generations):
        assert set(operation["responses"]) == {
            "200", "202", "400", "401", "402", "403", "404", "409", "413", "429", "500", "502", "503", "504",
        }  # fmt: skip
        assert set(operation["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
            for status, response in operation["responses"].items():
                if status >= "400":
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorResponse"
                    }
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_every_field_the_parser_knows_is_in_the_schema(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert set(IMAGE_FIELDS) == _KNOWN - {"image", "images", "mask"}
    assert set(schemas["CreateImageRequest"]["properties"]) == set(IMAGE_FIELDS)
    assert set(schemas["CreateImageEditJsonRequest"]["properties"]) == set(IMAGE_FIELDS) | {"images", "mask"}
    assert set(schemas["CreateImageEditRequest"]["properties"]) == set(IMAGE_FIELDS) | {"image", "image[]", "mask"}


def test_a_real_edit_and_stream_conform(gateway: str, api_schema: Any) -> None:
    """Random bytes are never a valid image, so the generated edits are all 400s: one valid
    multipart edit, one JSON edit and one stream, validated against the same schema."""
    import base64

    png = png_bytes(32, 24)
    edits = api_schema["/v1/images/edits"]["POST"]
    generations = api_schema["/v1/images/generations"]["POST"]
    multipart = edits.Case(
        media_type="multipart/form-data",
        body={"image": png, "prompt": "grayscale", "model": "sandbox-edit", "response_format": "b64_json"},
    )
    response = multipart.call_and_validate(checks=CHECKS)
    assert response.status_code == 200, response.text
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    as_json = edits.Case(
        media_type="application/json", body={"images": [{"image_url": data_uri}], "prompt": "invert", "size": "32x24"}
    )
    response = as_json.call_and_validate(checks=CHECKS)
    assert response.status_code == 200, response.text
    stream = generations.Case(
        media_type="application/json", body={"prompt": "a lighthouse", "size": "64x64", "stream": True}
    )
    response = stream.call_and_validate(checks=CHECKS)
    assert response.status_code == 200
    assert response.headers["content-type"][0].startswith("text/event-stream")
    assert "event: image_generation.completed" in response.text
