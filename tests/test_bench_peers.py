"""diffusers' TaylorSeer and MagCache as benchmark peers: their computations are counted honestly
(pre-hooks on each block's attention agree with TaylorSeer's documented schedule), MagCache runs
on ratios from its own calibration run, and the peers' hook state is measured."""
from __future__ import annotations

import pytest
import torch

from fx_fastcache.bench import parse_method, peers
from fx_fastcache.bench.peers import (diffusers_mag_cache, diffusers_mag_ratios, diffusers_taylorseer,
                                      taylorseer_computed_steps)
from fx_fastcache.zoo import make_tiny


def _run(tiny, model, steps):
    outs = []
    with torch.no_grad():
        for i in range(steps):
            out = model(**tiny.make_inputs(1000.0 * (1 - i / steps), 2))
            outs.append(out[tiny.output_index])
    return outs


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-sd3"])
@pytest.mark.parametrize("interval,before", [(2, 3), (3, 3), (5, 2), (4, 1)])
def test_taylorseer_counted_computations_match_its_schedule(name, interval, before):
    tiny = make_tiny(name)
    steps = 12
    run = diffusers_taylorseer(tiny.model, interval, order=1, before=before)
    _run(tiny, run.model, steps)
    expected = len(taylorseer_computed_steps(steps, interval, before))
    # SD3's last block returns (None, hidden states): TaylorSeer cannot cache it, it always computes
    last = steps if name == "tiny-sd3" else expected
    assert run.calls[0] == steps
    assert run.computed == [expected] * (len(run.computed) - 1) + [last]
    assert run.replaced_fraction == pytest.approx(1 - (sum(run.computed)) / (steps * len(run.computed)))
    assert run.replaced_fraction > 0


def test_taylorseer_state_is_its_taylor_factors():
    tiny = make_tiny("tiny-dit", layers=2)
    run = diffusers_taylorseer(tiny.model, 3, order=2, before=3)
    _run(tiny, run.model, 6)
    # 2 blocks x (order + 1) factors x one block output (2, 16 tokens, 16) in float32
    assert run.state_bytes == 2 * 3 * 2 * 16 * 16 * 4


def test_taylorseer_leaves_the_model_untouched_and_matches_it_while_computing():
    tiny = make_tiny("tiny-dit")
    ref = _run(tiny, tiny.model, 3)
    run = diffusers_taylorseer(tiny.model, 2, order=1, before=3)
    got = _run(tiny, run.model, 3)  # steps 0-2 all compute
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    assert not hasattr(tiny.model.transformer_blocks[0], "_diffusers_hook")


def test_magcache_calibrates_then_skips_whole_steps():
    tiny = make_tiny("tiny-dit")
    steps = 10
    ratios = diffusers_mag_ratios(tiny.model, lambda m: _run(tiny, m, steps), steps)
    assert len(ratios) == steps and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    none = diffusers_mag_cache(tiny.model, 0.0, ratios, steps)
    _run(tiny, none.model, steps)
    assert none.replaced_fraction == 0.0
    run = diffusers_mag_cache(tiny.model, 1e9, ratios, steps, max_skip_steps=3, retention_ratio=0.2)
    _run(tiny, run.model, steps)
    # retention 0.2 -> steps 0, 1 compute; then 3 skipped, 1 computed, ... : steps 5 and 9 compute
    assert run.computed == [4] * len(run.computed)
    assert run.state_bytes > 0


def test_peer_options_parse_and_refuse_unknown_ones():
    m = parse_method("diffusers_taylorseer:order=2:before=2")
    assert m.kind == "diffusers_taylorseer" and dict(m.options) == {"order": 2, "before": 2}
    assert dict(parse_method("diffusers_magcache").options) == {"max_skip": 3, "retention": 0.2}
    with pytest.raises(ValueError, match="max_skip"):
        parse_method("diffusers_magcache:speed=2")
    m = parse_method("cache_dit:taylorseer=1")
    assert m.name == "cache_dit(taylorseer=1)" and dict(m.options)["taylorseer"] == 1
    assert dict(parse_method("cache_dit").options) == {"taylorseer": 0, "fn": 1, "bn": 0, "warmup": 2, "max_skip": 0}
    m = parse_method("cache_dit:fn=2:bn=1:max_skip=3")
    assert m.name == "cache_dit(fn=2,bn=1,max_skip=3)"
    with pytest.raises(ValueError, match="integer"):
        parse_method("cache_dit:fn=1.5")


@pytest.mark.parametrize("name", ["tiny-pixart", "tiny-sd3", "tiny-flux", "tiny-wan"])
def test_cache_dit_taylorseer_calibrator_forecasts_what_dbcache_reuses(name):
    """cache-dit's DBCache with its TaylorSeer calibrator (issue #13's third peer), with the block lists and
    forward patterns of cache-dit's own adapters: exact while nothing is skipped; the same blocks skipped with
    and without the calibrator, counted by the attention pre-hooks (F1B0: the first block of each list
    computes); the skipped steps' outputs differ from plain reuse; its state (cache context buffers, calibrator
    states) is measured.  (Its calibrator counts steps from −1 and forms a derivative only at its step 2 or
    later: four warm-up steps.)"""
    pytest.importorskip("cache_dit", reason="the peer needs `pip install cache-dit` (fx-fastcache[peers])")
    tiny = make_tiny(name)
    ref = _run(tiny, tiny.model, 8)
    firsts = [0] + ([len(tiny.model.transformer_blocks)] if name == "tiny-flux" else [])
    outs = {}
    for order in (0, 1):
        exact = peers.cache_dit_dbcache(tiny.model, threshold=0.0, steps=8, warmup_steps=4, taylorseer_order=order)
        assert all(torch.equal(a, b) for a, b in zip(_run(tiny, exact.model, 8), ref))
        run = peers.cache_dit_dbcache(tiny.model, threshold=10.0, steps=8, warmup_steps=4, taylorseer_order=order)
        outs[order] = _run(tiny, run.model, 8)
        assert run.computed == [8 if i in firsts else 4 for i in range(len(run.computed))], run.computed
        assert run.state_bytes > 0
        if name == "tiny-pixart":
            # the first block's residual and the stack's (DBCache); with the calibrator the stack's residual
            # lives in its Taylor state: the value and first derivative, and the previous value
            activation = 2 * 16 * 16 * 4  # batch 2 x 16 tokens x width 16, fp32
            assert run.state_bytes == (2 if order == 0 else 4) * activation, (order, run.state_bytes)
    same = [torch.equal(a, b) for a, b in zip(outs[0], outs[1])]
    assert same == [True] * 4 + [False] * 4, same  # the warm-up computes; every skipped step is forecast


def test_cache_dit_compute_blocks_and_skip_cap_are_cache_dits_own():
    """``fn``/``bn`` compute the first / last blocks of the list on every step; ``max_skip`` caps consecutive
    cached steps (cache-dit's ``max_continuous_cached_steps``); a setting that leaves nothing to cache is refused."""
    pytest.importorskip("cache_dit", reason="the peer needs `pip install cache-dit` (fx-fastcache[peers])")
    tiny = make_tiny("tiny-pixart", layers=5)
    run = peers.cache_dit_dbcache(tiny.model, threshold=10.0, steps=8, warmup_steps=2, fn=2, bn=1)
    _run(tiny, run.model, 8)
    assert run.computed == [8, 8, 2, 2, 8]
    run = peers.cache_dit_dbcache(tiny.model, threshold=10.0, steps=8, warmup_steps=2, max_skip=2)
    _run(tiny, run.model, 8)
    assert run.computed[1:] == [4] * 4  # steps 0, 1 (warm-up), then cached 2, 3, computed 4, cached 5, 6, computed 7
    with pytest.raises(ValueError, match="no block left to cache"):
        peers.cache_dit_dbcache(tiny.model, threshold=0.1, steps=8, fn=3, bn=2)


def test_cache_dit_refuses_dit_saying_why():
    pytest.importorskip("cache_dit", reason="the peer needs `pip install cache-dit` (fx-fastcache[peers])")
    with pytest.raises(ValueError, match="fails on DiT"):
        peers.cache_dit_dbcache(make_tiny("tiny-dit").model, threshold=0.1, steps=8)


def test_first_block_cache_counts_flux_single_blocks():
    """diffusers' First-Block-Cache caches both of Flux's block lists; counting only ``transformer_blocks``
    under-reported its replaced fraction (and FLOPs saved) on flux-mnist."""
    tm = make_tiny("tiny-flux", layers=2, single_layers=3)
    run = peers.diffusers_first_block_cache(tm.model, threshold=10.0)  # caches every step after the first
    m = run.model
    blocks = list(m.transformer_blocks) + list(m.single_transformer_blocks)
    real = [0] * len(blocks)
    for i, b in enumerate(blocks):  # independent count: attention runs only when its block computes
        b.attn.register_forward_pre_hook(lambda *_a, _i=i: real.__setitem__(_i, real[_i] + 1))
    with torch.no_grad():
        for t in (999.0, 700.0, 400.0, 100.0):
            m(**tm.make_inputs(t, 2))
    assert run.computed == real == [4] + [1] * (len(blocks) - 1)
    assert run.replaced_fraction == pytest.approx(1 - sum(real) / (4 * len(blocks)))
