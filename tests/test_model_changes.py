"""Changes to the model after its graphs were captured: the optimized model follows them.

torch.export keeps the Parameter and buffer objects, nothing else: a module, parameter, buffer,
attention processor, forward hook or LoRA state replaced on the original model used to leave the
optimized model computing the old one, silently (``fx_fastcache/model_watch.py``).
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import AttnProcessor

import fx_fastcache as fastcache
from fx_fastcache.zoo import make_tiny


class FakeLoraLinear(nn.Module):
    """What a peft LoRA layer holds, by peft's attribute names: ``base(x) + B(A(x)) * scaling[a]``
    unless disabled, active adapters, merged adapters (peft is not installed here)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, 2, bias=False)
        self.lora_B = nn.Linear(2, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight)
        self.scaling = {"default": 1.0}
        self._disable_adapters = False
        self._active_adapter = "default"
        self.merged_adapters: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self._disable_adapters or self.merged_adapters:
            return y
        return y + self.lora_B(self.lora_A(x)) * self.scaling["default"]

    def merge(self) -> None:
        with torch.no_grad():
            self.base_layer.weight += (self.lora_B.weight @ self.lora_A.weight) * self.scaling["default"]
        self.merged_adapters.append("default")


def _inject(m):
    m.blocks[0].fc1 = FakeLoraLinear(m.blocks[0].fc1)


def _set_scale(m):
    m.blocks[0].fc1.scaling["default"] = 0.3


def _merge(m):
    m.blocks[0].fc1.merge()


def _unload(m):
    m.blocks[0].fc1 = m.blocks[0].fc1.base_layer


def _hook(m):
    m.proj_out.register_forward_hook(lambda mod, args, out: 3 * out)


class _Tripled(ModelHook):
    def post_forward(self, module, output):
        return 3 * output


def _diffusers_hook(m):
    """A diffusers hook (its registry wraps ``forward``; no torch hook is registered)."""
    HookRegistry.check_if_exists_or_initialize(m.proj_out).register_hook(_Tripled(), "tripled")


CHANGES = {  # name: (prepare before the first call, change after it)
    "submodule replaced": (None, lambda m: setattr(m.blocks[0], "fc1", nn.Linear(16, 32))),
    "block deleted": (None, lambda m: m.blocks.__delitem__(0)),
    "parameter replaced": (None, lambda m: setattr(m.proj_out, "weight", nn.Parameter(torch.randn(4, 16)))),
    "load_state_dict(assign=True)": (None, lambda m: m.load_state_dict(
        make_tiny("tiny-custom", seed=5).model.state_dict(), assign=True)),
    "forward hook added": (None, _hook),
    "forward hook removed": (_hook, lambda m: m.proj_out._forward_hooks.clear()),
    "diffusers hook added": (None, _diffusers_hook),
    "LoRA injected": (None, _inject),
    "LoRA scale changed": (_inject, _set_scale),
    "LoRA merged": (_inject, _merge),
    "LoRA unloaded": (_inject, _unload),
}


def _run(opt, tm, t=900.0):
    fastcache.reset(opt)
    with torch.no_grad():
        return opt(**tm.make_inputs(t, 2)), tm.model(**tm.make_inputs(t, 2))


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_after_capture_is_followed(change, caplog):
    prepare, mutate = CHANGES[change]
    tm = make_tiny("tiny-custom")
    if prepare is not None:
        prepare(tm.model)
    opt = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False)
    got, ref = _run(opt, tm)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    mutate(tm.model)
    with caplog.at_level(logging.WARNING, logger="fx_fastcache"):
        got, ref = _run(opt, tm)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert "re-capturing at this call" in caplog.text


class _DoubledProcessor(AttnProcessor):
    def __call__(self, *args, **kwargs):
        return 2 * super().__call__(*args, **kwargs)


class _DoubledModuleProcessor(nn.Module):
    """An ``nn.Module`` processor (as IP-Adapter's are): it lives in ``_modules``, and diffusers pops it
    from there when a plain one replaces it, without any registration event."""

    def forward(self, attn, hidden_states, *args, **kwargs):
        return 2 * AttnProcessor()(attn, hidden_states, *args, **kwargs)


@pytest.mark.parametrize("before,after", [(None, _DoubledProcessor), (_DoubledModuleProcessor, AttnProcessor)],
                         ids=["plain-replaced", "module-replaced-by-plain"])
def test_attention_processor_swap_is_followed(before, after):
    """``set_attn_processor`` after a capture (a diffusers family, its real attention modules)."""
    tm = make_tiny("tiny-pixart")
    if before is not None:
        tm.model.set_attn_processor(before())
    opt = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False)
    inputs = tm.make_inputs(900.0, 2)
    with torch.no_grad():
        opt(**inputs)
        tm.model.set_attn_processor(after())
        fastcache.reset(opt)
        torch.testing.assert_close(opt(**inputs)[0], tm.model(**inputs)[0], rtol=0, atol=0)


def test_capture_sees_the_change_too():
    """``opt.capture()`` (what ONNX export and inspect_graph use) returned the graph of the model
    before the change."""
    tm = make_tiny("tiny-custom")
    opt = fastcache.optimize(tm.model, backend="eager")
    inputs = tm.make_inputs(900.0, 2)
    old = opt.capture(**inputs)
    _hook(tm.model)
    assert opt.capture(**inputs) is not old


def test_a_block_no_call_runs_is_an_error_naming_the_fix():
    """A block list with a block ``forward`` never calls is a wrong block list (not a call to run
    uncached, as an SD3 ``skip_layers`` call after a normal one is)."""
    tm = make_tiny("tiny-custom")
    tm.model.blocks.append(make_tiny("tiny-custom", seed=1).model.blocks[0])
    forward = type(tm.model).forward

    def two_blocks(x, timestep):  # the model's forward over its first blocks only
        blocks = tm.model.blocks
        tm.model.blocks = nn.ModuleList(list(blocks)[:-1])
        try:
            return forward(tm.model, x, timestep)
        finally:
            tm.model.blocks = blocks

    tm.model.forward = two_blocks
    opt = fastcache.optimize(tm.model, backend="eager")
    with pytest.raises(RuntimeError, match=r"blocks \['blocks.3'\] do not run .*optimize\(blocks=\.\.\.\)"):
        opt(**tm.make_inputs(900.0, 2))


def test_unrelated_registrations_do_not_recapture(caplog):
    """Modules built elsewhere in the process trigger the full comparison, which finds nothing:
    no re-capture, and the approximation state of the generation goes on."""
    tm = make_tiny("tiny-custom")
    opt = fastcache.optimize(tm.model, backend="eager", cache_ratio_threshold=0.5)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="fx_fastcache"):
        for i, t in enumerate([999.0, 900.0, 800.0, 700.0, 600.0]):
            make_tiny("tiny-custom", seed=7)  # registers modules, parameters and buffers
            nn.Linear(2, 2).register_forward_hook(lambda *a: None)
            x = tm.make_inputs(t, 2)
            opt(x=x["x"] * (1 - 0.01 * i), timestep=x["timestep"])
    assert "re-capturing" not in caplog.text and len(opt.graphs) == 1
    assert fastcache.get_cache_statistics(opt)["block_approx_ratio"] > 0


@pytest.mark.parametrize("fallback", ["residual_linear", "linear"])
def test_original_model_cast_after_calibration(fallback):
    """``model.to(torch.float64)`` on the original model (not through the optimized one) after
    ``calibrate``: the fitted maps keep their float32, the fallback casts them; it failed with a
    dtype error inside the graph at the first approximated step."""
    tm = make_tiny("tiny-custom")
    opt = fastcache.optimize(tm.model, backend="eager", fallback=fallback, cache_ratio_threshold=0.5)

    def generation(dtype):
        with torch.no_grad():
            for t in torch.linspace(999, 50, 8).tolist():
                x = tm.make_inputs(t, 2)
                opt(x=x["x"].to(dtype), timestep=x["timestep"].to(dtype))

    with fastcache.calibrate(opt):
        generation(torch.float32)
        generation(torch.float32)
    tm.model.to(torch.float64)
    generation(torch.float64)
    assert fastcache.get_cache_statistics(opt)["block_approx_ratio"] > 0


def _lora(model, name: str = "a", seed: int = 1) -> None:
    from peft import LoraConfig

    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights=False), adapter_name=name)


@pytest.mark.parametrize("family,kwarg", [("tiny-flux", "joint_attention_kwargs"),
                                          ("tiny-hunyuan-video", "attention_kwargs")])
def test_lora_scale_given_per_call(family, kwarg):
    """diffusers' ``@apply_lora_scale`` reads the LoRA scale of a call from the attention kwargs given by
    keyword; the capture passed them by position (every argument given: Flux, HunyuanVideo), so the graph
    computed the LoRA at scale 1.0, silently (0.07 and 0.13 off at scale 0.3)."""
    tm = make_tiny(family)
    _lora(tm.model)
    opt = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False)
    with torch.no_grad():
        for scale in (1.0, 0.3):
            kw = dict(tm.make_inputs(900.0, 2), **{kwarg: {"scale": scale}})
            ref = tm.model(**kw)[0]
            opt.reset()
            torch.testing.assert_close(opt(**kw)[0], ref, rtol=0, atol=1e-6)
        assert (ref - tm.model(**tm.make_inputs(900.0, 2))[0]).abs().max() > 1e-2  # the scale matters here


def test_pipeline_lora_methods_reach_the_optimized_transformer():
    """diffusers' pipeline-level LoRA methods act on ``ModelMixin`` components only: after enable_fastcache
    ``pipe.set_adapters``, ``disable_lora``, ``fuse_lora``, ``unload_lora_weights``, ... did nothing to the
    optimized transformer (``set_adapters`` raised "not in the list of present adapters")."""
    from fx_fastcache.tiny_pipelines import make_tiny_pipeline

    ref, tp = make_tiny_pipeline("flux"), make_tiny_pipeline("flux")
    for p in (ref.pipe, tp.pipe):
        _lora(p.transformer, "a", 1)
        _lora(p.transformer, "b", 2)
    fastcache.enable_fastcache(tp.pipe, backend="eager", enable_block_approx=False)

    def run(t):
        return t.pipe(**t.call_kwargs(output_type="latent", num_inference_steps=2))[0]

    torch.testing.assert_close(run(tp), run(ref), rtol=0, atol=0)
    for change in (lambda p: p.set_adapters(["a", "b"], [0.5, 1.5]), lambda p: p.disable_lora(),
                   lambda p: p.enable_lora(), lambda p: p.fuse_lora(lora_scale=0.7), lambda p: p.unfuse_lora(),
                   lambda p: p.delete_adapters("b"), lambda p: p.unload_lora_weights()):
        before = run(ref)
        change(ref.pipe)
        change(tp.pipe)
        expected = run(ref)
        torch.testing.assert_close(run(tp), expected, rtol=0, atol=1e-6)
    assert (expected - before).abs().max() > 1e-3  # (the last change, unloading, moved the output)
    assert isinstance(tp.pipe.transformer, fastcache.FastCacheModule)


def test_attention_processor_settings_are_followed(caplog):
    """Plain settings of an attention processor are read as constants by the trace: IP-Adapter's
    ``scale`` (``set_ip_adapter_scale``) and the attention backend (``set_attention_backend``) changed
    nothing after capture, silently (0.998 off in the hunt's IP-Adapter reproducer)."""
    tm = make_tiny("tiny-flux")
    opt = fastcache.optimize(tm.model, backend="eager", enable_block_approx=False)
    with torch.no_grad():
        opt(**tm.make_inputs(900.0, 2))
        processor = tm.model.transformer_blocks[0].attn.processor
        processor.scale = [0.2]  # what set_ip_adapter_scale writes on IP-Adapter's processors
        with caplog.at_level(logging.WARNING, logger="fx_fastcache"):
            opt.reset()
            opt(**tm.make_inputs(900.0, 2))
        assert "a setting of the attention processor of transformer_blocks.0.attn changed" in caplog.text
        caplog.clear()
        tm.model.set_attention_backend("_native_math")
        with caplog.at_level(logging.INFO, logger="fx_fastcache"):
            opt.reset()
            torch.testing.assert_close(opt(**tm.make_inputs(900.0, 2))[0], tm.model(**tm.make_inputs(900.0, 2))[0],
                                       rtol=0, atol=1e-5)
        assert "a setting of the attention processor" in caplog.text
        caplog.clear()
        make_tiny("tiny-sd3").model.set_attention_backend("native")  # another model: the process-wide backend
        with caplog.at_level(logging.INFO, logger="fx_fastcache"):
            opt.reset()
            opt(**tm.make_inputs(900.0, 2))
        assert "diffusers' attention backend changed" in caplog.text
