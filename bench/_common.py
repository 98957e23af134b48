"""Helpers shared by the benchmarks: gateway settings against a local fake, a synthetic
photo-like test image, and small statistics/formatting functions.

Only stable public names of the package and of the test fakes are used here.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `tests.fakes...` imports when run as `python bench/<name>.py`
    sys.path.insert(0, str(ROOT))

from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

from imagegate.settings import Settings, load_settings  # noqa: E402

__all__ = [
    "FAL_KEY",
    "ROOT",
    "fal_gateway_settings",
    "fmt_ms",
    "machine_line",
    "percentile",
    "photo_like",
    "ratio",
    "sandbox_gateway_settings",
]

FAL_KEY = "test-fal-key"


def _no_keys() -> dict[str, Any]:
    """Provider credentials from the environment are never used by a benchmark."""
    return {
        "fal": {"key": None, "key_id": None, "key_secret": None},
        "replicate": {"api_token": None},
        "openai": {"api_key": None},
    }


def fal_gateway_settings(
    storage_dir: str,
    fal_url: str,
    *,
    poll_interval: float = 0.005,
    poll_max_interval: float | None = None,
    status_stream: bool = False,
    deadline_seconds: float = 60,
) -> Settings:
    """The packaged defaults, fal pointed at a local FakeFal, URL passthrough, fast polling
    (`poll_max_interval` defaults to max(poll_interval, 0.05); `status_stream` follows fal's SSE
    status stream instead of polling)."""
    if poll_max_interval is None:
        poll_max_interval = max(poll_interval, 0.05)
    providers = _no_keys()
    providers["fal"] = {
        "key": FAL_KEY,
        "key_id": None,
        "key_secret": None,
        "queue_url": fal_url,
        "run_url": fal_url + "/sync",
        "rest_url": fal_url,
        "poll_interval": poll_interval,
        "poll_max_interval": poll_max_interval,
        "status_stream": status_stream,
    }
    return load_settings(
        None,
        storage={"path": storage_dir},
        delivery={"url_mode": "passthrough"},
        routing={"backoff_base": 0.01, "backoff_max": 0.05, "deadline_seconds": deadline_seconds},
        providers=providers,
    )


def sandbox_gateway_settings(storage_dir: str) -> Settings:
    """The packaged defaults (sandbox provider), storage in ``storage_dir``, no provider keys."""
    return load_settings(None, storage={"path": storage_dir}, providers=_no_keys())


def photo_like(width: int, height: int, seed: int = 7) -> Image.Image:
    """A deterministic synthetic RGB image with gradients, soft-edged shapes and fine noise, so
    encoders have real work to do (solid colours would make every encoder look free)."""
    base = Image.merge(
        "RGB",
        (
            Image.linear_gradient("L").resize((width, height)),
            Image.radial_gradient("L").resize((width, height)),
            Image.linear_gradient("L").rotate(90).resize((width, height)),
        ),
    )
    draw = ImageDraw.Draw(base)
    state = seed
    for _ in range(60):
        state = (state * 1103515245 + 12345) % 2**31
        x, y = state % width, (state // 7) % height
        r = 10 + (state // 13) % max(11, width // 6)
        color = ((state >> 3) % 256, (state >> 11) % 256, (state >> 19) % 256)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
    base = base.filter(ImageFilter.GaussianBlur(max(1, width // 512)))
    noise = Image.effect_noise((width, height), 24).convert("RGB")
    return Image.blend(base, noise, 0.12)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]. NaN for no values."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def machine_line() -> str:
    import PIL

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"python {platform.python_version()}, Pillow {PIL.__version__}, {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.machine()}, load average {load}"
    )
