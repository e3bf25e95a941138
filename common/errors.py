"""One family for every error fedsynth raises on purpose.

Each says what is wrong and what to do, so the command line prints it as it is and
exits non-zero, and Python callers can catch ``FedsynthError`` alone. Subclasses keep
the built-in base they always had (``ValueError`` for bad input, ``RuntimeError`` for a
failed run), so code that caught those keeps working.
"""

from __future__ import annotations


class FedsynthError(Exception):
    """Base of every error fedsynth raises with a message meant for its user."""


class BudgetError(FedsynthError, ValueError):
    """A privacy budget cannot pay for the planned study; the message says the smallest
    budget that can, or what to change in the plan."""


class UnknownGeneratorError(FedsynthError, ValueError):
    """A generator name that is not registered; the message lists the known ones."""
