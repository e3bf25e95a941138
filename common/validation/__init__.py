"""Validation of synthetic patient data against real data no generator saw.

One call, :func:`validate`, scores a synthetic table for fidelity (code sets included),
diversity, utility, survival, clustering, detection and privacy against a real holdout,
each figure beside the same figure for real patients. ``federated`` does it without
pooling: each site scores against its own rows, the coordinator combines the scores.
See ``docs/validation.md`` for every metric's definition and citation.
"""

from .metric import AREAS, MetricValue, ValidationResult
from .suite import AREA_RUNNERS, HEADLINE, validate

__all__ = ["AREAS", "AREA_RUNNERS", "HEADLINE", "MetricValue", "ValidationResult", "validate"]
