"""The support matrix: what each model's table does with each parameter, rendered from the tables
themselves (`python -m imagegate.matrix`), so the README cannot drift from the code."""

from __future__ import annotations

import httpx

from imagegate.core.imaging import ImagePool
from imagegate.core.params import GATEWAY_PARAMS, KNOWN_PARAMS, SIZE_PARAMS
from imagegate.core.request import Operation
from imagegate.providers.registry import build_providers
from imagegate.settings import Settings

__all__ = ["MARKERS", "render_matrix", "replace_matrix"]

MARKERS = ("<!-- support-matrix:start -->", "<!-- support-matrix:end -->")

_OPERATIONS: tuple[tuple[Operation, str], ...] = (
    ("edit", "POST /v1/images/edits"),
    ("generate", "POST /v1/images/generations"),
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_matrix() -> str:
    """Markdown: one table per operation, one column per provider model, one row per parameter."""
    pool = ImagePool(1)  # only the tables are read: no request is made, no image work is done
    providers = build_providers(httpx.AsyncClient(), Settings(), pool)
    pool.close()
    sections: list[str] = []
    for operation, title in _OPERATIONS:
        columns: list[tuple[str, dict[str, str]]] = []
        for name, provider in sorted(providers.items()):
            for model in provider.models() or ("(any model)",):
                try:
                    table = provider.table(model, operation)
                except KeyError:
                    continue
                columns.append((f"{name}: `{model}`", table.describe()))
        params = ["prompt", "image", *sorted(KNOWN_PARAMS - {"prompt", "image"}), *SIZE_PARAMS[1:],
                  *GATEWAY_PARAMS, "(other fields)"]
        params = [p for p in params if any(p in described for _, described in columns)]
        lines = [f"### {title}", "", "| parameter | " + " | ".join(c for c, _ in columns) + " |",
                 "|---" * (len(columns) + 1) + "|"]
        for param in params:
            cells = [_cell(described.get(param, "—")) for _, described in columns]
            lines.append(f"| `{param}` | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def replace_matrix(document: str, matrix: str) -> str:
    """`document` with the text between the markers replaced by `matrix`."""
    start, end = MARKERS
    head, _, rest = document.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n\n{matrix}\n{end}{tail}"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if sys.argv[1:2] == ["--write"]:
        path = Path(sys.argv[2] if len(sys.argv) > 2 else "README.md")
        path.write_text(replace_matrix(path.read_text("utf-8"), render_matrix()), "utf-8")
    else:
        print(render_matrix(), end="")
