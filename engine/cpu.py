"""What this CPU can do fast, read from /proc/cpuinfo at run time.

The machines screening and training runs land on differ: some have AVX2 only, others
AVX-512 VNNI/BF16 or AMX. INT8 convolutions only pay where the CPU has a dot-product
instruction for 8-bit integers (AVX-512 VNNI, AVX-VNNI, AMX-INT8); bf16 autocast only where it
has bf16 arithmetic (AVX-512 BF16, AMX-BF16). Elsewhere both are emulated and slower than
float32, so nothing here assumes a speed-up measured on another machine.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# The flags worth recording beside a benchmark: what decides which kernels ONNX Runtime and
# PyTorch pick on x86.
NOTABLE_FLAGS = frozenset(
    {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_fp16"}
    | INT8_FLAGS
    | BF16_FLAGS
    | {"amx_tile"}
)


@dataclass(frozen=True, slots=True)
class CpuInfo:
    model: str
    flags: frozenset[str]

    @property
    def int8_fast(self) -> bool:
        """An 8-bit dot-product instruction: INT8 exports can beat float here."""
        return bool(self.flags & INT8_FLAGS)

    @property
    def bf16_fast(self) -> bool:
        return bool(self.flags & BF16_FLAGS)

    def notable(self) -> list[str]:
        return sorted(self.flags & NOTABLE_FLAGS)

    def describe(self) -> dict[str, object]:
        """For run.json and benchmark records."""
        return {
            "model": self.model,
            "flags": self.notable(),
            "int8_fast": self.int8_fast,
            "bf16_fast": self.bf16_fast,
        }


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and flags (x86 `flags`, Arm `Features`)."""
    model: str | None = None
    flags = frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model=model or platform.processor() or "unknown", flags=flags)


@lru_cache(maxsize=1)
def this_cpu() -> CpuInfo:
    """This machine's CPU; flags empty (nothing assumed fast) where /proc/cpuinfo is unreadable."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return CpuInfo(model=platform.processor() or "unknown", flags=frozenset())
