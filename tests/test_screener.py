"""engine/screener.py: the Screener picks the backend, the Stages and the preprocessor once, and
then only delegates (the whole path from samples to predictions runs in test_screen_e2e.py and,
with the GPU stages, in tests/stages/test_device_batch.py)."""

from __future__ import annotations

import numpy as np
from conftest import dev_images

from engine.pipeline import Preprocessor
from engine.pipeline_pil import PilPreprocessor
from engine.runtime.null import NullBackend
from engine.screener import Screener, embedding_dim, make_preprocessor, pick_stages
from engine.stages.cpu import CpuStages


def test_screener_reports_the_resolved_decoder(tiny_models):
    from engine.config import CPU_DECODER
    from engine.screener import Screener

    for asked, used in (("auto", CPU_DECODER), ("dali", "dali"), ("pillow", "pillow")):
        s = Screener(tiny_models, backend="onnxruntime", batch_size=2, threads=1, decoder=asked)
        try:
            assert s.decoder == used
        finally:
            s.close()


def test_host_backends_get_the_cpu_stages(tiny_models):
    seg, clf = NullBackend(tiny_models.segmenter), NullBackend(tiny_models.classifier)
    assert isinstance(pick_stages(tiny_models, seg, clf), CpuStages)
    assert embedding_dim(tiny_models) == 64


def test_make_preprocessor_gives_the_named_decoder(tiny_models):
    made = {
        name: make_preprocessor(tiny_models, name, device="cpu", batch_size=2, threads=1)
        for name in ("dali", "pillow", "pillow-draft")
    }
    try:
        assert type(made["dali"]) is Preprocessor
        assert isinstance(made["pillow"], PilPreprocessor) and made["pillow"].draft == 0
        assert isinstance(made["pillow-draft"], PilPreprocessor) and made["pillow-draft"].draft == 2
    finally:
        for p in made.values():
            p.close()


def test_a_batch_through_the_screener_times_each_step(tiny_models):
    from engine.io.reader import to_sample

    s = Screener(tiny_models, backend="null", batch_size=2, threads=1, decoder="pillow")
    try:
        assert (s.backend_name, s.device) == ("null", "cpu")
        samples = [to_sample(p.read_bytes()) for p in dev_images(2)]
        pre = s.preprocess_batch(samples)
        got = s.infer(pre)
        assert pre.ok == [0, 1] and got.prob.shape == (2,)
        np.testing.assert_allclose(np.linalg.norm(got.embedding, axis=1), 1.0, rtol=1e-5)
        assert set(s.clock.seconds) == {"decode+preprocess", "segment", "crop", "classify"}
    finally:
        s.close()
