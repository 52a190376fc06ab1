"""TensorRT path: fails at once with what is missing; engine build and run only where TensorRT and CUDA exist."""
from __future__ import annotations

import pytest

from fx_fastcache.export.tensorrt import TensorRTUnavailable, missing_requirements, require_tensorrt

MISSING = missing_requirements()


@pytest.mark.skipif(not MISSING, reason="TensorRT and CUDA are available here")
def test_export_trt_fails_at_once_naming_what_is_missing(tmp_path, capsys):
    from fx_fastcache.cli.main import main

    rc = main(["export-trt", "--onnx", str(tmp_path / "M.onnx"), "--out", str(tmp_path / "M.plan")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "TensorRT cannot run here" in err
    for reason in MISSING:
        assert reason in err
    if any("tensorrt" in m for m in MISSING):
        assert "pip install tensorrt" in err
    assert not (tmp_path / "M.plan").exists()
    with pytest.raises(TensorRTUnavailable):
        require_tensorrt()


def test_profile_ranges_are_validated():
    import argparse

    from fx_fastcache.cli.export_trt import _range

    assert (_range("1:2:4").min, _range("1:2:4").opt, _range("1:2:4").max) == (1, 2, 4)
    assert _range("3").max == 3
    with pytest.raises(argparse.ArgumentTypeError, match="min <= opt <= max"):
        _range("4:2:1")
    with pytest.raises(argparse.ArgumentTypeError, match="MIN:OPT:MAX"):
        _range("a:b")


@pytest.mark.skipif(bool(MISSING), reason="; ".join(MISSING) or "n/a")
def test_engine_matches_onnxruntime(tmp_path):  # pragma: no cover - needs a GPU with TensorRT
    import torch

    from fx_fastcache.calibration import model_fingerprint
    from fx_fastcache.config import FastCacheConfig
    from fx_fastcache.export.onnx import export_onnx
    from fx_fastcache.export.runner import OnnxRunner
    from fx_fastcache.export.schedule import Schedule
    from fx_fastcache.export.tensorrt import TensorRTRunner, build_engine
    from fx_fastcache.zoo import make_tiny

    tm = make_tiny("tiny-dit")
    sched = Schedule([[False, False], [True, True], [True, False], [False, False]],
                     ["transformer_blocks.0", "transformer_blocks.1"], model_fingerprint(tm.model),
                     FastCacheConfig().to_dict())
    ex = export_onnx(tm.model, sched, tm.make_inputs(1000.0, 2), tmp_path / "m.onnx")
    plan = build_engine(ex.path, tmp_path / "m.plan")
    ort_runner, trt_runner = OnnxRunner(ex.path), TensorRTRunner(plan)
    for t in (1000.0, 750.0, 500.0, 250.0):
        kw = tm.make_inputs(t, 2)
        torch.testing.assert_close(trt_runner(**kw)[0], ort_runner(**kw)[0], atol=1e-3, rtol=1e-3)
