"""Validation of synthetic patient data against real data no generator saw.

One call, :func:`validate`, scores a synthetic table for fidelity, utility and privacy
(and, as the module grows, diversity, detection, survival and clustering) against a
real holdout, each figure beside the same figure for real patients. See
``docs/validation.md`` for every metric's definition and citation.
"""

from .metric import AREAS, MetricValue, ValidationResult
from .suite import AREA_RUNNERS, HEADLINE, validate

__all__ = ["AREAS", "AREA_RUNNERS", "HEADLINE", "MetricValue", "ValidationResult", "validate"]
