"""ONNX export with explicit state: checker-clean, one If per block, and onnxruntime driven by the
runner reproduces the PyTorch model replaying the same schedule (dit-mnist and every family)."""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import fx_fastcache as fastcache  # noqa: E402
from fx_fastcache.bench.metrics import psnr  # noqa: E402
from fx_fastcache.calibration import model_fingerprint  # noqa: E402
from fx_fastcache.fallbacks.residual_linear import store_keys as residual_linear_keys  # noqa: E402
from fx_fastcache.config import FastCacheConfig  # noqa: E402
from fx_fastcache.export.onnx import export_onnx  # noqa: E402
from fx_fastcache.export.runner import OnnxRunner  # noqa: E402
from fx_fastcache.export.schedule import Schedule, optimize_with_schedule  # noqa: E402
from fx_fastcache.families import block_modules, resolve_family  # noqa: E402
from fx_fastcache.zoo import make_tiny  # noqa: E402

TINY = ["tiny-dit", "tiny-pixart", "tiny-sd3", "tiny-flux", "tiny-cogvideox", "tiny-ltx-video", "tiny-wan",
        "tiny-hunyuan-video", "tiny-hunyuan-video15"]  # 1.5: its traced copy of the forward exports too
TWO_LISTS = ("tiny-flux", "tiny-hunyuan-video")  # joint and single blocks


def pattern_schedule(model, steps: int) -> Schedule:
    """Step 0 computes; then rows alternate between all skipped, none, and a checkerboard."""
    names = [n for n, _, _ in block_modules(model, resolve_family(model))]
    rows = [[False] * len(names)]
    for s in range(1, steps):
        kind = s % 3
        rows.append([True] * len(names) if kind == 1 else [False] * len(names) if kind == 0
                    else [(s + j) % 2 == 0 for j in range(len(names))])
    return Schedule(rows, names, model_fingerprint(model), FastCacheConfig().to_dict(), "test")


def tiny_loop(model, tm, steps: int) -> list[torch.Tensor]:
    """A small Euler-like loop: the latent evolves, so every step sees new inputs."""
    ts = torch.linspace(1000.0, 0.0, steps + 1)[:-1].tolist()
    kw0 = tm.make_inputs(ts[0], 2)
    x = kw0["hidden_states"]
    outs = []
    for t in ts:
        kw = tm.make_inputs(t, 2)
        kw["hidden_states"] = x
        y = model(**kw)[0]
        outs.append(y.detach().clone())
        x = x - 0.1 * y[..., : x.shape[1], :, :] if x.ndim == 4 else x - 0.1 * y
    return outs


def _check_graph(path, n_blocks):
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 18
    assert sum(n.op_type == "If" for n in m.graph.node) == n_blocks
    ins = [i.name for i in m.graph.input]
    outs = [o.name for o in m.graph.output]
    assert "skip" in ins
    assert any(n.startswith("state_in.") and n.endswith("r_c0") for n in ins)
    assert len([n for n in outs if n.startswith("state_out.")]) > 0
    return m


@pytest.fixture(scope="module")
def tiny_dit_export(tmp_path_factory):
    tm = make_tiny("tiny-dit")
    sched = pattern_schedule(tm.model, 6)
    path = tmp_path_factory.mktemp("onnx") / "tiny-dit.onnx"
    ex = export_onnx(tm.model, sched, tm.make_inputs(1000.0, 2), path)
    return tm, sched, ex


@pytest.mark.parametrize("name", TINY, ids=TINY)
def test_runner_matches_pytorch_schedule(name, tiny_dit_export, tmp_path):
    if name == "tiny-dit":
        tm, sched, ex = tiny_dit_export
    else:  # one block per block list: a family's export hurdles lie outside its blocks (40 % less export time)
        tm = make_tiny(name, layers=1, **({"single_layers": 1} if name in TWO_LISTS else {}))
        sched = pattern_schedule(tm.model, 6)
        ex = export_onnx(tm.model, sched, tm.make_inputs(1000.0, 2), tmp_path / f"{name}.onnx")
    _check_graph(ex.path, len(sched.blocks))
    if name == "tiny-pixart":  # its no-op squeeze.dim would make onnxruntime fail
        assert ex.spec.dropped_squeezes == 1
    if name == "tiny-hunyuan-video":  # its bool masked_fill would export to a Where onnxruntime lacks
        assert ex.spec.rewritten_bool_fills >= 1
    ref = tiny_loop(optimize_with_schedule(tm.model, sched), tm, sched.steps)  # a fresh capture, not the exported one
    got = tiny_loop(OnnxRunner(ex.path), tm, sched.steps)
    for step, (r, g) in enumerate(zip(ref, got)):
        err = float((r - g).abs().max())
        assert err <= 1e-3, f"step {step} (skip row {sched.table[step]}): max abs error {err}"


@pytest.mark.slow
def test_dit_mnist_images_match(tmp_path):
    from fx_fastcache.trained import load_trained, sample

    tm = load_trained("dit-mnist")
    steps = 5
    base = pattern_schedule(tm.model, steps)  # per-block rows are tiny-dit's (above); here a plan's whole steps
    rows = [[s in (2, 4)] * len(base.blocks) for s in range(steps)]  # computes steps 0, 1, 3: one span, one If
    sched = Schedule(rows, base.blocks, base.fingerprint, base.config, "test")
    classes, seeds = [3, 7], [0, 1]
    opt = optimize_with_schedule(tm.model, sched)
    ref = sample(tm, classes, seeds, steps=steps, model=opt)
    kw = tm.call_kwargs(torch.zeros(4, 1, 32, 32), torch.ones(4), torch.tensor([3, 7, 10, 10]))
    ex = export_onnx(opt, sched, kw, tmp_path / "dit.onnx")  # reuses opt's captured graph
    _check_graph(ex.path, 1)
    got = sample(tm, classes, seeds, steps=steps, model=OnnxRunner(ex.path))
    err = float((ref - got).abs().max())
    assert err <= 1e-3 or float(psnr(got, ref).min()) >= 60.0, f"max abs error {err}"


def test_state_is_carried_not_frozen(tiny_dit_export):
    """Skipped steps depend on the carried state: the same inputs with zeroed state give another output."""
    tm, sched, ex = tiny_dit_export
    assert sched.table[1] == [True, True]  # step 1 skips every block
    carried = tiny_loop(OnnxRunner(ex.path), tm, 3)
    t1 = torch.linspace(1000.0, 0.0, 4)[1].item()  # tiny_loop's second timestep for 3 steps
    kw = tm.make_inputs(t1, 2)
    kw["hidden_states"] = tm.make_inputs(1000.0, 2)["hidden_states"] - 0.1 * carried[0][:, :4]
    outs = {}
    for zero in (False, True):
        r = OnnxRunner(ex.path)
        tiny_loop(r, tm, 1)  # step 0, same inputs as the carried run
        if zero:
            r.state = [np.zeros_like(s) for s in r.state]
        outs[zero] = r(**kw)[0]
    torch.testing.assert_close(outs[False], carried[1], atol=1e-6, rtol=0)  # same inputs reproduce step 1
    assert float((outs[True] - carried[1]).abs().max()) > 1e-3


def test_if_conditions_are_scalar_bool_and_branches_agree(tiny_dit_export):
    """What TensorRT's conditional layer needs: 0-d bool condition, branches with equal output types/shapes."""
    _, _, ex = tiny_dit_export
    m = onnx.shape_inference.infer_shapes(onnx.load(str(ex.path)))
    info = {v.name: v.type.tensor_type for v in [*m.graph.value_info, *m.graph.input, *m.graph.output]}
    ifs = [n for n in m.graph.node if n.op_type == "If"]
    assert ifs
    for n in ifs:
        cond = info[n.input[0]]
        assert cond.elem_type == onnx.TensorProto.BOOL and len(cond.shape.dim) == 0
        then_b = next(a.g for a in n.attribute if a.name == "then_branch")
        else_b = next(a.g for a in n.attribute if a.name == "else_branch")
        assert len(then_b.output) == len(else_b.output) == len(n.output)
        for a, b in zip(then_b.output, else_b.output):
            ta, tb = a.type.tensor_type, b.type.tensor_type
            assert ta.elem_type == tb.elem_type
            assert [d.dim_value for d in ta.shape.dim] == [d.dim_value for d in tb.shape.dim]


def test_runner_rejects_mismatches(tiny_dit_export):
    tm, sched, ex = tiny_dit_export
    other = Schedule([[False] * 3], ["a", "b", "c"], sched.fingerprint, sched.config)
    with pytest.raises(ValueError, match="do not match"):
        OnnxRunner(ex.path, schedule=other)
    runner = OnnxRunner(ex.path)
    with pytest.raises(ValueError, match="exported for"):
        runner(**tm.make_inputs(1000.0, 3))
    with pytest.raises(TypeError, match="missing input"):
        runner(hidden_states=torch.zeros(2, 4, 8, 8))


def test_calibration_constants_are_kept_and_only_state_is_carried(tmp_path):
    """residual_linear: fitted A, b stay constants in the graph (not zeroed state inputs)."""
    tm = make_tiny("tiny-dit", layers=1)  # one block: what is kept does not depend on how many
    base = pattern_schedule(tm.model, 5)
    sched = Schedule(base.table, base.blocks, base.fingerprint, {**base.config, "fallback": "residual_linear"})
    opt = optimize_with_schedule(tm.model, sched)
    opt.capture(**tm.make_inputs(1000.0, 2))
    g = torch.Generator().manual_seed(0)
    fitted = [k for b in opt.block_names() for k in residual_linear_keys(b, "hidden_states")]
    assert fitted
    for k in fitted:
        v = opt.store.tensors[k]
        v.copy_(0.1 * torch.randn(v.shape, generator=g))  # stands in for a calibration fit
    ex = export_onnx(opt, sched, tm.make_inputs(1000.0, 2), tmp_path / "rl.onnx")
    assert {s.name for s in ex.spec.state} == {"n", "r_c0", "x_c0"}
    opt.reset()
    ref = tiny_loop(opt, tm, sched.steps)
    got = tiny_loop(OnnxRunner(ex.path), tm, sched.steps)
    for r, o in zip(ref, got):
        assert float((r - o).abs().max()) <= 1e-3


def test_forecast_blend_state_is_carried(tmp_path):
    """fallback="forecast_blend": the third residual and the adjacency flags are carried between
    steps; the runner equals PyTorch on steps that blend (3, 4) and on steps that do not (6, 7)."""
    tm = make_tiny("tiny-dit", layers=1)
    names = [n for n, _, _ in block_modules(tm.model, resolve_family(tm.model))]
    rows = [[s in (3, 4, 6, 7)] * len(names) for s in range(8)]
    cfg = {**FastCacheConfig().to_dict(), "fallback": "forecast_blend"}
    sched = Schedule(rows, names, model_fingerprint(tm.model), cfg, "test")
    ex = export_onnx(tm.model, sched, tm.make_inputs(1000.0, 2), tmp_path / "blend.onnx")
    ins = [i.name for i in onnx.load(str(ex.path)).graph.input]
    assert any(n.endswith("r_q0") for n in ins) and any(n.endswith("adjacent") for n in ins)
    ref = tiny_loop(optimize_with_schedule(tm.model, sched), tm, sched.steps)
    got = tiny_loop(OnnxRunner(ex.path), tm, sched.steps)
    for step, (r, g) in enumerate(zip(ref, got)):
        assert float((r - g).abs().max()) <= 1e-3, step


def _call(model, tm, x, t):
    kw = tm.make_inputs(t, 2)
    kw["hidden_states"] = x
    return model(**kw)[0]


def test_runner_starts_a_new_generation_when_the_input_jumps(tiny_dit_export):
    """A generation aborted after two steps, then fresh noise at a *lower* timestep: the PyTorch clock
    starts a new generation (the input moved by more than its norm), so the runner must too: zero
    state, step 0 (computes every block), not step 2 of the old generation with its stale state."""
    tm, sched, ex = tiny_dit_export
    opt, runner = optimize_with_schedule(tm.model, sched), OnnxRunner(ex.path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        for t in (1000.0, 900.0):  # the aborted generation
            y = _call(opt, tm, x, t)
            _call(runner, tm, x, t)
            x = x - 0.05 * y[:, :4]
        x = torch.randn(2, 4, 8, 8, generator=g)
        for t in (800.0, 700.0):  # the new one: step 0, then step 1 (every block skipped)
            ref, got = _call(opt, tm, x, t), _call(runner, tm, x, t)
            assert float((ref - got).abs().max()) <= 1e-3, t
            x = x - 0.05 * ref[:, :4]
    assert runner.step == 1


def test_runner_computes_after_a_repeated_call_like_the_clock(tiny_dit_export):
    """CFG as two calls per step (the same timestep and input twice): the PyTorch clock computes
    every block from the repeat to the next generation; the runner followed its schedule and gave
    the second call the first one's cache."""
    tm, sched, ex = tiny_dit_export
    opt, runner = optimize_with_schedule(tm.model, sched), OnnxRunner(ex.path)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (1000.0, 900.0, 800.0):
            for _ in range(2):
                ref, got = _call(opt, tm, x, t), _call(runner, tm, x, t)
                assert float((ref - got).abs().max()) <= 1e-3, t
            x = x - 0.05 * ref[:, :4]
    assert runner.repeated and fastcache.get_cache_statistics(opt)["block_approx_ratio"] == 0.0


def test_runner_refuses_a_file_without_the_watched_input(tiny_dit_export, tmp_path):
    _, _, ex = tiny_dit_export
    m = onnx.load(str(ex.path))
    keep = [p for p in m.metadata_props if p.key != "fx_fastcache.stream_input"]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    old = tmp_path / "old.onnx"
    onnx.save(m, str(old))
    with pytest.raises(ValueError, match="fx_fastcache.stream_input.*export the model again"):
        OnnxRunner(old)


@pytest.fixture(scope="module")
def calibrated_tiny_dit(tmp_path_factory):
    """tiny-dit optimized with the fitted fallback residual_linear (deciding policy), calibrated and
    saved, and a residual_linear schedule for it."""
    tm = make_tiny("tiny-dit")
    opt = fastcache.optimize(tm.model, backend="eager", fallback="residual_linear")
    with fastcache.calibrate(opt), torch.no_grad():
        tiny_loop(opt, tm, 6)
    path = tmp_path_factory.mktemp("calib") / "C.safetensors"
    fastcache.save_calibration(opt, path)
    base = pattern_schedule(tm.model, 6)
    sched = Schedule(base.table, base.blocks, base.fingerprint, {**base.config, "fallback": "residual_linear"})
    return tm, opt, sched, path


def _calibrated_replay(tm, sched, path):
    replay = optimize_with_schedule(tm.model, sched)
    fastcache.load_calibration(replay, path)
    return replay


def test_export_keeps_the_calibration_of_the_model_it_is_given(calibrated_tiny_dit, tmp_path):
    """Exporting a calibrated model whose policy decides (so the export re-optimizes it with the
    schedule) replays its fit (A, b), not the uncalibrated fallback."""
    tm, opt, sched, path = calibrated_tiny_dit
    ex = export_onnx(opt, sched, tm.make_inputs(1000.0, 2), tmp_path / "rl.onnx")
    with torch.no_grad():
        ref = tiny_loop(_calibrated_replay(tm, sched, path), tm, sched.steps)
        uncalibrated = tiny_loop(optimize_with_schedule(tm.model, sched), tm, sched.steps)
        got = tiny_loop(OnnxRunner(ex.path), tm, sched.steps)
    assert max(float((r - u).abs().max()) for r, u in zip(ref, uncalibrated)) > 1e-2  # the fit matters here
    for step, (r, o) in enumerate(zip(ref, got)):
        assert float((r - o).abs().max()) <= 1e-3, step
    other = Schedule(sched.table, sched.blocks, sched.fingerprint, {**sched.config, "fallback": "linear"})
    with pytest.raises(ValueError, match="fitted for fallback='residual_linear'.*fallback='linear'"):
        export_onnx(opt, other, tm.make_inputs(1000.0, 2), tmp_path / "other.onnx")


def test_cli_export_onnx_with_calibration(calibrated_tiny_dit, tmp_path, capsys, caplog):
    """``export-onnx --calibration --verify`` (the CLI's one export in the suite: an export without a
    calibration is the API's, above)."""
    from fx_fastcache.cli.main import main

    tm, _, sched, path = calibrated_tiny_dit
    s, out = tmp_path / "S.json", tmp_path / "M.onnx"
    sched.save(s)
    with caplog.at_level(logging.WARNING, logger="fx_fastcache"):
        assert main(["export-onnx", "--model", "tiny-dit", "--schedule", str(s), "--out", str(out),
                     "--calibration", str(path), "--verify"]) == 0
    assert not any("gradients enabled" in r.getMessage() for r in caplog.records)  # --verify runs without grad
    text = capsys.readouterr().out
    assert re.search(r"2 blocks in \d If \(guarded spans\)", text) and "verify" in text
    worst = float(text.split("max |onnxruntime - PyTorch| = ")[1].split()[0])
    assert worst <= 1e-3
    _check_graph(out, 2)
    with torch.no_grad():  # --verify compared with the calibrated model: so does this
        ref = tiny_loop(_calibrated_replay(tm, sched, path), tm, sched.steps)
        got = tiny_loop(OnnxRunner(out), tm, sched.steps)
    for step, (r, o) in enumerate(zip(ref, got)):
        assert float((r - o).abs().max()) <= 1e-3, step


def test_cli_export_onnx_refuses_a_fitted_fallback_without_calibration(calibrated_tiny_dit, tmp_path, capsys):
    from fx_fastcache.cli.main import main

    _, _, sched, _ = calibrated_tiny_dit
    s, out = tmp_path / "S.json", tmp_path / "M.onnx"
    sched.save(s)
    assert main(["export-onnx", "--model", "tiny-dit", "--schedule", str(s), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fallback='residual_linear'" in err and "--calibration" in err
    assert not out.exists()


def test_per_sample_timesteps_use_the_largest_entry_like_the_clock(tiny_dit_export):
    """The exported graph read the timestep's first entry, the clock its largest: with the first entry
    at 0 (a conditioning frame) the export's forecast lost its slope in t (0.099 off)."""
    tm, sched, ex = tiny_dit_export  # the graph, not the example values, decides which entry is read

    def inputs(t):
        return dict(tm.make_inputs(1000.0, 2), timestep=torch.tensor([0.0, float(t)]))

    ts = torch.linspace(1000.0, 0.0, sched.steps + 1)[:-1].tolist()
    with torch.no_grad():
        ref = [optimize_with_schedule(tm.model, sched)] + [OnnxRunner(ex.path)]
        outs = [[m(**inputs(t))[0] for t in ts] for m in ref]
    for step, (r, g) in enumerate(zip(*outs)):
        assert float((r - g).abs().max()) <= 1e-3, step


def test_export_leaves_the_given_model_as_it_was(tiny_dit_export, tmp_path):
    """Exporting a planned model with a schedule installed that schedule on it: it came back as
    policy="schedule" with warm-up 0, and configure(target_fraction=...) no longer changed anything."""
    tm, sched, _ = tiny_dit_export
    opt = fastcache.optimize(tm.model, backend="eager", policy="planned", target_fraction=0.5)
    with fastcache.calibrate(opt), torch.no_grad():
        for _ in range(2):
            tiny_loop(opt, tm, sched.steps)
    before, table = opt.fastcache_config, opt.installed_schedule().clone()
    export_onnx(opt, sched, tm.make_inputs(1000.0, 2), tmp_path / "planned.onnx")
    assert opt.fastcache_config == before and torch.equal(opt.installed_schedule(), table)


def test_complex_valued_models_are_refused_naming_why(tmp_path):
    """Qwen-Image's rotary embedding is complex-valued, which torch.onnx cannot convert (the model alone
    fails too): the export raised the exporter's error from deep inside, which the CLI called an internal
    error to report."""
    tm = make_tiny("tiny-qwenimage")
    with pytest.raises(ValueError, match=r"QwenImageTransformer2DModel computes with complex-valued tensors.*"
                                         r"ONNX export is not available for this model"):
        export_onnx(tm.model, pattern_schedule(tm.model, 6), tm.make_inputs(1000.0, 2), tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()
    tz = make_tiny("tiny-z-image")  # its timestep rises, which the runner's generation rule cannot read
    with pytest.raises(ValueError, match=r"ZImageTransformer2DModel's timestep rises.*export is not supported"):
        export_onnx(tz.model, pattern_schedule(tz.model, 6), tz.make_inputs(1000.0, 2), tmp_path / "z.onnx")
    assert not (tmp_path / "z.onnx").exists()


def test_runner_refuses_a_bfloat16_export_naming_the_fix(tmp_path):
    """A bfloat16 model exports, but onnxruntime has no bfloat16 convolution: the runner (and ``--verify``)
    failed with onnxruntime's raw InvalidGraph."""
    tm = make_tiny("tiny-dit", layers=1)
    tm.model.to(torch.bfloat16)
    kw = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
          for k, v in tm.make_inputs(1000.0, 2).items()}
    export_onnx(tm.model, pattern_schedule(tm.model, 4), kw, tmp_path / "b.onnx")
    with pytest.raises(ValueError, match=r"exported from a bfloat16 model.*float16 or float32"):
        OnnxRunner(tmp_path / "b.onnx")
