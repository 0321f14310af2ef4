"""engine.cpu: the CPU's model and flags, and what they make fast."""

from __future__ import annotations

from engine.cpu import parse_cpuinfo, this_cpu

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16

processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16
"""
SAPPHIRE = "model name\t: Intel Xeon\nflags\t\t: avx2 avx512f amx_tile amx_int8 amx_bf16\n"
AVX2 = "model name\t: AMD EPYC 7R32\nflags\t\t: fpu sse2 avx avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd asimddp bf16 i8mm\n"


def test_flags_say_what_is_fast():
    zen4, spr, avx2 = parse_cpuinfo(ZEN4), parse_cpuinfo(SAPPHIRE), parse_cpuinfo(AVX2)
    assert zen4.model == "AMD EPYC 9R14" and zen4.int8_fast and zen4.bf16_fast
    assert spr.int8_fast and spr.bf16_fast
    assert not avx2.int8_fast and not avx2.bf16_fast
    assert zen4.describe() == {
        "model": "AMD EPYC 9R14",
        "flags": ["avx2", "avx512_bf16", "avx512_vnni", "avx512bw", "avx512f", "avx512vl", "fma"],
        "int8_fast": True,
        "bf16_fast": True,
    }


def test_unknown_or_unreadable_means_nothing_assumed_fast():
    empty = parse_cpuinfo("")
    assert not empty.int8_fast and not empty.bf16_fast and empty.flags == frozenset()
    # Arm's Features line is read, but its names are not the x86 ones this engine relies on
    arm = parse_cpuinfo(ARM)
    assert "asimddp" in arm.flags and not arm.int8_fast


def test_this_machine_is_described():
    me = this_cpu().describe()
    assert set(me) == {"model", "flags", "int8_fast", "bf16_fast"} and me["model"]


def test_run_json_and_summary_say_which_precision_ran_and_why(tmp_path, tiny_models_dir):
    import json

    from conftest import dev_images, run_cli

    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        ["screen", dev_images(1)[0], "--out", out, "--models", tiny_models_dir, "--no-progress"]
    )
    assert code in (0, 3), stdout
    run = json.loads((out / "run.json").read_text())
    assert run["cpu"] == this_cpu().describe()
    for role in ("segmenter", "classifier"):
        why = run["models"][role]["precision_why"]
        assert why.startswith(run["models"][role]["precision"] + ":")
        assert f"{role} precision" in stdout
