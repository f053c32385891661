"""Memory measurements: this process's resident memory, and the memory the host has available."""

from __future__ import annotations

import resource
from pathlib import Path


def _status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status (Linux), in MiB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB. On Linux this is `VmHWM`, the high-water
    mark of this program's own memory: `ru_maxrss` would also count the parent's memory at the
    fork that started this process (the kernel keeps the larger of the two across exec)."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """Resident memory of this process now, in MiB (Linux /proc; falls back to the peak)."""
    rss = _status_mb("VmRSS")
    return rss if rss is not None else peak_rss_mb()


def available_memory_mb() -> float | None:
    """MemAvailable from /proc/meminfo in MiB; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
