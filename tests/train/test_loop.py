"""engine.train.loop: bf16 only where the CPU has fast bf16 (AVX512-BF16 or AMX), unless asked."""

from __future__ import annotations

import pytest

torch = pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)
pytest.importorskip("torchvision", reason="training needs the train extra (torchvision)")


def test_bf16_only_where_the_cpu_has_it():
    from engine.train.loop import cpu_has_fast_bf16, resolve_precision

    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    zen4 = "flags\t\t: avx2 avx512f avx512_vnni avx512_bf16\n"
    sapphire = "flags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8\n"
    assert not cpu_has_fast_bf16(avx2)
    assert cpu_has_fast_bf16(zen4) and cpu_has_fast_bf16(sapphire)
    assert resolve_precision("auto", avx2) == "fp32"
    assert resolve_precision("auto", zen4) == "bf16"
    assert resolve_precision("fp32", zen4) == "fp32"  # asked for, not overridden
    # a name that merely contains the flag elsewhere on the line does not count
    assert not cpu_has_fast_bf16("model name\t: not avx512_bf16\nflags\t\t: avx2\n")
    assert not cpu_has_fast_bf16("")
