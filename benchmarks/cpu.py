"""Moved to `shared/cpu.py` (the inference service reads the CPU too); kept so that
`from benchmarks.cpu import ...` goes on working."""

from shared.cpu import KERNEL_FLAGS, CpuInfo, parse_cpu_text, read_cpu

__all__ = ["KERNEL_FLAGS", "CpuInfo", "parse_cpu_text", "read_cpu"]
