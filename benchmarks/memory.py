"""Peak memory of this process (Linux): what the benchmarks that report memory share."""

from __future__ import annotations


def status_mb(field: str) -> float:
    """A field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM), so that loading the model does not mask the
    peak of what is measured after it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
