"""What a run records about itself: peak memory and library versions (``results.json``)."""

from __future__ import annotations

import platform
import resource
from pathlib import Path

import torch


def reset_peak_mem() -> None:
    """Start a fresh peak-memory count for this run (multirun jobs share one process)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak resident set
    except OSError:
        pass


def peak_mem_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or on CPU the peak resident set since :func:`reset_peak_mem`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process-lifetime peak (KiB on Linux)


def versions() -> dict:
    """The versions behind a run, read from the installed metadata (importing peft alone costs seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"aglcl": of("aglcl"), "torch": torch.__version__, "transformers": of("transformers"),
            "peft": of("peft"), "accelerate": of("accelerate"), "python": platform.python_version()}
