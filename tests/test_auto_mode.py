"""step_dispatch="auto": on CUDA step-level policies get step dispatch, everything else in-graph guards."""
from __future__ import annotations

import logging

import pytest

import fx_fastcache as fastcache
import fx_fastcache.auto_mode as auto_mode
from fx_fastcache.auto_mode import choose_step_dispatch
from fx_fastcache.tiny_pipelines import make_tiny_pipeline
from fx_fastcache.zoo import make_tiny


@pytest.mark.parametrize("policy,expected", [("step_forecast", "reduce-overhead"), ("teacache", "reduce-overhead"),
                                             ("first_block_cache", "reduce-overhead"), ("schedule", "reduce-overhead"),
                                             ("chi2", None)])
def test_rule(policy, expected):
    cfg = fastcache.FastCacheConfig(policy=policy)
    assert choose_step_dispatch(True, cfg)[0] == expected
    assert choose_step_dispatch(False, cfg)[0] is None
    assert choose_step_dispatch(True, cfg.replace(enable_token_routing=True))[0] is None


def test_optimize_on_cuda_picks_step_dispatch_and_logs_why(monkeypatch, caplog):
    monkeypatch.setattr(auto_mode, "model_is_cuda", lambda model: True)  # the device check, on a CPU machine
    tm = make_tiny("tiny-dit")
    with caplog.at_level(logging.INFO, logger="fx_fastcache.auto_mode"):
        opt = fastcache.optimize(tm.model, backend="eager")
    assert opt._dispatch_mode == "reduce-overhead"
    lines = [r.getMessage() for r in caplog.records if r.name == "fx_fastcache.auto_mode"]
    assert len(lines) == 1 and "step_dispatch='reduce-overhead'" in lines[0] and "step_forecast" in lines[0]
    assert fastcache.optimize(tm.model, backend="eager", policy="chi2")._dispatch_mode is None
    assert fastcache.optimize(tm.model, backend="eager", step_dispatch=None)._dispatch_mode is None  # explicit wins
    tp = make_tiny_pipeline("dit")
    assert fastcache.enable_fastcache(tp.pipe, backend="eager")._dispatch_mode == "reduce-overhead"


def test_cpu_default_is_in_graph_guards(caplog):
    tm = make_tiny("tiny-dit")
    with caplog.at_level(logging.INFO, logger="fx_fastcache.auto_mode"):
        opt = fastcache.optimize(tm.model, backend="eager")
    assert opt._dispatch_mode is None
    assert any("in-graph guards (not on CUDA" in r.getMessage() for r in caplog.records)
