"""What a call does *not* do on the host: walk the model's module tree on a cache-context switch,
re-read a schedule that did not change, capture graphs without saying so.  (No timing here: the
costs these guard against were measured side by side in one process, see the docstrings.)"""
from __future__ import annotations

import logging

import torch

import fx_fastcache as fastcache
from fx_fastcache.module import GRAPHS_WARNING
from fx_fastcache.step_dispatch import StepDispatch
from fx_fastcache.zoo import make_tiny


def test_context_switch_does_not_walk_the_model():
    """Each switch between cache contexts (cond/uncond: every call of a Wan or Flux true-CFG pipeline)
    walked every module of the captured graph, the model's tree included: 0.5 ms per call on a
    Wan-sized tree.  Only the FastCache children hold per-context state."""
    tm = make_tiny("tiny-flux")
    opt = fastcache.optimize(tm.model, backend="eager")
    inputs = tm.make_inputs(900.0, 2)
    with torch.no_grad(), opt.cache_context("cond"):
        opt(**inputs)
    (entry,) = opt.entries()

    def walked(*args, **kwargs):
        raise AssertionError("the model's module tree was walked")

    for name, child in entry.gm.named_children():
        if not name.startswith("fastcache_"):
            child.named_modules = walked
    with torch.no_grad():
        for ctx in ("uncond", "cond", "uncond"):
            with opt.cache_context(ctx):
                opt(**inputs)
    assert sorted(opt.contexts()) == ["cond", "uncond"]


def test_host_schedule_is_read_again_only_when_it_changed(monkeypatch):
    """A dispatcher that follows the installed table re-read it (one read per block) at every reset,
    i.e. at every pipeline call; now only after ``set_schedule`` or a calibration changed it."""
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager", policy="schedule")
    table = torch.zeros(4, 2, dtype=torch.bool)
    table[2, 0] = True
    fastcache.set_schedule(opt, table)
    disp = StepDispatch(opt, compile_mode="eager", decide="host")
    reads = []
    real = opt.installed_schedule
    monkeypatch.setattr(opt, "installed_schedule", lambda: reads.append(1) or real())
    for _ in range(3):
        disp.reset()
    assert reads == []
    table[3] = True
    fastcache.set_schedule(opt, table)
    reads.clear()  # (set_schedule reads it too)
    disp.reset()
    assert reads == [1] and (True, True) in disp.patterns


def test_many_input_signatures_warn(caplog):
    """Every new input shape captures (and compiles) another graph with its own state; past
    ``GRAPHS_WARNING`` of them a warning says so (it grew without a word)."""
    tm = make_tiny("tiny-custom")
    opt = fastcache.optimize(tm.model, backend="eager")
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="fx_fastcache"):
        for tokens in range(1, GRAPHS_WARNING + 1):
            fastcache.reset(opt)
            opt(x=torch.randn(1, tokens, 4), timestep=torch.tensor([900.0]))
            assert ("graphs captured" in caplog.text) == (tokens == GRAPHS_WARNING)
