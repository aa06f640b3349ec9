"""What this deployment offers a caller: its backends in failover order, the models each
allows and the inference providers a request may name. Built once from the backends by the
composition root (imagegen.app); validation checks requests against it, and the doors list it
(/capabilities.json, the page's pickers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from imagegen.backends.base import Backend, providers_of
from imagegen.backends.registry import BACKENDS


@dataclass(frozen=True)
class Offer:
    backend: str
    default_model: str
    models: tuple[str, ...]  # the default first
    providers: tuple[str, ...]  # inference providers a request may name, the default first; () for none
    models_setting: str  # the variable that lists the models, for error messages
    providers_setting: str | None


@dataclass(frozen=True)
class Catalog:
    offers: tuple[Offer, ...] = ()

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(offer.backend for offer in self.offers)

    def offer(self, backend: str) -> Offer:
        return next(offer for offer in self.offers if offer.backend == backend)

    @cached_property  # asked on every request that names a model; the offers never change
    def models(self) -> tuple[str, ...]:
        """Every model some backend allows, in failover order, each once."""
        return tuple(dict.fromkeys(model for offer in self.offers for model in offer.models))

    def with_providers(self) -> tuple[Offer, ...]:
        return tuple(offer for offer in self.offers if offer.providers)


def catalog_of(backends: Mapping[str, Backend]) -> Catalog:
    return Catalog(
        tuple(
            Offer(
                backend=name,
                default_model=backend.default_model,
                models=tuple(dict.fromkeys((backend.default_model, *backend.allowed_models))),
                providers=providers_of(backend),
                models_setting=BACKENDS[name].allowed_models_variable,
                providers_setting=BACKENDS[name].providers_variable,
            )
            for name, backend in backends.items()
        )
    )
