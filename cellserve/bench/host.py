"""What the benchmarks record of the machine they ran on."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows of it."""
    try:
        with open("/proc/cpuinfo") as f:
            found = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        found = ""
    return found or platform.processor() or platform.machine()
