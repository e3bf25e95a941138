"""How the benchmark measures time, memory and the machine it ran on.

Peak memory is the process's peak resident set size (Linux ``VmHWM``), reset before
each measured step by writing ``5`` to ``/proc/self/clear_refs``. It counts torch's
and TenSEAL's native buffers, which ``tracemalloc`` (Python allocations only) would
miss, and it includes what the process already held (interpreter, libraries, data):
read differences between settings, not absolute footprints. Where the reset is not
allowed the figure is ``ru_maxrss``, the peak since the process started, and the
method column says so.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Measure:
    seconds: float = 0.0
    peak_mb: float = float("nan")
    method: str = ""


def _vm_kb(field: str) -> float | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark for this process; False where not allowed."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def measured() -> Iterator[Measure]:
    """Wall time and peak RSS of the block (see the module docstring for the method)."""
    result = Measure()
    resettable = reset_peak()
    start = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - start
        hwm = _vm_kb("VmHWM") if resettable else None
        if hwm is not None:
            result.peak_mb = hwm / 1024.0
            result.method = "VmHWM (reset per step)"
        else:
            result.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
            result.method = "ru_maxrss (process lifetime)"


def machine() -> dict[str, object]:
    """What the timings depend on: cores, load, library versions."""
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in load],
    }
