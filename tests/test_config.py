"""engine/config.py: ScreenConfig checks every option when it is made, naming the option; the
decoder a run uses; --out and --threads as the commands check them."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import (
    MAX_THREADS_PER_CORE,
    ScreenConfig,
    check_threads,
    default_threads,
    max_threads,
    output_path,
)
from engine.errors import ConfigError

BASE = {"inputs": (Path("in"),), "out": Path("out")}


def test_decoder_auto_is_the_cpu_decoder_on_the_cpu_and_dali_on_the_gpu():
    from engine.config import CPU_DECODER, DECODERS, ScreenConfig, resolve_decoder

    assert CPU_DECODER in DECODERS and CPU_DECODER != "auto"
    assert resolve_decoder("auto", "cpu") == CPU_DECODER
    assert resolve_decoder("auto", "gpu") == "dali"
    for d in ("dali", "pillow", "pillow-draft"):
        assert resolve_decoder(d, "cpu") == d
        assert resolve_decoder(d, "gpu") == "dali"  # the GPU path always decodes with DALI
    assert ScreenConfig(inputs=(Path("x"),), out=Path("o")).decoder == "auto"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("inputs", (), "no INPUT given"),
        ("out", Path(" "), r"--out is empty \(only blanks\)"),
        ("precision", "int4", "--precision must be one of auto, fp32, fp16, w8, int8"),
        ("decoder", "magic", "--decoder must be one of auto, dali, pillow, pillow-draft"),
        ("batch_size", 0, "--batch-size must be between 1 and 4096, not 0"),
        ("batch_size", 4097, "--batch-size must be between 1 and 4096"),
        ("threshold", 1.5, r"--threshold must be a probability in \[0, 1\], not 1.5"),
        ("shard_size", 0, "--shard-size must be at least 1"),
        ("max_pixels", 0, "--max-pixels and --min-side must be positive"),
        ("min_side", 0, "--max-pixels and --min-side must be positive"),
        ("threads", 0, "--threads must be between 1 and"),
    ],
)
def test_screen_config_names_the_option_it_refuses(option, value, message):
    with pytest.raises(ConfigError, match=message):
        ScreenConfig(**BASE | {option: value})


def test_screen_config_json_is_plain_data():
    config = ScreenConfig(**BASE, models=Path("m"), threshold=0.3, threads=1)
    data = config.to_json()
    assert data["inputs"] == ["in"] and data["out"] == "out" and data["models"] == "m"
    assert data["threshold"] == 0.3 and data["decoder"] == "auto" and data["threads"] == 1
    assert ScreenConfig(**BASE).to_json()["models"] is None
    assert ScreenConfig(**BASE).threads == default_threads()


def test_output_path_refuses_an_empty_or_blank_value():
    assert output_path("out/dir") == Path("out/dir")
    with pytest.raises(ConfigError, match=r"--out is empty: name a directory"):
        output_path("")
    with pytest.raises(ConfigError, match=r"OUT is empty \(only blanks\)"):
        output_path("  ", "OUT")


def test_threads_are_bounded_by_the_usable_cores():
    cap = max_threads()
    assert cap == MAX_THREADS_PER_CORE * default_threads() and default_threads() >= 1
    assert check_threads(1) == 1 and check_threads(cap) == cap
    with pytest.raises(ConfigError, match=rf"--workers must be between 1 and {cap} \("):
        check_threads(cap + 1, "--workers")
