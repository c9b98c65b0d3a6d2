"""What a result was made on: a rollout or a float reduction may round differently on another
CPU or package version, and a MuJoCo episode grows such a difference into another trajectory,
so a record names the machine and the versions that made it."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
from pathlib import Path

__all__ = ["processor_name", "software_versions", "made_on"]

# the packages whose arithmetic makes a collected dataset's numbers
_DATA_PACKAGES = ("torch", "numpy", "mujoco", "gymnasium", "d3rlpy")


def processor_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    with contextlib.suppress(OSError, StopIteration):
        return next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return platform.processor() or platform.machine()


def software_versions(packages: tuple[str, ...] = _DATA_PACKAGES) -> str:
    """``"torch 2.13.0, numpy 2.4.6, ..."`` for the installed ones among ``packages``."""
    found = []
    for package in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{package} {importlib.metadata.version(package)}")
    return ", ".join(found)


def made_on() -> str:
    """The CPU and the package versions, for a dataset's record."""
    return f"{processor_name()}; {software_versions()}"
