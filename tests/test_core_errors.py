"""Bad input gets a clear error naming the offending value; state survives it."""
from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import fx_fastcache as fastcache
from fx_fastcache import FastCacheConfig
from fx_fastcache.step_dispatch import StepDispatch
from fx_fastcache.zoo import make_tiny

from conftest import first


class NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x)


class TwoLists(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.ModuleList([nn.Linear(4, 4)])
        self.up = nn.ModuleList([nn.Linear(4, 4)])

    def forward(self, x):
        return self.up[0](self.down[0](x))


def test_unsupported_model_names_what_was_found():
    with pytest.raises(ValueError, match=r"NoBlocks.*none.*blocks='attr.path'"):
        fastcache.optimize(NoBlocks())
    with pytest.raises(ValueError, match=r"several: \['down', 'up'\]"):
        fastcache.optimize(TwoLists())
    opt = fastcache.optimize(TwoLists(), backend="eager", blocks=["down", "up"], enable_block_approx=False)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(opt(x), opt.model(x))
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        fastcache.optimize(TwoLists(), blocks="nope")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastcache.optimize("not a model")


class ReadsValues(nn.Module):
    """A forward that branches on a tensor's value in Python: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    def forward(self, x, timestep):
        if float(x.abs().sum()) > len(set(x.flatten().tolist())):
            x = x * 2
        return self.blocks[0](x)


class _Cache:
    pass


class _AuxBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = x + self.fc(x)
        return y.mean(1), y  # (aux, hidden): the model drops aux


class DropsAux(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_AuxBlock() for _ in range(2)])

    def forward(self, x, timestep):
        for b in self.blocks:
            _, x = b(x)
        return x


class TakesAnObject(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    def forward(self, x, timestep, cache=None):
        return self.blocks[0](x)


def test_capture_errors_name_the_fix():
    """A block list given as a plain path whose blocks return two streams (Qwen-Image's return
    ``(encoder_hidden_states, hidden_states)``) names the BlockListSpec that fits the shapes; a forward
    that torch.export cannot trace says that the capture failed and what to check (the raw torch or
    diffusers error alone came out, e.g. Lumina2's "unhashable type: non-nested SymInt"), as a note on the
    same error (the model's own input checks keep their ValueError)."""
    tm = make_tiny("tiny-qwenimage")
    opt = fastcache.optimize(tm.model, backend="eager", blocks="transformer_blocks")
    with pytest.raises(RuntimeError, match=r"by shape, pass optimize\(model, blocks=fx_fastcache.BlockListSpec\("
                                           r"'transformer_blocks', stream_inputs=\('encoder_hidden_states', "
                                           r"'hidden_states'\), outputs=\('encoder_hidden_states', 'hidden_states'\)"):
        opt(**tm.make_inputs(900.0, 2))
    # the spec names each returned tensor by its position (an output the model drops is None)
    opt = fastcache.optimize(DropsAux(), backend="eager")
    with pytest.raises(RuntimeError, match=re.escape("outputs=(None, 'x')")):
        opt(torch.randn(2, 3, 4), torch.full((2,), 900.0))
    opt = fastcache.optimize(DropsAux(), backend="eager", enable_block_approx=False,
                             blocks=fastcache.BlockListSpec("blocks", stream_inputs=("x",), outputs=(None, "x")))
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(opt(x, torch.full((2,), 900.0)), opt.model(x, torch.full((2,), 900.0)))
    class Reversed(DropsAux):  # a list run bottom-up
        def forward(self, x, timestep):
            for b in reversed(self.blocks):
                _, x = b(x)
            return x

    spec = fastcache.BlockListSpec("blocks", stream_inputs=("x",), outputs=(None, "x"))
    opt = fastcache.optimize(Reversed(), backend="eager", blocks=spec)
    with pytest.raises(RuntimeError, match=r"block blocks.1 runs before blocks.0: the model calls its blocks in another "
                                           r"order than their list's"):  # (a raw FX error: used before defined)
        opt(x, torch.full((2,), 900.0))
    class Twice(DropsAux):  # one list run twice (weights shared between the passes)
        def forward(self, x, timestep):
            for _ in range(2):
                for b in self.blocks:
                    _, x = b(x)
            return x

    opt = fastcache.optimize(Twice(), backend="eager", blocks=spec)
    with pytest.raises(RuntimeError, match=r"block blocks.0 is called 2 times in one forward"):
        opt(x, torch.full((2,), 900.0))
    opt = fastcache.optimize(ReadsValues(), backend="eager")
    with pytest.raises(Exception) as caught:  # torch's own error, its type kept, with a note
        opt(torch.randn(2, 3, 4), torch.full((2,), 900.0))
    assert "raised while torch.export traced ReadsValues.forward for a call with tensors (2, 3, 4), (2,)" in \
        "".join(getattr(caught.value, "__notes__", []))
    with pytest.raises(TypeError, match=r"argument 'cache' holds a _Cache, which torch.export cannot take"):
        fastcache.optimize(TakesAnObject(), backend="eager")(torch.randn(2, 3, 4), torch.full((2,), 900.0),
                                                             cache=_Cache())  # (FLUX.2 Klein's kv_cache)
    wan_vace = make_tiny("tiny-wan-vace")  # the model's own input check: its ValueError, not another type
    with pytest.raises(ValueError, match="control_hidden_states_scale"):
        fastcache.optimize(wan_vace.model, backend="eager")(
            **dict(wan_vace.make_inputs(900.0, 2), control_hidden_states_scale=torch.ones(3)))


@pytest.mark.parametrize("field,value", [
    ("cache_ratio_threshold", -0.1), ("cache_ratio_threshold", float("nan")), ("significance_level", 0.0),
    ("significance_level", 1.5), ("motion_threshold", 1.0), ("fallback", "cubic"), ("policy", "magic"),
    ("warmup_steps", -1), ("warmup_steps", 1.5), ("enable_block_approx", "yes"), ("merge_ratio", 0.0),
    ("cache_ratio_threshold", 10**400), ("fallback", ["forecast"]), ("policy", None),
    ("warmup_steps", 10**400), ("max_skip_steps", 10**400), ("enable_token_merge", True),
], ids=lambda v: str(v)[:20])
def test_invalid_config_values(field, value):
    with pytest.raises(ValueError, match=rf"FastCacheConfig\.{field}="):
        FastCacheConfig(**{field: value})


def test_numbers_of_any_type_are_plain_numbers_in_the_config():
    """numpy scalars were accepted or refused depending on whether they subclass float / int."""
    cfg = FastCacheConfig(cache_ratio_threshold=np.float32(0.25), target_fraction=np.float64(0.6),
                          warmup_steps=np.int64(3), policy="planned")
    assert (type(cfg.cache_ratio_threshold), type(cfg.target_fraction), type(cfg.warmup_steps)) == (float, float, int)
    assert (cfg.cache_ratio_threshold, cfg.target_fraction, cfg.warmup_steps) == (0.25, 0.6, 3)
    assert FastCacheConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_unknown_config_field_and_backend():
    with pytest.raises(ValueError, match="unknown FastCacheConfig field"):
        fastcache.optimize(make_tiny("tiny-custom").model, cache_ratio=0.1)
    with pytest.raises(ValueError, match="backend='tensorrt'"):
        fastcache.optimize(make_tiny("tiny-custom").model, backend="tensorrt")
    with pytest.raises(ValueError, match="already optimized"):
        fastcache.optimize(fastcache.optimize(make_tiny("tiny-custom").model))


@pytest.mark.parametrize("policy,step_dispatch", [("step_forecast", None), ("step_forecast", "eager"),
                                                  ("schedule", "eager")],
                         ids=["in-graph", "step-dispatch-device", "step-dispatch-host"])
def test_shape_change_mid_generation_starts_a_new_generation(policy, step_dispatch, caplog):
    """A batch that changes inside a generation (Z-Image's cfg_truncation: 2 → 1 when CFG
    stops) starts a new generation: the new shapes' warm-up computes, and a graph that ran earlier in the
    generation does not forecast from its old cache across the steps it missed (it raised before)."""
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager", policy=policy, cache_ratio_threshold=1e6, warmup_steps=2,
                             step_dispatch=step_dispatch)
    if policy == "schedule":
        fastcache.set_schedule(opt, torch.ones(10, len(opt.block_names()), dtype=torch.bool))
    computed = []
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="fx_fastcache.module"):
        for t, batch in ((1000.0, 2), (900.0, 2), (800.0, 2), (700.0, 3), (600.0, 3), (500.0, 3), (400.0, 2),
                         (300.0, 2)):
            kw = tm.make_inputs(t, batch)
            computed.append(torch.allclose(first(opt(**kw)), first(tm.model(**kw)), atol=1e-5, rtol=0))
    assert computed == [True, True, False, True, True, False, True, True]
    said = [r for r in caplog.records if "middle of a generation" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.INFO]
    assert "(2, 4, 8, 8)" in said[0].getMessage() and "(3, 4, 8, 8)" in said[0].getMessage()
    assert fastcache.get_cache_statistics(opt)["blocks_approximated"] == 2 * len(opt.block_names())


@pytest.mark.parametrize("mode", ["in-graph", "step-dispatch-host", "user-step-dispatch"])
@pytest.mark.parametrize("second_batch", [2, 1], ids=["second-starts-at-2", "second-at-1"])
@pytest.mark.parametrize("change_at", [5])
def test_generations_that_change_shape_follow_the_schedule(mode, second_batch, change_at):
    """Two generations without a reset, the first dropping its batch 2 → 1 at step 4 (cfg_truncation), the
    second starting at batch 2 again or staying at 1.  A schedule dispatched on the host counts steps
    itself: the restart at step 4 left its counter short of the table's end, so it missed the second
    generation and skipped its warm-up step 1 (0.5–2.3 off the in-graph guards); a StepDispatch built by
    the user was not restarted at all (it skipped at the new graph's first call, with nothing cached)."""
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager", policy="schedule", warmup_steps=2,
                             step_dispatch="eager" if mode == "step-dispatch-host" else None)
    table = torch.zeros(8, len(opt.block_names()), dtype=torch.bool)
    table[[2, 3, 5, 6]] = True
    fastcache.set_schedule(opt, table)
    call = StepDispatch(opt, compile_mode="eager", decide="host") if mode == "user-step-dispatch" else opt
    computed = []
    with torch.no_grad():
        for batches in ([2] * change_at + [1] * (8 - change_at), [second_batch] * 8):
            for step, batch in enumerate(batches):
                kw = tm.make_inputs(1000.0 - 100 * step, batch)
                computed.append(int(torch.allclose(first(call(**kw)), first(tm.model(**kw)), atol=1e-5, rtol=0)))
    plan = [1, 1, 0, 0, 1, 0, 0, 1]  # the table's rows, by the step of the graph's own generation
    assert computed == plan[:change_at] + plan[:8 - change_at] + plan


def test_host_dispatch_sees_a_new_generation_with_other_shapes():
    """A generation stopped before its table's end, then one at another batch size without a reset: the
    graphs see it by the timestep, a host-dispatched schedule did not (its first call skipped on a graph
    with nothing cached)."""
    tm = make_tiny("tiny-dit")
    computed = {}
    for dispatch in (None, "eager"):
        opt = fastcache.optimize(tm.model, backend="eager", policy="schedule", warmup_steps=2, step_dispatch=dispatch)
        table = torch.zeros(8, len(opt.block_names()), dtype=torch.bool)
        table[[2, 3, 5, 6]] = True
        fastcache.set_schedule(opt, table)
        with torch.no_grad():
            computed[dispatch] = [
                int(torch.allclose(first(opt(**kw)), first(tm.model(**kw)), atol=1e-5, rtol=0))
                for steps, batch in ((5, 2), (8, 1)) for kw in (tm.make_inputs(1000.0 - 100 * s, batch)
                                                               for s in range(steps))]
    assert computed[None] == computed["eager"] == [1, 1, 0, 0, 1] + [1, 1, 0, 0, 1, 0, 0, 1]


def test_shape_change_restarts_each_cache_context():
    """CFG as two calls per step in two cache contexts, both changing batch 2 → 3 → 2 inside a generation:
    the shape check read the previous call's shapes whatever its context, so the uncond call (same shapes as
    the cond call before it) never restarted, and back at batch 2 it forecast from a cache four steps old."""
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager", cache_ratio_threshold=1e6, warmup_steps=2)
    computed: dict[str, list[bool]] = {"cond": [], "uncond": []}
    with torch.no_grad():
        for t, batch in ((1000.0, 2), (900.0, 2), (800.0, 2), (700.0, 3), (600.0, 3), (500.0, 3), (400.0, 2),
                         (300.0, 2)):
            for name in computed:
                kw = tm.make_inputs(t, batch)
                if name == "uncond":
                    kw["class_labels"] = kw["class_labels"] + 1
                with opt.cache_context(name):
                    out = first(opt(**kw))
                computed[name].append(torch.allclose(out, first(tm.model(**kw)), atol=1e-5, rtol=0))
    assert computed["cond"] == computed["uncond"] == [True, True, False, True, True, False, True, True]


def test_shape_change_mid_calibration_generation_is_refused():
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager")
    with pytest.raises(ValueError, match=r"middle of a calibration generation.*\(2, 4, 8, 8\).*\(1, 4, 8, 8\)"):
        with fastcache.calibrate(opt):
            for t, batch in ((1000.0, 2), (900.0, 2), (800.0, 1)):
                opt(**tm.make_inputs(t, batch))


def test_new_generation_with_other_resolution_recaptures():
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager", cache_ratio_threshold=0.0)
    with torch.no_grad():
        for t in (1000.0, 900.0):
            opt(**tm.make_inputs(t, 2))
        kw = tm.make_inputs(1000.0, 2)
        kw["hidden_states"] = torch.randn(2, 4, 16, 16)  # 4x the tokens, new generation (t back up)
        torch.testing.assert_close(first(opt(**kw)), first(tm.model(**kw)), atol=1e-5, rtol=0)
    assert fastcache.get_cache_statistics(opt)["graphs"] == 2


def test_cogvideox_sincos_embedding_at_another_size():
    """CogVideoX-2b's sin-cos position embedding, rebuilt in forward for any size but the config's
    ``sample_*``, failed torch.export ("fake tensor in the exported program constant's list"); now
    exact at other resolutions and frame counts, and the model's own embedding is left as it was."""
    tm = make_tiny("tiny-cogvideox")
    pe = tm.model.patch_embed
    before = (pe.sample_height, pe.sample_width, pe.sample_frames, pe.pos_embedding)
    opt = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False)
    with torch.no_grad():
        for frames, size in ((2, 16), (3, 8)):  # other resolution; other frame count
            kw = tm.make_inputs(999.0, 1)
            kw["hidden_states"] = torch.randn(1, frames, 4, size, size)
            fastcache.reset(opt)
            torch.testing.assert_close(first(opt(**kw)), first(tm.model(**kw)), atol=0, rtol=0)
    assert (pe.sample_height, pe.sample_width, pe.sample_frames) == before[:3] and pe.pos_embedding is before[3]


def test_wrong_dtype_and_device_are_named():
    tm = make_tiny("tiny-pixart")
    opt = fastcache.optimize(tm.model, backend="eager")
    kw = tm.make_inputs(1000.0, 2)
    kw["hidden_states"] = kw["hidden_states"].double()
    with pytest.raises(TypeError, match=r"'hidden_states' has dtype torch.float64.*float32"):
        opt(**kw)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        opt(**tm.make_inputs(1000.0, 2), bogus=1)


def test_set_schedule_validates():
    tm = make_tiny("tiny-custom")
    opt = fastcache.optimize(tm.model, backend="eager")
    with pytest.raises(ValueError, match="policy='schedule'"):
        fastcache.set_schedule(opt, torch.zeros(4, 3, dtype=torch.bool))
    opt = fastcache.optimize(tm.model, backend="eager", policy="schedule")
    with pytest.raises(ValueError, match=r"shape \(4, 2\)"):
        fastcache.set_schedule(opt, torch.zeros(4, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="fastcache.optimize"):
        fastcache.get_cache_statistics(tm.model)


def test_former_field_name_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="'enable_spatial_approx' is now 'enable_token_routing'"):
        cfg = FastCacheConfig().replace(enable_spatial_approx=True)
    assert cfg.enable_token_routing
    with pytest.warns(DeprecationWarning):
        assert FastCacheConfig.from_dict({"enable_spatial_approx": True}).enable_token_routing
    with pytest.raises(ValueError, match="pass only 'enable_token_routing'"):
        FastCacheConfig().replace(enable_spatial_approx=True, enable_token_routing=False)


def test_compile_wrappers_and_flex_attention():
    """``torch.compile(opt)`` traced into the capture and failed ("Cannot access data pointer of Tensor");
    dynamo now leaves the call to the graphs optimize compiled.  A model wrapped by ``torch.compile``
    was said to have no blocks; the flex attention backend failed inside the cond branches (a functorch
    vmap error): both are refused naming the fix."""
    tm = make_tiny("tiny-custom")
    opt = fastcache.optimize(tm.model, backend="eager", cache_ratio_threshold=1e6)
    compiled = torch.compile(opt)
    ts = [1000.0, 900.0, 800.0, 700.0]
    with torch.no_grad():
        out = [compiled(**tm.make_inputs(t, 2)) for t in ts]
        opt.reset()
        plain = [opt(**tm.make_inputs(t, 2)) for t in ts]
    for a, b in zip(out, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fastcache.get_cache_statistics(opt)["blocks_approximated"] > 0
    with pytest.raises(TypeError, match=r"wrapped by torch.compile.*pass model._orig_mod"):
        fastcache.optimize(torch.compile(tm.model))
    flux = make_tiny("tiny-flux")
    flux.model.set_attention_backend("flex")
    opt = fastcache.optimize(flux.model, backend="eager")
    with pytest.raises(ValueError, match=r"'flex' attention backend.*set_attention_backend\('native'\)"):
        opt(**flux.make_inputs(900.0, 2))


def test_a_block_taking_only_varargs_names_the_fix():
    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, *args, **kwargs):
            return self.fc(args[0])

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Wrap()])

        def forward(self, x, timestep):
            return self.blocks[0](x)

    with pytest.raises(ValueError, match=r"takes no named positional argument .* forward\(self, hidden_states, \*args"):
        fastcache.optimize(M(), backend="eager", blocks="blocks")
    with pytest.raises(ValueError, match=r"stream_inputs must be arguments of Wrap.forward \[\]"):  # not *args
        fastcache.optimize(M(), backend="eager", blocks=fastcache.BlockListSpec("blocks", ("args",), ("args",)))


def test_a_block_list_whose_blocks_name_their_stream_otherwise_is_refused_naming_it():
    """(It failed at the first call: "blocks.1: output 0 continues stream 'x', which is not a tensor input".)"""
    from fx_fastcache.zoo import CustomBlock

    class Other(CustomBlock):
        def forward(self, h, temb):
            return super().forward(h, temb)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([CustomBlock(8), Other(8)])

        def forward(self, x, timestep):
            return x

    with pytest.raises(ValueError, match=r"blocks.1 \(Other\) takes no argument 'x', the stream of blocks.0"):
        fastcache.optimize(M(), backend="eager", blocks="blocks")
