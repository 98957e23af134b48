"""The fakes themselves, driven with plain httpx: they must speak the documented protocols."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from .fal import FakeFal, FalScenario, content_policy_violation, rate_limited, runner_scheduling_failure
from .images import data_uri, image_info, jpeg_bytes, png_bytes, webp_bytes
from .replicate import SENSITIVE_ERROR, FakeReplicate, ReplicateScenario, throttled
from .server import LocalServer, wait_until

FAL_KEY = {"Authorization": "Key test-fal-key"}
R8 = {"Authorization": "Bearer r8_test-token"}


@pytest.fixture(scope="module")
def fal_server() -> Iterator[tuple[FakeFal, LocalServer]]:
    fake = FakeFal()
    with LocalServer(fake.app) as srv:
        yield fake, srv


@pytest.fixture
def fal(fal_server: tuple[FakeFal, LocalServer]) -> Iterator[tuple[FakeFal, httpx.Client]]:
    fake, srv = fal_server
    fake.reset()
    fake.scenario = FalScenario()
    fake.model_scenarios.clear()
    fake.script.clear()
    with httpx.Client(base_url=srv.url, timeout=5) as client:
        yield fake, client


@pytest.fixture(scope="module")
def rep_server() -> Iterator[tuple[FakeReplicate, LocalServer]]:
    fake = FakeReplicate()
    with LocalServer(fake.app) as srv:
        yield fake, srv


@pytest.fixture
def rep(rep_server: tuple[FakeReplicate, LocalServer]) -> Iterator[tuple[FakeReplicate, httpx.Client]]:
    fake, srv = rep_server
    fake.reset()
    fake.scenario = ReplicateScenario()
    fake.model_scenarios.clear()
    fake.script.clear()
    with httpx.Client(base_url=srv.url + "/v1", timeout=5) as client:
        yield fake, client


def test_images_helpers() -> None:
    assert image_info(png_bytes(10, 20)) == ("PNG", 10, 20)
    assert image_info(jpeg_bytes(30, 10)) == ("JPEG", 30, 10)
    assert image_info(webp_bytes(8, 8, mode="RGBA")) == ("WEBP", 8, 8)


def test_local_server_stops_quickly() -> None:
    fake = FakeFal()
    with LocalServer(fake.app) as srv:
        url = srv.url
        assert httpx.get(url + "/files/nope").status_code == 404
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/files/nope")


# ---- fal ------------------------------------------------------------------------------------------


def test_fal_queue_lifecycle(fal: tuple[FakeFal, httpx.Client]) -> None:
    fake, client = fal
    payload = {"prompt": "a cat", "image_size": "landscape_16_9", "num_images": 2, "output_format": "png"}
    sub = client.post("/fal-ai/qwen-image-edit-2511/lora", json=payload, headers=FAL_KEY)
    assert sub.status_code == 200
    body = sub.json()
    rid = body["request_id"]
    assert sub.headers["x-fal-request-id"] == rid
    assert body["status"] == "IN_QUEUE" and body["queue_position"] == 0
    root = f"{str(client.base_url).rstrip('/')}/fal-ai/qwen-image-edit-2511/requests/{rid}"  # owner/app only, no /lora
    assert (body["response_url"], body["status_url"], body["cancel_url"]) == (root, root + "/status", root + "/cancel")
    assert fake.last_submit.input == payload and fake.last_submit.endpoint_id.endswith("/lora")

    seen = []
    for _ in range(3):
        st = client.get(body["status_url"], headers=FAL_KEY)
        seen.append((st.status_code, st.json()["status"]))
    assert seen == [(202, "IN_QUEUE"), (202, "IN_PROGRESS"), (200, "COMPLETED")]
    assert st.json()["logs"] is None and "error" not in st.json()
    assert client.get(body["status_url"] + "?logs=1", headers=FAL_KEY).json()["logs"][0]["level"] == "INFO"

    res = client.get(body["response_url"], headers=FAL_KEY)
    assert res.status_code == 200 and res.headers["x-fal-request-id"] == rid
    out = res.json()
    assert out["has_nsfw_concepts"] == [False, False] and out["prompt"] == "a cat"
    img = out["images"][0]
    assert (img["width"], img["height"], img["content_type"]) == (1024, 576, "image/png")
    file = httpx.get(img["url"])
    assert file.headers["content-type"] == "image/png" and len(file.content) == img["file_size"]
    assert image_info(file.content) == ("PNG", 1024, 576)
    assert len(fake.status_polls) == 4 and fake.result_fetches == [rid]


def test_fal_auth_and_wrong_status_url(fal: tuple[FakeFal, httpx.Client]) -> None:
    _, client = fal
    r = client.post("/fal-ai/qwen-image", json={"prompt": "x"}, headers={"Authorization": "Key nope"})
    assert r.status_code == 401 and "detail" in r.json()
    rid = client.post("/fal-ai/qwen-image-edit-2511/lora", json={}, headers=FAL_KEY).json()["request_id"]
    assert client.get(f"/fal-ai/qwen-image-edit-2511/lora/requests/{rid}/status", headers=FAL_KEY).status_code == 404


def test_fal_edit_size_from_input_image_and_sync_mode(fal: tuple[FakeFal, httpx.Client]) -> None:
    fake, client = fal
    fake.scenario = FalScenario.instant()
    payload = {
        "prompt": "p",
        "image_urls": [data_uri(png_bytes(300, 200), "image/png")],
        "output_format": "webp",
        "sync_mode": True,
    }
    body = client.post("/fal-ai/qwen-image-edit-2511", json=payload, headers=FAL_KEY).json()
    assert client.get(body["status_url"], headers=FAL_KEY).json()["status"] == "COMPLETED"
    img = client.get(body["response_url"], headers=FAL_KEY).json()["images"][0]
    assert img["url"].startswith("data:image/webp;base64,") and (img["width"], img["height"]) == (300, 200)


def test_fal_cancel(fal: tuple[FakeFal, httpx.Client]) -> None:
    fake, client = fal
    fake.scenario = FalScenario.hang(queue_polls=0)
    body = client.post("/fal-ai/qwen-image", json={"prompt": "slow"}, headers=FAL_KEY).json()
    assert client.get(body["status_url"], headers=FAL_KEY).json()["status"] == "IN_PROGRESS"
    assert client.get(body["response_url"], headers=FAL_KEY).status_code == 202
    c = client.put(body["cancel_url"], headers=FAL_KEY)
    assert (c.status_code, c.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    assert fake.cancels == [body["request_id"]]
    assert client.get(body["status_url"], headers=FAL_KEY).json()["status"] == "COMPLETED"
    assert client.get(body["response_url"], headers=FAL_KEY).json()["error_type"] == "client_cancelled"
    assert client.put(body["cancel_url"], headers=FAL_KEY).status_code == 400


def test_fal_sse_stream(fal: tuple[FakeFal, httpx.Client]) -> None:
    fake, client = fal
    fake.scenario = FalScenario(queue_polls=2, progress_polls=2, stream_interval=0.005)
    body = client.post("/fal-ai/qwen-image", json={"prompt": "x"}, headers=FAL_KEY).json()
    with client.stream("GET", body["status_url"] + "/stream", headers=FAL_KEY) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = list(r.iter_lines())
    assert lines[0] == ": keepalive"
    events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    assert [(e["status"], e.get("queue_position")) for e in events] == [
        ("IN_QUEUE", 1),
        ("IN_QUEUE", 0),
        ("IN_PROGRESS", None),
        ("COMPLETED", None),
    ]


def test_fal_submit_failures_then_result_error(fal: tuple[FakeFal, httpx.Client]) -> None:
    fake, client = fal
    fake.scenario = FalScenario.instant(
        submit_errors=[runner_scheduling_failure(), rate_limited(1)],
        result_error=content_policy_violation(),
    )
    r1 = client.post("/fal-ai/qwen-image", json={"prompt": "bad"}, headers=FAL_KEY)
    assert r1.status_code == 503 and r1.headers["x-fal-error-type"] == "runner_scheduling_failure"
    assert r1.json() == {"detail": "Failed to schedule a runner", "error_type": "runner_scheduling_failure"}
    r2 = client.post("/fal-ai/qwen-image", json={"prompt": "bad"}, headers=FAL_KEY)
    assert r2.status_code == 429 and r2.headers["retry-after"] == "1" and "x-fal-request-id" not in r2.headers
    body = client.post("/fal-ai/qwen-image", json={"prompt": "bad"}, headers=FAL_KEY).json()
    assert client.get(body["status_url"], headers=FAL_KEY).json()["status"] == "COMPLETED"
    res = client.get(body["response_url"], headers=FAL_KEY)
    assert res.status_code == 422
    detail = res.json()["detail"][0]
    assert detail["type"] == "content_policy_violation" and detail["loc"] == ["body", "prompt"]
    assert detail["input"] == {"prompt": "bad"}
    assert len(fake.rejected_submits) == 2 and len(fake.submits) == 1


def test_fal_sync_run(fal: tuple[FakeFal, httpx.Client]) -> None:
    fake, client = fal
    r = client.post(
        "/sync/fal-ai/qwen-image", json={"prompt": "x", "image_size": {"width": 64, "height": 48}}, headers=FAL_KEY
    )
    assert r.status_code == 200 and r.headers["x-fal-request-id"] == fake.runs[0].request_id
    assert (r.json()["images"][0]["width"], r.json()["images"][0]["height"]) == (64, 48)


def test_fal_upload_round_trip(fal: tuple[FakeFal, httpx.Client]) -> None:
    fake, client = fal
    data = png_bytes(40, 30)
    init = client.post(
        "/storage/upload/initiate",
        params={"storage_type": "fal-cdn-v3"},
        json={"content_type": "image/png", "file_name": "in.png"},
        headers=FAL_KEY,
    )
    assert init.status_code == 200
    urls = init.json()
    put = httpx.put(urls["upload_url"], content=data, headers={"Content-Type": "image/png"})
    assert put.status_code == 200
    got = httpx.get(urls["file_url"])
    assert got.content == data and got.headers["content-type"] == "image/png"
    up = fake.uploads[0]
    assert (up.storage_type, up.file_name, up.data) == ("fal-cdn-v3", "in.png", data)
    # An uploaded file used as an edit input decides the output size.
    fake.scenario = FalScenario.instant()
    body = client.post(
        "/fal-ai/qwen-image-edit-2511", json={"prompt": "p", "image_urls": [urls["file_url"]]}, headers=FAL_KEY
    ).json()
    img = client.get(body["response_url"], headers=FAL_KEY).json()["images"][0]
    assert (img["width"], img["height"]) == (40, 30)


# ---- Replicate ------------------------------------------------------------------------------------


def test_replicate_prefer_wait_then_poll_then_download(rep: tuple[FakeReplicate, httpx.Client]) -> None:
    fake, client = rep
    fake.scenario = ReplicateScenario(starting_ticks=1, processing_ticks=2, wait_ticks=1)
    payload = {"input": {"prompt": "a dog", "aspect_ratio": "16:9", "output_format": "png"}}
    r = client.post(
        "/models/qwen/qwen-image/predictions", json=payload, headers={**R8, "Prefer": "wait=5", "Cancel-After": "1m"}
    )
    assert r.status_code == 201 and r.headers["preference-applied"] == "wait=5"
    pred = r.json()
    required = {"id", "model", "version", "input", "output", "data_removed", "error", "status", "created_at", "urls"}
    assert required <= pred.keys() and pred["version"] == "hidden" and pred["model"] == "qwen/qwen-image"
    assert pred["status"] == "processing" and pred["output"] is None and "deadline" in pred
    assert pred["urls"]["get"] == f"{str(client.base_url).rstrip('/')}/predictions/{pred['id']}"
    assert fake.last_create.input == payload["input"] and fake.last_create.cancel_after == "1m"
    statuses = [client.get(pred["urls"]["get"], headers=R8).json() for _ in range(2)]
    assert [s["status"] for s in statuses] == ["processing", "succeeded"]
    done = statuses[-1]
    assert done["metrics"]["predict_time"] > 0 and done["completed_at"]
    img = httpx.get(done["output"][0])
    assert img.headers["content-type"] == "image/png" and image_info(img.content) == ("PNG", 1360, 768)


def test_replicate_early_output_and_failures(rep: tuple[FakeReplicate, httpx.Client]) -> None:
    fake, client = rep
    fake.script.extend(
        [
            ReplicateScenario(early_output=True, output_kind="data_uri"),
            ReplicateScenario.flagged(),
        ]
    )
    edit = {"input": {"prompt": "p", "image": [data_uri(jpeg_bytes(120, 90), "image/jpeg")]}}
    early = client.post(
        "/models/qwen/qwen-image-edit-2511/predictions", json=edit, headers={**R8, "Prefer": "wait"}
    ).json()
    assert early["status"] == "processing" and early["output"][0].startswith("data:image/webp;base64,")
    failed = client.post(
        "/models/qwen/qwen-image/predictions", json={"input": {"prompt": "x"}}, headers={**R8, "Prefer": "wait=1"}
    ).json()
    assert (failed["status"], failed["error"], failed["output"]) == ("failed", SENSITIVE_ERROR, None)


def test_replicate_cancel_and_validation(rep: tuple[FakeReplicate, httpx.Client]) -> None:
    fake, client = rep
    fake.scenario = ReplicateScenario.hang()
    pred = client.post("/models/qwen/qwen-image/predictions", json={"input": {"prompt": "x"}}, headers=R8).json()
    assert client.get(f"/predictions/{pred['id']}", headers=R8).json()["status"] == "processing"
    c = client.post(pred["urls"]["cancel"], headers=R8)
    assert c.status_code == 200 and c.json()["status"] == "canceled" and fake.cancels == [pred["id"]]
    bad = client.post("/models/qwen/qwen-image/predictions", json={"input": {"prompt": "x"}, "model": "m"}, headers=R8)
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    assert bad.json()["invalid_fields"][0]["type"] == "additional_property_not_allowed"
    ratio = client.post(
        "/models/qwen/qwen-image/predictions", json={"input": {"prompt": "x", "aspect_ratio": "5:4"}}, headers=R8
    )
    assert ratio.json()["invalid_fields"][0]["field"] == "input.aspect_ratio"
    unauth = client.post("/models/qwen/qwen-image/predictions", json={"input": {}})
    assert unauth.status_code == 401 and unauth.json()["title"] == "Unauthenticated"


def test_replicate_429_retry_after(rep: tuple[FakeReplicate, httpx.Client]) -> None:
    fake, client = rep
    fake.scenario = ReplicateScenario.instant(create_errors=[throttled(3)])
    r = client.post("/models/qwen/qwen-image/predictions", json={"input": {"prompt": "x"}}, headers=R8)
    assert r.status_code == 429 and r.headers["retry-after"] == "3" and r.json()["retry_after"] == 3
    ok = client.post("/models/qwen/qwen-image/predictions", json={"input": {"prompt": "x"}}, headers=R8)
    assert ok.status_code == 201 and ok.json()["status"] == "succeeded"
    assert len(fake.rejected_creates) == 1 and len(fake.creates) == 1


def test_replicate_file_upload(rep: tuple[FakeReplicate, httpx.Client]) -> None:
    fake, client = rep
    data = png_bytes(50, 70)
    r = client.post(
        "/files", headers=R8, files={"content": ("in.png", data, "image/png")}, data={"metadata": json.dumps({"k": 1})}
    )
    assert r.status_code == 201
    meta = r.json()
    assert (meta["name"], meta["content_type"], meta["metadata"]) == ("in.png", "image/png", {"k": 1})
    assert meta["size"] == len(data) and meta["checksums"]["sha256"] and meta["expires_at"]
    assert meta["urls"]["get"] == f"{str(client.base_url).rstrip('/')}/files/{meta['id']}"
    assert fake.uploads[0].data == data
    assert client.get(meta["urls"]["get"], headers=R8).json()["id"] == meta["id"]
    assert client.get(f"/files/{meta['id']}/download").content == data
    # The uploaded file as match_input_image input decides the output size.
    fake.scenario = ReplicateScenario.instant()
    done = client.post(
        "/models/qwen/qwen-image-edit-2511/predictions",
        headers={**R8, "Prefer": "wait"},
        json={"input": {"prompt": "p", "image": [meta["urls"]["get"]]}},
    ).json()
    assert image_info(httpx.get(done["output"][0]).content) == ("WEBP", 50, 70)
    fake.max_file_size = 10
    too_big = client.post("/files", headers=R8, files={"content": ("in.png", data, "image/png")})
    assert too_big.status_code == 413 and "100MB" in too_big.json()["detail"]
    fake.max_file_size = 100 * 1024 * 1024


def test_wait_until() -> None:
    assert wait_until(lambda: True) and not wait_until(lambda: False, timeout=0.02)
