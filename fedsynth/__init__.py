"""fedsynth: federated, differentially private synthetic patient data.

The public Python API, in the shape SDV users know::

    import fedsynth

    schema = fedsynth.Schema.load("schema.yaml")        # the study's published schema
    result = fedsynth.run_study({"north": df_north, "south": "south.csv"}, schema)
    result.synthetic, result.privacy, result.verdict     # see StudyResult
    model = fedsynth.TVAE(schema).fit(frame, epsilon=3)   # one table, central DP
    fedsynth.validate(train, holdout, model.sample(500), schema)

Names are imported on first use (``__getattr__``): torch, opacus and Flower take
seconds to load, and the ``fedsynth`` command imports this package for ``--help`` too.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "Schema": ("fedsynth.common.schema", "Schema"),
    "SchemaError": ("fedsynth.common.schema", "SchemaError"),
    "draft_schema": ("fedsynth.common.schema_draft", "draft_schema_file"),
    "read_table": ("fedsynth.common.table", "read_table"),
    "TableCheckError": ("fedsynth.common.table", "TableCheckError"),
    "Generator": ("fedsynth.common.generators", "Generator"),
    "TVAE": ("fedsynth.common.generators", "TVAE"),
    "CTGAN": ("fedsynth.common.generators", "CTGAN"),
    "TabDDPM": ("fedsynth.common.generators", "TabDDPM"),
    "get_generator": ("fedsynth.common.generators", "get_generator"),
    "validate": ("fedsynth.common.validation", "validate"),
    "ValidationResult": ("fedsynth.common.validation", "ValidationResult"),
    "verdict": ("fedsynth.common.validation.verdict", "verdict"),
    "run_study": ("fedsynth.simulations.study_api", "run_study"),
    "StudyResult": ("fedsynth.simulations.study_api", "StudyResult"),
    "SiteDataError": ("fedsynth.simulations.site_tables", "SiteDataError"),
    "StudyConfig": ("fedsynth.common.study", "StudyConfig"),
    "ConfigError": ("fedsynth.common.study", "ConfigError"),
}

__all__ = [
    "CTGAN",
    "ConfigError",
    "Generator",
    "Schema",
    "SchemaError",
    "SiteDataError",
    "StudyConfig",
    "StudyResult",
    "TVAE",
    "TabDDPM",
    "TableCheckError",
    "ValidationResult",
    "draft_schema",
    "get_generator",
    "read_table",
    "run_study",
    "validate",
    "verdict",
]

if TYPE_CHECKING:
    from .common.generators import CTGAN, TVAE, Generator, TabDDPM, get_generator
    from .common.schema import Schema, SchemaError
    from .common.schema_draft import draft_schema_file as draft_schema
    from .common.study import ConfigError, StudyConfig
    from .common.table import TableCheckError, read_table
    from .common.validation import ValidationResult, validate
    from .common.validation.verdict import verdict
    from .simulations.site_tables import SiteDataError
    from .simulations.study_api import StudyResult, run_study


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'fedsynth' has no attribute {name!r}") from None
    value = getattr(import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
