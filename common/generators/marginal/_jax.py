"""JAX settings for ``mbi``, set once before ``mbi`` is imported (it warns otherwise).

- float64: mbi's estimators stall or diverge in float32 on large totals;
- no persistent compilation cache: mbi compiles many small programs, and a shared
  on-disk cache only slows sweeps down (several engineers share this machine's disk).

Every module of fedsynth that needs mbi imports it through :func:`mbi`, so these
settings live in this one place.
"""

from __future__ import annotations

import os
from types import ModuleType

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def mbi() -> ModuleType:
    """The ``mbi`` package, with JAX configured first."""
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_enable_compilation_cache", False)
    import mbi as _mbi

    return _mbi
