"""Approximation off ⇒ the optimized model equals the original; forced approximation ⇒ the
output equals a hand computation of the fallback; statistics count what was approximated."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn

import fx_fastcache as fastcache
from fx_fastcache import BlockListSpec
from fx_fastcache.families import block_modules
from fx_fastcache.graph_protocol import conds
from fx_fastcache.zoo import make_tiny

from conftest import MORE_FAMILIES, TIMESTEPS, family_policy_cases, first, run_loop


@pytest.mark.parametrize("family, policy", family_policy_cases(["step_forecast", "chi2"]))
def test_disabled_equals_original_eager(family, policy):
    """A step-level policy (one span) and a per-block one: both on the structural families, one on each other."""
    tiny = make_tiny(family)
    ref = run_loop(tiny.model, tiny)
    opt = fastcache.optimize(tiny.model, backend="eager", policy=policy, enable_block_approx=False)
    out = run_loop(opt, tiny)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=0)
    stats = fastcache.get_cache_statistics(opt)
    assert stats["block_approx_ratio"] == 0.0
    assert stats["block_evaluations"] == len(TIMESTEPS) * len(block_modules(tiny.model, opt.spec))


def test_threshold_zero_never_approximates(tiny):
    opt = fastcache.optimize(tiny.model, backend="eager", cache_ratio_threshold=0.0)
    ref = run_loop(tiny.model, tiny)
    out = run_loop(opt, tiny)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=0)
    assert fastcache.get_cache_statistics(opt)["blocks_approximated"] == 0


class _Recorder:
    """Original model with forward hooks that record each block's stream residuals per call."""

    def __init__(self, model, spec):
        self.blocks = block_modules(model, spec)
        self.res: list[dict[int, list[torch.Tensor]]] = []

    def residuals(self, block, args, kwargs, out, bl):
        import inspect

        bound = inspect.signature(block.forward).bind(*args, **kwargs).arguments
        outs = out if isinstance(out, tuple) else (out,)
        return [None if o is None or name is None else (o - bound[name]) for o, name in zip(outs, bl.outputs)]


def _patched_outputs(model, spec, fallback_for):
    """Run the *original* model with every block replaced by ``fallback_for(index, inputs)``."""
    import inspect

    blocks = block_modules(model, spec)
    originals = []
    for i, (_, block, bl) in enumerate(blocks):
        sig = inspect.signature(block.forward)

        def fwd(*args, _i=i, _sig=sig, _bl=bl, **kwargs):
            bound = _sig.bind(*args, **kwargs).arguments
            return fallback_for(_i, bound, _bl)

        originals.append(block)
        block.forward = fwd
    return originals


def _capture_residuals(model, spec, kwargs):
    import inspect

    res: dict[int, list] = {}
    hooks = []
    for i, (_, block, bl) in enumerate(block_modules(model, spec)):
        sig = inspect.signature(block.forward)

        def hook(mod, args, kw, out, _i=i, _sig=sig, _bl=bl):
            bound = _sig.bind(*args, **kw).arguments
            outs = out if isinstance(out, tuple) else (out,)
            res[_i] = [None if o is None else (o - bound[name]) for o, name in zip(outs, _bl.outputs)]

        hooks.append(block.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(**kwargs)
    for h in hooks:
        h.remove()
    return res


@pytest.mark.parametrize("family,fallback", family_policy_cases(["residual", "forecast", "linear", "forecast_blend"]))
def test_forced_approximation_matches_hand_computation(family, fallback):
    """Threshold above any change: after warm-up (2 steps; 3 for forecast_blend, whose blend needs
    three adjacent computations) every block is approximated.  Every fallback on the structurally
    different families, one fallback on each other family."""
    _check_hand_computation(make_tiny(family), fallback)


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_more_registered_models(family):
    """diffusers models registered beyond the eight families (found without ``blocks=``): Qwen-Image's
    blocks return ``(encoder_hidden_states, hidden_states)``, which the one-stream default paired the
    wrong way round (an error without a fix, or "no live tensor output"); Chroma and FLUX.2 needed two
    block lists, Wan VACE one of two.  The computed (warm-up) steps equal the model, the forced
    approximation the hand computation."""
    _check_hand_computation(make_tiny(family), "forecast")


@pytest.mark.parametrize("family", ["tiny-hunyuan-video15", "tiny-hunyuan-image"])
def test_token_layouts_ordered_by_masks_follow_the_masks_in_one_graph(family, monkeypatch):
    """HunyuanVideo 1.5 and HunyuanImage (with ByT5 tokens) order their text tokens by their masks in Python
    (``text[text_mask]`` per sample; 1.5 also ``if torch.all(image_embeds == 0)``), which torch.export cannot
    trace: the capture traces a copy that does it with tensor operations.  Other masks (a sample all padding
    in one encoder, one with none) and, for 1.5, a text-to-video call (a zero image embedding) of the same
    shapes reuse the one graph and equal the model; a diffusers whose forward differs is refused."""
    tm = make_tiny(family, task="i2v") if family == "tiny-hunyuan-video15" else make_tiny(family)
    opt = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False)
    base = tm.make_inputs(900.0, 3)
    calls = [base, dict(base, encoder_attention_mask=torch.tensor([[1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]]),
                        encoder_attention_mask_2=torch.tensor([[0, 0, 0], [1, 1, 1], [1, 0, 1]]))]
    if "image_embeds" in base:
        calls.append(dict(base, image_embeds=torch.zeros_like(base["image_embeds"])))  # text-to-video
    with torch.no_grad():
        for kw in calls:
            torch.testing.assert_close(first(opt(**kw)), first(tm.model(**kw)), rtol=0, atol=1e-6)
    assert fastcache.get_cache_statistics(opt)["graphs"] == 1
    assert "forward" not in tm.model.__dict__  # the copy was the capture's only

    from fx_fastcache import traceable_forwards

    monkeypatch.setitem(traceable_forwards.MIRRORED, type(tm.model).__name__, ("0" * 64, "0.42.1"))
    with pytest.raises(NotImplementedError, match=r"written for diffusers 0\.42\.1.*Install diffusers==0\.42\.1"):
        fastcache.optimize(tm.model, backend="eager")(**base)


def _check_hand_computation(tiny, fallback):
    warm = 3 if fallback == "forecast_blend" else 2
    opt = fastcache.optimize(tiny.model, backend="eager", policy="chi2", fallback=fallback,
                             cache_ratio_threshold=1e6, warmup_steps=warm)
    ts = TIMESTEPS[:warm + 2]
    out = run_loop(opt, tiny, ts)
    for o, r in zip(out[:warm], run_loop(tiny.model, tiny, ts[:warm])):  # the warm-up steps compute: exact
        torch.testing.assert_close(o, r, rtol=0, atol=1e-6)
    stats = fastcache.get_cache_statistics(opt)
    n_blocks = len(stats["per_block"])
    assert stats["blocks_approximated"] == 2 * n_blocks  # steps 2 and 3, every block
    assert all(b["approximated"] == 2 for b in stats["per_block"])

    # hand computation with the original model: residuals of the two warm-up steps
    r = [_capture_residuals(tiny.model, opt.spec, tiny.make_inputs(t, 2)) for t in ts[:warm]]
    spec = opt.spec
    import inspect

    for step in (warm, warm + 1):
        t = ts[step]

        def fallback_for(i, bound, bl):
            outs = []
            for k, name in enumerate(bl.outputs):
                if r[warm - 1][i][k] is None:
                    outs.append(None)
                    continue
                x = bound[name]
                if fallback == "residual":
                    y = x + r[1][i][k]
                elif fallback == "forecast":
                    slope = (t - ts[1]) / (ts[1] - ts[0])
                    y = x + r[1][i][k] + slope * (r[1][i][k] - r[0][i][k])
                elif fallback == "forecast_blend":  # computed 0, 1, 2 (adjacent): the mean of two forecasts
                    a, b = (t - ts[2]) / (ts[2] - ts[1]), (t - ts[2]) / (ts[2] - ts[0])
                    y = x + r[2][i][k] + 0.5 * a * (r[2][i][k] - r[1][i][k]) + 0.5 * b * (r[2][i][k] - r[0][i][k])
                else:  # uncalibrated linear: identity
                    y = x
                outs.append(y)
            return outs[0] if len(outs) == 1 else tuple(outs)

        blocks = block_modules(tiny.model, spec)
        _patched_outputs(tiny.model, spec, fallback_for)
        try:
            with torch.no_grad():
                hand = first(tiny.model(**tiny.make_inputs(t, 2)))
        finally:
            for _, block, _ in blocks:
                block.__dict__.pop("forward", None)
        torch.testing.assert_close(out[step], hand, atol=1e-4, rtol=1e-4)


def test_return_dict_and_output_type():
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager")
    kw = tm.make_inputs(1000.0, 2)
    kw["return_dict"] = True
    ref = tm.model(**kw)
    out = opt(**kw)
    assert type(out) is type(ref)
    torch.testing.assert_close(out.sample, ref.sample)
    kw["return_dict"] = False
    out = opt(**kw)
    assert isinstance(out, tuple) and len(out) == 1
    assert out[0].dtype == ref.sample.dtype and out[0].device == ref.sample.device
    # attribute passthrough for pipelines
    assert opt.config is tm.model.config
    assert opt.dtype == torch.float32


def test_positional_arguments_and_python_float_timestep():
    tm = make_tiny("tiny-custom")
    opt = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False)
    kw = tm.make_inputs(500.0, 2)
    ref = tm.model(kw["x"], kw["timestep"])
    torch.testing.assert_close(opt(kw["x"], kw["timestep"]), ref)
    torch.testing.assert_close(opt(kw["x"], timestep=500.0), tm.model(kw["x"], torch.full((1,), 500.0)))


def test_batch_requires_every_sample_to_pass():
    """chi2 per-block rule: a block is approximated only if every sample's drift passes."""
    tm = make_tiny("tiny-custom")
    opt = fastcache.optimize(tm.model, backend="eager", policy="chi2", fallback="residual", warmup_steps=1,
                             cache_ratio_threshold=0.05)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 10, 4, generator=g)
    with torch.no_grad():
        opt(x, torch.full((2,), 1000.0))
        x2 = x.clone()
        x2[1] += 5.0 * torch.randn(10, 4, generator=g)  # sample 1 moves a lot, sample 0 not at all
        opt(x2, torch.full((2,), 1000.0 - 1e-3))
    assert fastcache.get_cache_statistics(opt)["blocks_approximated"] == 0
    opt1 = fastcache.optimize(tm.model, backend="eager", policy="chi2", fallback="residual", warmup_steps=1,
                              cache_ratio_threshold=0.05)
    with torch.no_grad():
        opt1(x[:1], torch.full((1,), 1000.0))
        opt1(x2[:1], torch.full((1,), 1000.0 - 1e-3))
    assert fastcache.get_cache_statistics(opt1)["blocks_approximated"] == 3  # sample 0 alone: all blocks skip


def test_new_generation_resets_state_automatically():
    tm = make_tiny("tiny-pixart")
    opt = fastcache.optimize(tm.model, backend="eager", policy="chi2", cache_ratio_threshold=1e6, warmup_steps=2)
    a = run_loop(opt, tm, TIMESTEPS[:3])
    b = run_loop(opt, tm, TIMESTEPS[:3])  # timestep goes back up: warm-up again, same result
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    ref = run_loop(tm.model, tm, TIMESTEPS[:2])
    torch.testing.assert_close(b[0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(b[1], ref[1], atol=1e-5, rtol=0)
    assert fastcache.get_cache_statistics(opt)["per_block"][0]["approximated"] == 2


def test_cond_branch_outputs_are_row_major_at_batch_1(tiny):
    """Both branches of a ``torch.cond`` must return exactly row-major strides.  At batch 1 a slice
    such as HunyuanVideo's ``cat([img, txt], 1)[:, :n]`` is "contiguous" to ``Tensor.is_contiguous``
    (a size-1 dimension's stride is ignored) but not row-major, and inductor's cond failed on it
    with a raw ``KeyError``; the guard now copies such outputs (capture only here, no compile)."""
    entry = fastcache.optimize(tiny.model, backend="inductor").capture(**tiny.make_inputs(900.0, 1))
    checked = 0
    for c in conds(entry.gm.graph):
        for branch in (c.args[1].target, c.args[2].target):
            (out,) = getattr(entry.gm, branch).graph.find_nodes(op="output")
            for r in out.args[0]:
                v = r.meta.get("val")
                if isinstance(v, torch.Tensor):
                    assert v.stride() == torch.empty(v.shape, device="meta").stride(), (branch, r.name)
                    checked += 1
    assert checked > 0


class _AutocastBlock(torch.nn.Module):
    def __init__(self, d: int, autocast: bool) -> None:
        super().__init__()
        self.mod, self.fc, self.autocast = torch.nn.Linear(d, 2 * d), torch.nn.Linear(d, d), autocast

    def forward(self, hidden_states, temb):
        scale, shift = self.mod(temb).unsqueeze(1).chunk(2, dim=-1)
        h = torch.nn.functional.layer_norm(hidden_states, hidden_states.shape[-1:]) * (1 + scale) + shift
        with torch.amp.autocast("cuda", enabled=False) if self.autocast else contextlib.nullcontext():
            h = torch.tanh(h.float())
        return hidden_states + self.fc(h)


class _AutocastModel(torch.nn.Module):
    """Blocks with ``torch.amp.autocast`` inside (as Z-Image's rotary embedding): a no-op on the CPU."""

    def __init__(self, autocast: bool, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.t, self.out = torch.nn.Linear(4, d), torch.nn.Linear(1, d), torch.nn.Linear(d, 4)
        self.blocks = torch.nn.ModuleList([_AutocastBlock(d, autocast) for _ in range(3)])

    def forward(self, hidden_states, timestep):
        temb = torch.nn.functional.silu(self.t(timestep.view(-1, 1) / 1000.0))
        h = self.inp(hidden_states)
        for b in self.blocks:
            h = b(h, temb)
        return self.out(h)


@pytest.mark.parametrize("span", ["auto", "block"])
def test_blocks_with_autocast_regions(span):
    """``torch.export`` makes an autocast region a higher-order op whose body a ``get_attr`` reads; that
    node was left outside the block, and every call failed ("Argument 'submod_8' of Node 'cond' was used
    before it has been defined").  The optimized model must equal the same model without the autocast."""
    x = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(1))

    def loop(model):
        with torch.no_grad():
            return [model(hidden_states=x - 0.01 * i, timestep=torch.full((2,), t)) for i, t in enumerate(TIMESTEPS)]

    with_autocast = _AutocastModel(True)
    for a, b in zip(loop(fastcache.optimize(with_autocast, backend="eager", enable_block_approx=False)),
                    loop(with_autocast)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    opts = [fastcache.optimize(_AutocastModel(ac), backend="eager", span=span, cache_ratio_threshold=1e6)
            for ac in (True, False)]
    for a, b in zip(*map(loop, opts)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fastcache.get_cache_statistics(opts[0])["blocks_approximated"] > 0


class _SigmaTimestep(nn.Module):
    """Z-Image behind a timestep that falls (σ), as every other family's does (``t = 1 − σ`` inside),
    returning its per-sample outputs stacked into one tensor."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, timestep, cap_feats):
        return torch.stack(self.inner(x=x, t=1.0 - timestep, cap_feats=cap_feats, return_dict=False)[0])


def test_rising_timestep_reads_as_sigma():
    """Z-Image's ``t`` is 1 − σ and rises: read as ``1 − t``, the optimized model behaves as the same model
    behind a σ timestep (two generations without a reset, the forecast, the drift correction, which needs
    σ).  Read as it comes, every call started a new generation and nothing was approximated.  Its output is
    a list of per-sample tensors: the drift correction corrected only the first."""
    tiny = make_tiny("tiny-z-image")
    config = dict(backend="eager", policy="schedule", warmup_steps=2, drift_correction="flow_euler")
    opt = fastcache.optimize(tiny.model, **config)
    twin = fastcache.optimize(_SigmaTimestep(tiny.model), blocks=BlockListSpec("inner.layers", ("x",), ("x",)),
                              **config)
    table = torch.zeros(len(TIMESTEPS), len(opt.block_names()), dtype=torch.bool)
    table[[2, 3, 5]] = True  # step 4 computes after two forecast steps: the correction applies there
    for m in (opt, twin):
        fastcache.set_schedule(m, table)
    timesteps = TIMESTEPS * 2  # two generations, no reset between them
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            sigma = torch.full((2,), t / 1000.0)
            kw = dict(tiny.make_inputs(t, 2), t=1.0 - sigma)  # the very t the twin passes
            out = first(opt(**kw))
            torch.testing.assert_close(out, twin(x=kw["x"], timestep=sigma, cap_feats=kw["cap_feats"]),
                                       rtol=0, atol=1e-5)
            step = i % len(TIMESTEPS)
            plain = first(tiny.model(**kw))
            if step < 2:  # each generation's warm-up computes
                torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
            if step == 4:  # computed, and corrected: every sample
                assert all((out[k] - plain[k]).abs().max() > 1e-3 for k in range(2))
    stats = fastcache.get_cache_statistics(opt)
    assert stats["blocks_approximated"] == 2 * 3 * len(stats["per_block"])


def test_z_image_first_call_captured():
    """Z-Image's rotary table is built at the model's first call; when that call is the capture, the table
    was made of fake tensors and stayed in the model (the model and the next capture failed)."""
    tiny = make_tiny("tiny-z-image")
    kw = tiny.make_inputs(1000.0, 2)
    with torch.no_grad():
        out = first(fastcache.optimize(tiny.model, backend="eager", enable_block_approx=False)(**kw))
        torch.testing.assert_close(first(tiny.model(**kw)), out, rtol=0, atol=1e-6)


def test_list_latents_watched_for_a_new_generation():
    """Z-Image takes its latents as a list of tensors: the clock watches the first one, so fresh noise at a
    lower noise level (a generation aborted and another started) is a new generation, not a continuation."""
    tiny = make_tiny("tiny-z-image")
    opt = fastcache.optimize(tiny.model, backend="eager", cache_ratio_threshold=1e6, warmup_steps=2)
    with torch.no_grad():
        for t in TIMESTEPS[:3]:
            opt(**tiny.make_inputs(t, 2))
        kw = tiny.make_inputs(TIMESTEPS[3], 2)
        kw["x"] = list(torch.randn(2, *kw["x"][0].shape, generator=torch.Generator().manual_seed(7)).unbind(0))
        torch.testing.assert_close(first(opt(**kw)), first(tiny.model(**kw)), rtol=0, atol=1e-5)
    assert fastcache.get_cache_statistics(opt)["blocks_approximated"] == len(opt.block_names())  # step 2 only


def test_bfloat16_wan_with_float32_modules_kept(tmp_path):
    """Wan loaded in bfloat16 keeps diffusers' ``_keep_in_fp32_modules`` (``scale_shift_table`` first, its
    first parameter) in float32: the optimized model read its dtype from that parameter, refused every
    bfloat16 call, and a pipeline then built float32 latents (a raw dtype error)."""
    from diffusers import WanTransformer3DModel

    make_tiny("tiny-wan").model.save_pretrained(tmp_path)
    model = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    assert model.scale_shift_table.dtype == torch.float32 and model.dtype == torch.bfloat16
    tiny = make_tiny("tiny-wan")
    opt = fastcache.optimize(model, backend="eager", enable_block_approx=False)
    assert opt.dtype == torch.bfloat16
    with torch.no_grad():
        for t in TIMESTEPS[:3]:
            kw = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in tiny.make_inputs(t, 2).items()}
            torch.testing.assert_close(first(opt(**kw)), first(model(**kw)), rtol=0, atol=0)
