"""Generators of synthetic rows, picked by name (``--generator``, run config)."""

from __future__ import annotations

from ..errors import UnknownGeneratorError
from .base import ConditionError, Generator, ModelFileError
from .ctgan import CTGAN
from .diffusion import TabDDPM
from .marginal import MarginalGenerator
from .tvae import TVAE

REGISTRY: dict[str, type[Generator]] = {
    TVAE.name: TVAE,
    CTGAN.name: CTGAN,
    TabDDPM.name: TabDDPM,
    MarginalGenerator.name: MarginalGenerator,
}
DEFAULT_GENERATOR = "tvae"


def get_generator(name: str) -> type[Generator]:
    """The generator class registered under ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownGeneratorError(
            f"unknown generator {name!r}; choose one of {', '.join(sorted(REGISTRY))}"
        ) from None


__all__ = [
    "CTGAN",
    "ConditionError",
    "DEFAULT_GENERATOR",
    "Generator",
    "MarginalGenerator",
    "ModelFileError",
    "REGISTRY",
    "TVAE",
    "TabDDPM",
    "get_generator",
]
