"""The catalog: exact public model id -> ordered routes. No substring matching, ever."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from imagegate.core.errors import InvalidRequest, ModelNotFound
from imagegate.providers.base import Route
from imagegate.settings import ModelConfig

__all__ = ["ROUTE_PARAM", "Catalog", "CatalogEntry"]

ROUTE_PARAM = "x-imagegate-route"  # the `param` of an error about a route pin (it arrives as a header)


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    id: str
    routes: tuple[Route, ...]
    owned_by: str
    created: int
    description: str = ""

    def as_openai_model(self) -> dict[str, object]:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": self.owned_by}

    def pinned(self, spec: str) -> tuple[Route, ...]:
        """The one route a pin names: its 0-based index, its provider (the first route of that
        provider) or `provider:upstream-model`. A pinned request has no fallback."""
        spec = spec.strip()
        if spec.isascii() and spec.isdigit() and len(spec) < 6 and int(spec) < len(self.routes):
            return (self.routes[int(spec)],)
        for route in self.routes:
            if spec in (route.provider, f"{route.provider}:{route.model}"):
                return (route,)
        listed = ", ".join(f"{i} ({r.provider}:{r.model})" for i, r in enumerate(self.routes))
        raise InvalidRequest(
            f"The model `{self.id}` has no route {spec[:100]!r}; its routes are {listed}.", param=ROUTE_PARAM
        )


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
