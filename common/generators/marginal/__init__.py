"""The marginal-based generator family (``--generator marginal``); see ``model.py``."""

from __future__ import annotations

from .model import MarginalGenerator

__all__ = ["MarginalGenerator"]
