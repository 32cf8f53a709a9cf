"""The CPU a process runs on: its model and the instruction-set flags that decide which
kernels ONNX Runtime and torch pick (int8 with or without VNNI, bf16 on AMX). Printed above
every CPU table (`make bench`, `make bench-peers`) so that tables from different kinds of
machine are never compared by mistake, and part of the key under which the inference
service caches its measured CPU backend choice (`services/inference/autotune.py`).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: (name shown, flag in /proc/cpuinfo and lscpu): what the int8, fp32 and bf16 kernels need.
KERNEL_FLAGS: tuple[tuple[str, str], ...] = (
    ("AVX2", "avx2"),
    ("AVX-512F", "avx512f"),
    ("AVX-512 VNNI", "avx512_vnni"),
    ("AVX-VNNI", "avx_vnni"),
    ("AVX-512 BF16", "avx512_bf16"),
    ("AMX-INT8", "amx_int8"),
    ("AMX-BF16", "amx_bf16"),
)


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    usable_cpus: int
    """Logical CPUs this process may run on (its affinity), which the servers inherit."""

    def kernel_flags(self) -> dict[str, bool]:
        return {name: flag in self.flags for name, flag in KERNEL_FLAGS}

    def describe(self) -> str:
        """Two lines: the model and usable CPUs, then each kernel flag as yes/no."""
        flags = ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in self.kernel_flags().items())
        return f"CPU: {self.model}, {self.usable_cpus} CPUs usable\nkernel flags: {flags}"


def parse_cpu_text(text: str) -> tuple[str, frozenset[str]]:
    """The first model name and flag set in /proc/cpuinfo's or lscpu's text (both are
    `key: value` lines; /proc/cpuinfo pads its keys with tabs)."""
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and not model:
            model = " ".join(value.split())
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


def read_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """This machine's CPU, from /proc/cpuinfo, else lscpu, else what `platform` knows."""
    model, flags = "", frozenset[str]()
    with contextlib.suppress(OSError):
        model, flags = parse_cpu_text(cpuinfo.read_text())
    if not model or not flags:
        try:
            listed = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            listed = ""
        other_model, other_flags = parse_cpu_text(listed)
        model, flags = model or other_model, flags or other_flags
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return CpuInfo(model or platform.processor() or "unknown", flags, usable)
