"""The catalog: exact public model id -> ordered routes. No substring matching, ever."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from imagegate.core.errors import ModelNotFound
from imagegate.providers.base import Route
from imagegate.settings import ModelConfig

__all__ = ["Catalog", "CatalogEntry"]


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    id: str
    routes: tuple[Route, ...]
    owned_by: str
    created: int
    description: str = ""

    def as_openai_model(self) -> dict[str, object]:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": self.owned_by}


class Catalog:
    def __init__(self, entries: Mapping[str, CatalogEntry]) -> None:
        self._entries = dict(entries)

    @classmethod
    def from_config(cls, models: Mapping[str, ModelConfig]) -> Catalog:
        return cls(
            {
                model_id: CatalogEntry(
                    id=model_id,
                    routes=tuple(
                        Route(
                            provider=r.provider,
                            model=r.model,
                            options={**r.options, **({"url_mode": r.url_mode} if r.url_mode else {})},
                            timeout=r.timeout_seconds,
                        )
                        for r in config.routes
                    ),
                    owned_by=config.owned_by,
                    created=config.created,
                    description=config.description,
                )
                for model_id, config in models.items()
            }
        )

    def get(self, model_id: str) -> CatalogEntry:
        try:
            return self._entries[model_id]
        except KeyError:
            raise ModelNotFound(
                f"The model `{model_id}` does not exist or you do not have access to it.", param="model"
            ) from None

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
