"""What this processor can do, read once: the facts every CPU-specific choice is keyed on.

The machines this project runs on change (AMD Zen 3 with AVX2 only, AMD Zen 4 with
avx512_bf16 and no AMX, Intel Xeon with AMX); choices name the feature they depend on:
- native bf16 arithmetic (avx512_bf16 or amx_bf16) makes bf16 the default CPU precision;
- AMX tiles (amx_bf16) make oneDNN's matmuls, and so PyTorch's SDPA, faster than the fused
  AVX-512 attention kernel, which then steps aside;
- the memory format is measured (ldm.inference.autotune), as no flag predicts it.
"""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CpuInfo:
    """Model name, family/model numbers and feature flags (as Linux's /proc/cpuinfo names them)."""
    model_name: str
    family_model: str
    flags: frozenset[str]

    @property
    def amx_bf16(self) -> bool:
        """AMX tiles with bf16 matmuls (Intel Sapphire Rapids and later)."""
        return "amx_bf16" in self.flags and "amx_tile" in self.flags

    @property
    def avx512_bf16(self) -> bool:
        """AVX-512 bf16 dot products (vdpbf16ps): Zen 4, Cooper Lake, Sapphire Rapids."""
        return "avx512_bf16" in self.flags

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware; elsewhere bf16 is converted to fp32 and back per op."""
        return self.amx_bf16 or self.avx512_bf16

    def describe(self) -> str:
        """One line for benchmark table headers: model and the flags choices depend on."""
        shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in self.flags]
        return f"{self.model_name} ({self.family_model}; {' '.join(shown) or 'no SIMD flags read'})"

    def cache_key(self) -> str:
        """Identifies the processor for cached measurements (with torch's version)."""
        relevant = sorted(f for f in self.flags if f.startswith(("avx", "amx", "fma", "f16c")))
        return f"{self.model_name}|{self.family_model}|{','.join(relevant)}|torch {torch.__version__}"


def _read_cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty off Linux)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CpuInfo (read once; the processor does not change under a process)."""
    fields = _read_cpuinfo()
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    family_model = f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
    return CpuInfo(name, family_model, frozenset(fields.get("flags", "").split()))
