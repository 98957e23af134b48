"""The fal.ai adapter: parameter tables (tables.py), the HTTP protocol (transport.py), the failure
table (errors.py), and `FalProvider` (provider.py) tying them together."""

from __future__ import annotations

from imagegate.providers.fal.errors import map_failure
from imagegate.providers.fal.provider import FalProvider
from imagegate.providers.fal.tables import TABLES, size_presets, to_fal_image_size
from imagegate.providers.fal.transport import FalTransport

__all__ = ["TABLES", "FalProvider", "FalTransport", "map_failure", "size_presets", "to_fal_image_size"]
