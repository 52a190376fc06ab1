"""Run-time controls on an optimized model: ``opt.to``, structural ``configure``, ``max_skip_steps``,
the device check of the inputs and the calibration file's shape check."""
from __future__ import annotations

import contextlib
import copy
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fx_fastcache as fastcache
from fx_fastcache.zoo import make_tiny

from conftest import TIMESTEPS, calibrated_file, first, run_loop


def _approximated_per_block(opt) -> list[int]:
    return [b["approximated"] for b in fastcache.get_cache_statistics(opt)["per_block"]]


def test_to_dtype_recaptures_and_matches_the_converted_model():
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False)
    run_loop(opt, tm, TIMESTEPS[:2])
    assert fastcache.get_cache_statistics(opt)["graphs"] == 1
    opt.to(torch.float64)
    assert fastcache.get_cache_statistics(opt)["graphs"] == 0  # the float32 graph is gone
    assert opt.dtype == torch.float64
    with torch.no_grad():
        for t in TIMESTEPS[:3]:
            kw = _as(tm.make_inputs(t, 2), torch.float64)
            torch.testing.assert_close(first(opt(**kw)), first(tm.model(**kw)), rtol=0, atol=0)
    assert fastcache.get_cache_statistics(opt)["graphs"] == 1


def _as(kw: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}


def test_to_where_the_model_is_keeps_its_graphs():
    """accelerate's offload hooks call ``.to(device)`` at every forward: a no-op move used to drop the graphs."""
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False)
    run_loop(opt, tm, TIMESTEPS[:2])
    (entry,) = opt.entries()
    opt.to("cpu")
    opt.float()
    assert opt.entries() == [entry]


@pytest.mark.parametrize("execution", ["in_graph", "step_dispatch"])
def test_graphs_are_kept_per_placement_and_run_again_when_the_model_comes_back(execution, caplog):
    """Model CPU offload moves the transformer to the GPU at every pipeline call and back after it: each move
    dropped the graphs, so every call exported (and compiled) again.  The graphs of the placement left are kept
    and run again, as a new generation, when the model comes back.  (One device here: dtype moves stand in,
    float32 -> float64 -> float32, which round-trips exactly.)"""
    tm = make_tiny("tiny-dit")
    cfg = dict(backend="eager", cache_ratio_threshold=1e6, warmup_steps=2, execution=execution)
    if execution == "step_dispatch":
        cfg["dispatch_compile"] = "eager"
    ref = fastcache.optimize(copy.deepcopy(tm.model).double(), **cfg)
    inputs64 = [_as(tm.make_inputs(t, 2), torch.float64) for t in TIMESTEPS]
    with torch.no_grad():
        want64 = [first(ref(**kw)) for kw in inputs64]
    opt = fastcache.optimize(tm.model, **cfg)
    want = run_loop(opt, tm)
    assert fastcache.get_cache_statistics(opt)["blocks_approximated"] > 0
    (entry,) = opt.entries()
    entry64 = []
    with caplog.at_level(logging.INFO, logger="fx_fastcache"):
        for _ in range(2):
            opt.to(torch.float64)
            assert opt.entries() == entry64  # its own graphs: none at the first visit, kept from the second
            with torch.no_grad():
                for kw, w in zip(inputs64, want64):
                    torch.testing.assert_close(first(opt(**kw)), w, rtol=0, atol=0)
            entry64 = opt.entries()
            opt.to(torch.float32)
            assert opt.entries() == [entry]  # the same graph, not a new capture
            stats = fastcache.get_cache_statistics(opt)
            assert (stats["graphs"], stats["graphs_elsewhere"]) == (1, 1)
            for a, b in zip(run_loop(opt, tm), want):  # a new generation: the same images
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    logged = [r.getMessage() for r in caplog.records]
    assert sum("capturing" in m for m in logged) == 1  # float64's, at its first visit
    # step dispatch's compiled pieces are kept with the graphs: split once, for float64
    assert sum("step dispatch split the graph" in m for m in logged) == (execution == "step_dispatch")


def test_a_kept_graph_follows_what_changed_while_the_model_was_away():
    """Run-time knobs configured and a calibration fitted while the model was elsewhere reach the graphs kept for
    where it comes back: the same images as a model that captured only after both."""
    tm = make_tiny("tiny-dit")
    ref_model = copy.deepcopy(tm.model)
    kept = fastcache.optimize(tm.model, backend="eager", warmup_steps=2)
    run_loop(kept, tm)  # captures at float32, then leaves
    fresh = fastcache.optimize(ref_model, backend="eager", warmup_steps=2)
    for opt in (kept, fresh):
        opt.to(torch.float64)
        with fastcache.calibrate(opt), torch.no_grad():
            for t in TIMESTEPS:
                opt(**_as(tm.make_inputs(t, 2), torch.float64))
        fastcache.configure(opt, cache_ratio_threshold=0.2, max_skip_steps=1)
        opt.to(torch.float32)
    (entry,) = kept.entries()
    want = run_loop(fresh, tm)
    assert kept.entries() == [entry]
    for a, b in zip(run_loop(kept, tm), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    stats = [fastcache.get_cache_statistics(m)["blocks_approximated"] for m in (kept, fresh)]
    assert stats[0] == stats[1] > 0


def test_structural_configure_recaptures_with_the_new_fallback():
    tm = make_tiny("tiny-custom")
    opt = fastcache.optimize(tm.model, backend="eager", fallback="forecast", cache_ratio_threshold=10.0)
    run_loop(opt, tm)
    (entry,) = opt.entries()
    assert type(entry.guards[0].fallback).__name__ == "ForecastFallback"
    fastcache.configure(opt, fallback="residual")
    assert opt.entries() == []  # re-captured at the next call
    run_loop(opt, tm)
    (entry,) = opt.entries()
    assert type(entry.guards[0].fallback).__name__ == "ResidualFallback"
    assert fastcache.get_cache_statistics(opt)["blocks_approximated"] > 0
    fastcache.configure(opt, enable_block_approx=False)  # a run-time field: same graph
    assert opt.entries() == [entry]
    fastcache.reset(opt)
    ref = run_loop(tm.model, tm)
    for a, b in zip(run_loop(opt, tm), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("max_skip,expected", [(0, 4), (1, 2), (2, 3)])
def test_max_skip_steps_bounds_consecutive_skips(max_skip, expected):
    """6 steps, warm-up 2, a threshold that skips whatever it may: steps 2-5 skip unless capped."""
    tm = make_tiny("tiny-custom")
    opt = fastcache.optimize(tm.model, backend="eager", fallback="residual", cache_ratio_threshold=10.0,
                             max_skip_steps=max_skip)
    run_loop(opt, tm)
    assert _approximated_per_block(opt) == [expected] * 3


def test_input_on_another_device_is_an_error_naming_both():
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager")
    kw = tm.make_inputs(1000.0, 2)
    kw["hidden_states"] = kw["hidden_states"].to("meta")
    with pytest.raises(ValueError, match=r"'hidden_states' is on meta but the model is on cpu"):
        opt(**kw)
    run_loop(opt, tm, TIMESTEPS[:2])  # the model still works


def test_calibration_file_with_a_wrong_shape_is_refused_and_changes_nothing(tmp_path):
    tm = make_tiny("tiny-custom")
    opt, path = calibrated_file(tm, tmp_path / "calib.safetensors", fallback="residual_linear", policy="schedule")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    victim = sorted(k for k in tensors if k.endswith(".A"))[-1]
    tensors[victim] = tensors[victim][:-1]
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    before = {k: v.clone() for k, v in opt.store.tensors.items()}
    with pytest.raises(ValueError, match=rf"bad.safetensors.*{victim}.*has shape"):
        fastcache.load_calibration(opt, bad)
    for k, v in before.items():  # nothing was half-loaded
        torch.testing.assert_close(opt.store.tensors[k], v, rtol=0, atol=0)
    fastcache.load_calibration(opt, path)  # the good file still loads


# -- classifier-free guidance as two calls per step (a repeated timestep and input) ---------------
def _two_branch_inputs(tm, t):
    kw = tm.make_inputs(t, 1)
    uncond = dict(kw, encoder_hidden_states=torch.zeros_like(kw["encoder_hidden_states"]))
    return kw, uncond


def test_cfg_as_two_calls_per_step_approximates_nothing_and_warns(caplog):
    """Cond then uncond on the same latents and timestep shared one state: PixArt's block-0 input
    depends on the timestep only, so the uncond call got the cond call's residual (the guidance
    vanished).  Such a repeat now computes everything until the next generation, and says so."""
    tm = make_tiny("tiny-pixart")
    opt = fastcache.optimize(tm.model, backend="eager", cache_ratio_threshold=1e9, warmup_steps=1)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="fx_fastcache"):
        for t in TIMESTEPS:
            for kw in _two_branch_inputs(tm, t):
                torch.testing.assert_close(first(opt(**kw)), first(tm.model(**kw)))
    assert fastcache.get_cache_statistics(opt)["block_approx_ratio"] == 0.0
    assert "repeated the previous call's timestep and input" in caplog.text and "cache_context" in caplog.text
    with torch.no_grad(), pytest.raises(RuntimeError, match="would fit both branches' calls as one sequence"):
        with fastcache.calibrate(opt):  # a fit on both branches' calls as one sequence
            for t in TIMESTEPS:
                for kw in _two_branch_inputs(tm, t):
                    opt(**kw)


@pytest.mark.parametrize("cond_context", ["cond", None], ids=["both-named", "cond-outside"])
def test_cfg_branches_in_cache_contexts_keep_one_state_each(cond_context):
    """``opt.cache_context(name)`` of a bare optimized model was the wrapped diffusers model's (a
    no-op for FastCache): each branch now has its own state, as two models would; also when one
    branch runs outside any context (its calls keep the first call's context), and in a copy,
    which starts with no state of either branch."""
    tm = make_tiny("tiny-pixart")
    cfg = dict(backend="eager", cache_ratio_threshold=1e9)
    opt = fastcache.optimize(tm.model, **cfg)
    alone = [fastcache.optimize(tm.model, **cfg) for _ in range(2)]

    def step(model, t, check, order=slice(None)):
        for name, kw, single in list(zip((cond_context, "uncond"), _two_branch_inputs(tm, t), alone))[order]:
            with model.cache_context(name) if name else contextlib.nullcontext():
                out = first(model(**kw))
            check(out, single, kw)

    with torch.no_grad():
        for t in TIMESTEPS:
            step(opt, t, lambda out, single, kw: torch.testing.assert_close(out, first(single(**kw))))
        twin = copy.deepcopy(opt)  # a copy's first call computes: no banked context state
        step(twin, TIMESTEPS[-1] - 100.0, lambda out, single, kw: torch.testing.assert_close(out, first(tm.model(**kw))),
             order=slice(None, None, -1))  # the live context first: the other one was banked in the original
    assert fastcache.get_cache_statistics(opt)["block_approx_ratio"] > 0


def test_same_timestep_on_new_latents_is_no_repeat():
    """Heun evaluates a timestep twice on different latents: that still approximates."""
    tm = make_tiny("tiny-pixart")
    opt = fastcache.optimize(tm.model, backend="eager", cache_ratio_threshold=1e9)
    with torch.no_grad():
        for t in TIMESTEPS:
            kw = tm.make_inputs(t, 1)
            for dx in (0.0, 1e-3):
                opt(**dict(kw, hidden_states=kw["hidden_states"] + dx))
    assert fastcache.get_cache_statistics(opt)["block_approx_ratio"] > 0


def test_repeat_under_a_schedule_dispatched_on_the_host_is_an_error():
    """The host-side schedule cannot see a repeat (it never reads the graph): refuse, not replay;
    also when the model ran a generation of single calls before (the check ran once per graph)."""
    tm = make_tiny("tiny-pixart")
    opt = fastcache.optimize(tm.model, backend="eager", policy="schedule", execution="step_dispatch",
                             dispatch_compile="eager")
    fastcache.set_schedule(opt, torch.ones(len(TIMESTEPS) * 2, 2, dtype=torch.bool))
    run_loop(opt, tm, batch=1)
    fastcache.reset(opt)
    with torch.no_grad(), pytest.raises(RuntimeError, match="repeated the previous call's timestep"):
        for t in TIMESTEPS:
            for kw in _two_branch_inputs(tm, t):
                opt(**kw)


def test_per_token_timesteps_use_the_generated_tokens_level():
    """Image-to-video pipelines (Wan 2.2 i2v, LTX i2v) pass one timestep per token with the
    conditioning frame at 0: the clock read that 0 at every step, so the step rule never
    approximated and the forecast lost its slope in t."""
    tm = make_tiny("tiny-wan")
    opt = fastcache.optimize(tm.model, backend="eager", cache_ratio_threshold=50.0)
    x = tm.make_inputs(999.0, 2)
    with torch.no_grad():
        for t in TIMESTEPS:
            ts = torch.full((2, 32), t)
            ts[:, :16] = 0.0  # the first latent frame is the condition
            opt(**dict(x, timestep=ts))
    assert float(opt.last_entry().clock.t_last) == TIMESTEPS[-1]
    assert fastcache.get_cache_statistics(opt)["block_approx_ratio"] > 0


def test_a_model_without_a_timestep_repeats_by_its_input():
    """Without a timestep the clock counts calls, which never repeat: CFG as two calls on the same
    input shared one cache, silently."""
    from fx_fastcache.zoo import CustomDiT

    class NoTimestep(CustomDiT):
        def forward(self, x, context):
            return super().forward(x + context, torch.zeros(x.shape[0]))

    torch.manual_seed(0)
    model = NoTimestep().eval()
    opt = fastcache.optimize(model, backend="eager", cache_ratio_threshold=1e9)
    x = torch.randn(2, 10, 4)
    with torch.no_grad():
        for step in range(6):
            for context in (torch.ones(2, 10, 4), torch.zeros(2, 10, 4)):
                torch.testing.assert_close(opt(x, context), model(x, context))
            x = x * 0.98
    assert fastcache.get_cache_statistics(opt)["block_approx_ratio"] == 0.0


def test_a_generic_models_timestep_may_be_called_sigma():
    """A generic model's timestep was found only under the name ``timestep``: with ``sigma`` a
    second generation continued the first one's cache."""
    from fx_fastcache.zoo import CustomDiT

    class SigmaDiT(CustomDiT):
        def forward(self, x, sigma):
            return super().forward(x, sigma)

    torch.manual_seed(0)
    opt = fastcache.optimize(SigmaDiT().eval(), backend="eager", cache_ratio_threshold=1e9)
    assert opt.spec.timestep_arg == "sigma"
    x = torch.randn(2, 10, 4)
    with torch.no_grad():
        runs = [[opt(x, torch.full((2,), t)) for t in TIMESTEPS] for _ in range(2)]
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b)


def test_diffusers_cache_hooks_are_refused():
    """A diffusers cache on the same model crashed the capture or froze its first decision (and left
    fake tensors in its hooks): refused up front."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    tm = make_tiny("tiny-wan")
    apply_first_block_cache(tm.model, FirstBlockCacheConfig(threshold=0.05))
    with pytest.raises(ValueError, match=r"diffusers cache hooks \['fbc_"):
        fastcache.optimize(tm.model, backend="eager")


def _hooked_and_twin(family: str):
    """A tiny model under diffusers' layerwise casting (float8 storage, bfloat16 compute), and its twin:
    the same float8-rounded weights held in bfloat16, no hooks."""
    tm = make_tiny(family)
    twin = copy.deepcopy(tm.model).to(torch.bfloat16)
    tm.model.to(torch.bfloat16).enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                                         compute_dtype=torch.bfloat16)
    with torch.no_grad():
        for (name, p), q in zip(tm.model.named_parameters(), twin.parameters()):
            q.copy_(p.to(torch.bfloat16))
    return tm, twin


@pytest.mark.parametrize("family", ["tiny-wan"])  # (every family: checked by a hunt, not in the suite)
def test_layerwise_casting_is_traced_with_its_casts_in_the_blocks(family):
    """diffusers' layerwise casting (float8 weights, cast up in a hook around each layer) crashed the capture
    ("Couldn't swap Linear.weight") and was refused; now each layer's cast is in the graph, inside its block:
    the optimized model equals the hooked model with approximation off, equals its bfloat16 twin with
    forced forecasts, keeps the weights in float8, and a skipped block casts nothing."""
    from fx_fastcache import graph_protocol as gp

    tm, twin = _hooked_and_twin(family)
    fp8 = {n for n, p in tm.model.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert fp8

    def inputs(t):
        kw = tm.make_inputs(t, 2)
        return {k: v.to(torch.bfloat16) if k != "timestep" and torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in kw.items()}

    forced = dict(backend="eager", cache_ratio_threshold=1e6, warmup_steps=2)
    off = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False)
    opt, ref = fastcache.optimize(tm.model, **forced), fastcache.optimize(twin, **forced)
    assert off.dtype == torch.bfloat16  # diffusers reads the hook's compute dtype too
    with torch.no_grad():
        for t in TIMESTEPS[:4]:
            torch.testing.assert_close(first(off(**inputs(t))), first(tm.model(**inputs(t))), rtol=0, atol=0)
            torch.testing.assert_close(first(opt(**inputs(t))), first(ref(**inputs(t))), rtol=0, atol=0)
    assert fastcache.get_cache_statistics(opt)["blocks_approximated"] > 0
    assert {n for n, p in tm.model.named_parameters() if p.dtype == torch.float8_e4m3fn} == fp8
    gm = opt.last_entry().gm
    casts = lambda m: sum(n.target in (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default)  # noqa: E731
                          for n in m.graph.nodes)
    assert casts(getattr(gm, gp.block_branch_name(0))) > 0 and casts(getattr(gm, gp.fallback_branch_name(0))) == 0


def test_layerwise_casting_enabled_after_a_capture_recaptures():
    """(It was refused at the next call.)"""
    tm = make_tiny("tiny-wan")
    opt = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False)
    with torch.no_grad():
        opt(**tm.make_inputs(999.0, 1))
        tm.model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
        torch.testing.assert_close(opt(**tm.make_inputs(900.0, 1)), tm.model(**tm.make_inputs(900.0, 1)),
                                   rtol=0, atol=0)  # re-captured: the old graph would mix dtypes


class _JointBlock(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.mod, self.fc, self.fe = torch.nn.Linear(d, 2 * d), torch.nn.Linear(d, d), torch.nn.Linear(d, d)

    def forward(self, hidden_states, encoder_hidden_states, temb):
        a, b = self.mod(temb).unsqueeze(1).chunk(2, -1)
        h = self.fc(torch.cat([encoder_hidden_states, hidden_states], 1) * (1 + a) + b)
        n = encoder_hidden_states.shape[1]
        return hidden_states + h[:, n:], encoder_hidden_states + self.fe(h[:, :n])


class _JointDiT(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.pi, self.te, self.enc, self.po = (torch.nn.Linear(4, d), torch.nn.Linear(1, d), torch.nn.Linear(4, d),
                                               torch.nn.Linear(d, 4))
        self.blocks = torch.nn.ModuleList([_JointBlock(d) for _ in range(3)])

    def forward(self, x, timestep, context):
        temb = torch.nn.functional.silu(self.te(timestep.view(-1, 1) / 1000))
        h, e = self.pi(x), self.enc(context)
        for block in self.blocks:
            h, e = block(h, e, temb)
        return self.po(h)


def test_generic_blocks_returning_two_streams_are_declared_with_a_block_list_spec():
    """Blocks returning two streams (as SD3's) failed with an internal error whenever a block was
    guarded alone; ``blocks=BlockListSpec(...)`` declares the second stream, and the error says so."""
    torch.manual_seed(0)
    m = _JointDiT().eval()
    x, ctx = torch.randn(2, 10, 4), torch.randn(2, 3, 4)
    with torch.no_grad(), pytest.raises(RuntimeError, match="BlockListSpec"):
        fastcache.optimize(m, backend="eager", span="block")(x, torch.full((2,), 999.0), ctx)
    joint = ("hidden_states", "encoder_hidden_states")
    spec = fastcache.BlockListSpec("blocks", joint, joint)
    exact = fastcache.optimize(m, backend="eager", blocks=spec, span="block", enable_block_approx=False)
    skips = fastcache.optimize(m, backend="eager", blocks=spec, span="block", cache_ratio_threshold=1e9)
    with torch.no_grad():
        for t in TIMESTEPS:
            ts = torch.full((2,), t)
            torch.testing.assert_close(exact(x, ts, ctx), m(x, ts, ctx))
            assert torch.isfinite(skips(x, ts, ctx)).all()
    assert fastcache.get_cache_statistics(skips)["block_approx_ratio"] > 0
    with pytest.raises(ValueError, match="stream_inputs must be arguments"):
        fastcache.optimize(m, blocks=fastcache.BlockListSpec("blocks", ("nope",), ("nope",)))
    swapped = fastcache.BlockListSpec("blocks", joint, joint[::-1])  # outputs named in the wrong order
    with torch.no_grad(), pytest.raises(RuntimeError, match="in the order it returns them"):
        fastcache.optimize(m, backend="eager", blocks=swapped, span="block")(x, torch.full((2,), 999.0), ctx)


def test_layerwise_casting_beside_another_hook_on_a_layer_is_refused():
    """The capture bypasses a cast layer's hooks; another hook there would be lost silently."""
    from diffusers.hooks import HookRegistry, ModelHook

    tm = make_tiny("tiny-wan")
    tm.model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    HookRegistry.check_if_exists_or_initialize(tm.model.blocks[0].ffn.net[2]).register_hook(ModelHook(), "mine")
    opt = fastcache.optimize(tm.model, backend="eager")
    with torch.no_grad(), pytest.raises(ValueError, match=r"\['layerwise_casting', 'mine'\] beside layerwise casting"):
        opt(**tm.make_inputs(999.0, 1))


def test_layerwise_casting_with_token_routing():
    """Routing re-exports each block for fewer tokens: that export crashed on the casting hook."""
    tm, twin = _hooked_and_twin("tiny-wan")

    def inputs(t):
        kw = tm.make_inputs(t, 2)
        return {k: v.to(torch.bfloat16) if k != "timestep" and torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in kw.items()}

    cfg = dict(backend="eager", enable_block_approx=False, enable_token_routing=True, motion_threshold=0.5,
               warmup_steps=2)
    opt, ref = fastcache.optimize(tm.model, **cfg), fastcache.optimize(twin, **cfg)
    with torch.no_grad():
        for t in TIMESTEPS[:3]:  # two warm-up steps, then one routed
            torch.testing.assert_close(first(opt(**inputs(t))), first(ref(**inputs(t))), rtol=0, atol=0)
    assert fastcache.get_cache_statistics(opt)["spatial_approx_ratio"] > 0
