"""step_dispatch="auto": on CUDA step-level policies get step dispatch, everything else in-graph guards."""
from __future__ import annotations

import logging

import pytest
import torch

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
    assert opt.dispatch_compile == "reduce-overhead"
    lines = [r.getMessage() for r in caplog.records if r.name == "fx_fastcache.auto_mode"]
    assert len(lines) == 1 and "step_dispatch='reduce-overhead'" in lines[0] and "step_forecast" in lines[0]
    assert fastcache.optimize(tm.model, backend="eager", policy="chi2").dispatch_compile is None
    assert fastcache.optimize(tm.model, backend="eager", step_dispatch=None).dispatch_compile is None  # explicit wins
    tp = make_tiny_pipeline("dit")
    assert fastcache.enable_fastcache(tp.pipe, backend="eager").dispatch_compile == "reduce-overhead"


def test_cpu_default_is_in_graph_guards(caplog):
    tm = make_tiny("tiny-dit")
    with caplog.at_level(logging.INFO, logger="fx_fastcache.auto_mode"):
        opt = fastcache.optimize(tm.model, backend="eager")
    assert opt.dispatch_compile is None
    assert any("in-graph guards (not on CUDA" in r.getMessage() for r in caplog.records)


def test_execution_names_and_their_former_spelling(monkeypatch):
    tm = make_tiny("tiny-dit")
    assert fastcache.optimize(tm.model, backend="eager", execution="step_dispatch", dispatch_compile="eager") \
        .dispatch_compile == "eager"
    assert fastcache.optimize(tm.model, backend="eager", execution="in_graph").dispatch_compile is None
    assert fastcache.optimize(tm.model, backend="eager", step_dispatch="eager").dispatch_compile == "eager"
    with pytest.raises(ValueError, match="execution='fast' is not supported"):
        fastcache.optimize(tm.model, backend="eager", execution="fast")
    with pytest.raises(ValueError, match="dispatch_compile='fast' is not supported"):
        fastcache.optimize(tm.model, backend="eager", execution="step_dispatch", dispatch_compile="fast")
    with pytest.raises(ValueError, match="not both"):
        fastcache.optimize(tm.model, backend="eager", execution="in_graph", step_dispatch=None)
    monkeypatch.setattr(auto_mode, "model_is_cuda", lambda model: True)
    assert fastcache.optimize(tm.model, backend="eager").dispatch_compile == "reduce-overhead"
    assert fastcache.optimize(tm.model, backend="eager", dispatch_compile="default").dispatch_compile == "default"


def test_auto_is_decided_again_when_the_model_moves_or_its_policy_changes(monkeypatch):
    """``enable_fastcache(pipe)`` then ``pipe.to("cuda")`` (or ``optimize`` then ``.to``) used to keep the
    choice made on the CPU: the slow in-graph guards on the GPU.  An explicit choice is kept."""
    tp = make_tiny_pipeline("dit")
    piped = fastcache.enable_fastcache(tp.pipe, backend="eager")
    tm = make_tiny("tiny-dit")
    auto = fastcache.optimize(tm.model, backend="eager")
    fixed = fastcache.optimize(make_tiny("tiny-dit").model, backend="eager", execution="in_graph")
    compiled = fastcache.optimize(make_tiny("tiny-dit").model, backend="eager", dispatch_compile="eager")  # auto
    assert [m.dispatch_compile for m in (piped, auto, fixed, compiled)] == [None] * 4  # on the CPU
    monkeypatch.setattr(auto_mode, "model_is_cuda", lambda model: True)  # what .to("cuda") would make true
    tp.pipe.to(torch.float64)
    for m in (auto, fixed, compiled):
        m.to(torch.float64)
    assert [m.dispatch_compile for m in (piped, auto, fixed, compiled)] == ["reduce-overhead", "reduce-overhead",
                                                                            None, "eager"]
    fastcache.configure(auto, policy="chi2")  # decides per block: in-graph guards, not a refusal
    assert auto.dispatch_compile is None
    fastcache.configure(auto, policy="step_forecast")
    assert auto.dispatch_compile == "reduce-overhead"
    explicit = fastcache.optimize(tm.model, backend="eager", execution="step_dispatch")
    with pytest.raises(ValueError, match="policy='chi2' decides each block"):
        fastcache.configure(explicit, policy="chi2")
