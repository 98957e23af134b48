"""The README's support matrix is generated from the tables: it must not drift."""

from __future__ import annotations

from pathlib import Path

from imagegate.matrix import MARKERS, render_matrix, replace_matrix

README = Path(__file__).resolve().parents[1] / "README.md"


def test_support_matrix_is_current() -> None:
    text = README.read_text("utf-8")
    assert all(marker in text for marker in MARKERS)
    assert replace_matrix(text, render_matrix()) == text, "run: python -m imagegate.matrix --write README.md"


def test_matrix_covers_every_provider_model() -> None:
    matrix = render_matrix()
    for column in ("fal: `fal-ai/qwen-image-edit-2511`", "replicate: `qwen/qwen-image-edit-2511`",
                   "sandbox: `sandbox-edit`", "sandbox: `sandbox-image`", "fal: `fal-ai/qwen-image`"):
        assert column in matrix
