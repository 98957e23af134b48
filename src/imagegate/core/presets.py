"""Named size grids shared by providers that serve the same model family.

One place for each grid, so the fal, Replicate and sandbox routes of a public model resolve
`aspect_ratio` + `resolution` to the same pixels (see docs: gateway-parameters.md).
"""

from __future__ import annotations

from imagegate.core.sizes import SizePresets

__all__ = ["QWEN_PRESETS"]

# The Qwen-Image reference grid: ratio -> pixels at 1K; 0.5K and 2K scale by sqrt(megapixels).
QWEN_PRESETS = SizePresets(
    base={
        "4:3": (1183, 887),
        "1:1": (1024, 1024),
        "3:4": (887, 1182),
        "9:16": (768, 1365),
        "16:9": (1365, 768),
    },
    tiers=("0.5K", "1K", "2K"),
    base_tier="1K",
    default_ratio="1:1",
    default_tier="1K",
)
