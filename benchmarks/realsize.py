"""Real-size speed of FastCache on PixArt-Σ, SD3-medium and FLUX.1-dev configurations (random weights; also Wan2.1-1.3B).

Measured side by side in one process, per model:

* ``base``: the plain transformer, eager and ``torch.compile`` (``--compile`` mode);
* ``cond``: ``fastcache.optimize(policy="schedule", backend="inductor")``: every block guarded
  by an in-graph ``torch.cond`` (inductor turns each into ``if pred.item()``: one sync per block,
  no CUDA graphs), driven by a fixed table set with ``fastcache.set_schedule``;
* ``dispatch``: :class:`fx_fastcache.step_dispatch.StepDispatch` on the same rewritten graph:
  the host picks the step's skip pattern and replays a copy specialised for it (no cond,
  ``torch.compile(mode="reduce-overhead")`` = CUDA graphs);
* ``dispatch-sync``: the same, but the pattern is computed in a compiled prefix graph and read
  back once per step (``decide="device"``), as the data-dependent step policies need; the
  difference to ``dispatch`` is the price of that sync and of the cut;
* one bare block of each kind compiled alone, and the fallback's cheap branch alone.

Schedules: after ``--warmup`` full steps every step replaces the same set of blocks: every
other block (50 %) or 7 of every 10 (70 %).  Per-step time is the mean over ``--steps`` steps of
that pattern.  Derived numbers (per block, relative to the bare block):
guard overhead = (step with all blocks computed through the guarded graph − base step) / blocks;
cheap-branch cost = block − (saving per replaced block).
Ceiling (issue 6): ``1 / ((1 − r) + r · 0.04)``; ``measured ceiling`` replaces the block share by
the measured block time: ``base / (base − k · block · 0.96)``.

    python benchmarks/realsize.py                      # GPU, bf16, 1024×1024, all three models
    python benchmarks/realsize.py --small --compile eager --models pixart   # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import fx_fastcache as fastcache
from fx_fastcache.families import block_modules
from fx_fastcache.step_dispatch import StepDispatch

FALLBACK_FRACTION = 0.04  # the cheap-branch cost used for its ceiling
KINDS = ("cond", "dispatch", "dispatch_sync")


@dataclass
class Setup:
    name: str
    model: torch.nn.Module
    kwargs: dict[str, Any]
    block_kinds: dict[str, int]  # block list path -> number of blocks


def _randn(*shape, device, dtype, g):
    return torch.randn(*shape, generator=g, device="cpu", dtype=torch.float32).to(device=device, dtype=dtype)


def build(name: str, small: bool, device: torch.device, dtype: torch.dtype) -> Setup:
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: FLUX.1-dev in float32 would need 48 GB first
    try:
        return _build(name, small, device, dtype, g)
    finally:
        torch.set_default_dtype(default_dtype)


def _build(name: str, small: bool, device: torch.device, dtype: torch.dtype, g: torch.Generator) -> Setup:
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel

    with torch.device(device):
        if name == "pixart":
            layers, heads, hd, size, text, batch = (4, 2, 16, 16, 16, 2) if small else (28, 16, 72, 128, 300, 2)
            cap = 32 if small else 4096
            m = PixArtTransformer2DModel(num_attention_heads=heads, attention_head_dim=hd, in_channels=4,
                                         out_channels=8, num_layers=layers, cross_attention_dim=heads * hd,
                                         sample_size=size, patch_size=2, caption_channels=cap,
                                         interpolation_scale=None if small else 2,
                                         use_additional_conditions=False)
            kw = dict(hidden_states=_randn(batch, 4, size, size, device=device, dtype=dtype, g=g),
                      encoder_hidden_states=_randn(batch, text, cap, device=device, dtype=dtype, g=g),
                      timestep=torch.full((batch,), 500.0, device=device),
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
            kinds = {"transformer_blocks": layers}
        elif name == "sd3":
            layers, heads, hd, size, text, batch = (4, 2, 16, 16, 16, 2) if small else (24, 24, 64, 128, 333, 2)
            joint, pooled = (32, 32) if small else (4096, 2048)
            m = SD3Transformer2DModel(sample_size=size, patch_size=2, in_channels=16, num_layers=layers,
                                      attention_head_dim=hd, num_attention_heads=heads, joint_attention_dim=joint,
                                      caption_projection_dim=heads * hd, pooled_projection_dim=pooled,
                                      out_channels=16, pos_embed_max_size=size if small else 192)
            kw = dict(hidden_states=_randn(batch, 16, size, size, device=device, dtype=dtype, g=g),
                      encoder_hidden_states=_randn(batch, text, joint, device=device, dtype=dtype, g=g),
                      pooled_projections=_randn(batch, pooled, device=device, dtype=dtype, g=g),
                      timestep=torch.full((batch,), 500.0, device=device), return_dict=False)
            kinds = {"transformer_blocks": layers}
        elif name == "flux":
            if small:
                layers, single, heads, hd, side, text, axes = 2, 4, 2, 16, 8, 8, (4, 6, 6)
                joint, pooled = 32, 32
            else:
                layers, single, heads, hd, side, text, axes = 19, 38, 24, 128, 64, 512, (16, 56, 56)
                joint, pooled = 4096, 768
            m = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single,
                                       attention_head_dim=hd, num_attention_heads=heads, joint_attention_dim=joint,
                                       pooled_projection_dim=pooled, guidance_embeds=True, axes_dims_rope=axes)
            img_ids = torch.zeros(side * side, 3, device=device)
            img_ids[:, 1] = torch.arange(side * side, device=device) // side
            img_ids[:, 2] = torch.arange(side * side, device=device) % side
            kw = dict(hidden_states=_randn(1, side * side, 64, device=device, dtype=dtype, g=g),
                      encoder_hidden_states=_randn(1, text, joint, device=device, dtype=dtype, g=g),
                      pooled_projections=_randn(1, pooled, device=device, dtype=dtype, g=g),
                      timestep=torch.full((1,), 0.5, device=device), img_ids=img_ids,
                      txt_ids=torch.zeros(text, 3, device=device), guidance=torch.full((1,), 3.5, device=device),
                      return_dict=False)
            kinds = {"transformer_blocks": layers, "single_transformer_blocks": single}
        elif name == "wan":  # Wan2.1-T2V-1.3B, 480×832, 33 frames: 9 × 30 × 52 = 14040 video tokens
            layers, heads, hd, ffn, frames, hh, ww, text = ((2, 2, 16, 64, 2, 8, 8, 8) if small
                                                             else (30, 12, 128, 8960, 9, 60, 104, 512))
            tdim, fdim = (32, 16) if small else (4096, 256)
            m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=hd,
                                      in_channels=16, out_channels=16, text_dim=tdim, freq_dim=fdim, ffn_dim=ffn,
                                      num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                      eps=1e-6, rope_max_seq_len=1024)
            kw = dict(hidden_states=_randn(1, 16, frames, hh, ww, device=device, dtype=dtype, g=g),
                      encoder_hidden_states=_randn(1, text, tdim, device=device, dtype=dtype, g=g),
                      timestep=torch.full((1,), 500.0, device=device), return_dict=False)
            kinds = {"blocks": layers}
        else:
            raise ValueError(f"unknown model {name!r}; choose pixart, sd3, flux or wan")
    m = m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Setup(name, m, kw, kinds)


# -- timing --------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 2) -> float:
    """Mean milliseconds per call (wall clock around ``iters`` calls, synchronised at both ends)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
    return (time.perf_counter() - t0) * 1e3 / iters


def timesteps(name: str, n: int) -> list[float]:
    hi, lo = (1.0, 0.02) if name == "flux" else (999.0, 20.0)
    return [hi + (lo - hi) * i / max(n - 1, 1) for i in range(n)]


def with_t(kw: dict[str, Any], t: float) -> dict[str, Any]:
    out = dict(kw)
    out["timestep"] = torch.full_like(kw["timestep"], t)
    return out


def time_schedule(call: Callable[[dict], Any], reset: Callable[[], None], setup: Setup, warm: int, steps: int,
                  device: torch.device, repeats: int) -> float:
    """Mean ms per step over the ``steps`` steps after ``warm`` full steps (best of ``repeats`` runs)."""
    ts = timesteps(setup.name, warm + steps)
    inputs = [with_t(setup.kwargs, t) for t in ts]
    best = float("inf")
    with torch.no_grad():
        for rep in range(repeats + 1):  # the first run compiles/captures whatever it meets: not timed
            reset()
            for kw in inputs[:warm]:
                call(kw)
            _sync(device)
            t0 = time.perf_counter()
            for kw in inputs[warm:]:
                call(kw)
            _sync(device)
            if rep:
                best = min(best, (time.perf_counter() - t0) * 1e3 / steps)
    return best


def skip_pattern(n: int, ratio: float) -> list[bool]:
    if ratio == 0:
        return [False] * n
    if abs(ratio - 0.5) < 1e-9:
        return [i % 2 == 0 for i in range(n)]
    if abs(ratio - 0.7) < 1e-9:
        return [i % 10 < 7 for i in range(n)]
    k = round(ratio * n)
    return [i * k // n != (i + 1) * k // n for i in range(n)]  # spread k skips evenly


def table_for(n: int, ratio: float, warm: int, steps: int) -> torch.Tensor:
    t = torch.zeros(warm + steps, n, dtype=torch.bool)
    t[warm:] = torch.tensor(skip_pattern(n, ratio))
    return t


def capture_block_inputs(setup: Setup) -> dict[str, tuple[torch.nn.Module, tuple, dict]]:
    """One bare block of each kind with the inputs it sees in a real forward."""
    got: dict[str, tuple] = {}
    handles = []
    for path in setup.block_kinds:
        block = getattr(setup.model, path)[0]

        def hook(mod, args, kwargs, path=path):
            got.setdefault(path, (mod, args, kwargs))

        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            setup.model(**setup.kwargs)
    finally:
        for h in handles:
            h.remove()
    return got


def compile_fn(fn: Any, mode: str) -> Any:
    if mode == "eager":
        return fn
    return torch.compile(fn, mode=mode)


def run_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
              log: Callable[[str], None]) -> dict[str, Any]:
    res: dict[str, Any] = {"model": name}
    t0 = time.perf_counter()
    setup = build(name, args.small, device, dtype)
    m, kw = setup.model, setup.kwargs
    n = sum(setup.block_kinds.values())
    res["blocks"] = n
    res["shapes"] = {k: list(v.shape) for k, v in kw.items() if isinstance(v, torch.Tensor)}
    log(f"[{name}] built {n} blocks, {sum(p.numel() for p in m.parameters()) / 1e9:.2f} B params "
        f"in {time.perf_counter() - t0:.1f}s")
    iters = args.iters

    # -- bare blocks and the cheap branch alone
    blocks = capture_block_inputs(setup)
    res["block_ms"] = {}
    for path, (mod, bargs, bkw) in blocks.items():
        f = compile_fn(mod, args.compile)
        res["block_ms"][path] = time_calls(lambda: f(*bargs, **bkw), device, iters * 4, warmup=3)
    block_ms = sum(res["block_ms"][p] * c for p, c in setup.block_kinds.items()) / n
    res["block_avg_ms"] = block_ms
    log(f"[{name}] bare block ms {res['block_ms']} (avg {block_ms:.3f})")

    # -- baselines
    res["base_eager_ms"] = time_calls(lambda: m(**kw), device, iters)
    t0 = time.perf_counter()
    base = compile_fn(m, args.compile)
    res["base_ms"] = time_calls(lambda: base(**kw), device, iters, warmup=3)
    log(f"[{name}] base eager {res['base_eager_ms']:.2f} ms, compiled({args.compile}) {res['base_ms']:.2f} ms "
        f"(compile+run {time.perf_counter() - t0:.0f}s)")

    # -- the rewritten graph (one export shared by the cond and dispatch measurements)
    t0 = time.perf_counter()
    opt = fastcache.optimize(m, backend="eager" if args.compile == "eager" or "cond" not in args.modes else "inductor",
                             policy="schedule", fallback=args.fallback, warmup_steps=args.warmup)
    opt.capture(**kw)
    log(f"[{name}] export + passes {time.perf_counter() - t0:.0f}s")
    warm, steps = args.warmup, args.steps
    ratios = [0.0] + args.ratios

    def sweep(kind: str, call: Callable[[dict], Any], reset: Callable[[], None],
              install: Callable[[torch.Tensor], None]) -> None:
        """Time ``call`` on every ratio's schedule table (installed with ``install``)."""
        res[f"{kind}_ms"] = {}
        for r in ratios:
            install(table_for(n, r, warm, steps))
            t0 = time.perf_counter()
            res[f"{kind}_ms"][r] = time_schedule(call, reset, setup, warm, steps, device, args.repeats)
            log(f"[{name}] {kind.replace('_', '-')} r={r:.1f}: {res[f'{kind}_ms'][r]:.2f} ms/step "
                f"({time.perf_counter() - t0:.0f}s)")

    def install_in_graph(table: torch.Tensor) -> None:
        fastcache.set_schedule(opt, table)

    disp = dev = None
    if "dispatch" in args.modes:  # the host reads the pattern from the table: no sync
        disp = StepDispatch(opt, table_for(n, 0.0, warm, steps), compile_mode=args.dispatch_compile)
        sweep("dispatch", lambda k: disp(**k), disp.reset, disp.set_table)
    if "dispatch_sync" in args.modes:
        # the same schedule, but the pattern is read from the graph each step (one sync), as a
        # data-dependent step policy (step_forecast, teacache, first_block_cache) does it
        dev = StepDispatch(opt, compile_mode=args.dispatch_compile, decide="device")
        sweep("dispatch_sync", lambda k: dev(**k), dev.reset, install_in_graph)
    if "cond" in args.modes:
        try:
            sweep("cond", lambda k: opt(**k), opt.reset, install_in_graph)
        except Exception:
            if not args.keep_going:
                raise
            res.pop("cond_ms", None)
            log(f"[{name}] cond FAILED:\n{traceback.format_exc()[-3000:]}")
    stats = fastcache.get_cache_statistics(opt)
    res["last_stats"] = {k: stats[k] for k in ("block_approx_ratio", "blocks_approximated", "block_evaluations")}

    # -- derived
    base_ms = res["base_ms"]
    derived: dict[str, Any] = {}
    for kind in KINDS:
        tab = res.get(f"{kind}_ms")
        if not tab:
            continue
        full = tab[0.0]
        d = {"guard_overhead_per_block_frac": (full - base_ms) / n / block_ms}
        for r in args.ratios:
            k = sum(skip_pattern(n, r))
            saving = (full - tab[r]) / k
            ceiling = 1.0 / ((1 - r) + r * FALLBACK_FRACTION)
            left = base_ms - k * block_ms * (1 - FALLBACK_FRACTION)
            measured_ceiling = base_ms / left if left > 0 else float("nan")
            speed = base_ms / tab[r]
            d[r] = {"speedup": speed, "ceiling": ceiling, "of_ceiling": speed / ceiling,
                    "measured_ceiling": measured_ceiling, "of_measured_ceiling": speed / measured_ceiling,
                    "cheap_branch_frac": (block_ms - saving) / block_ms}
        derived[kind] = d
    res["derived"] = derived
    counters = torch._dynamo.utils.counters
    res["cudagraph_counters"] = {k: dict(v) for k, v in counters.items() if "cudagraph" in k.lower()}
    res["inductor_counters"] = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k.lower()}
    torch._dynamo.utils.counters.clear()
    del disp, dev, opt, base
    return res


def report(results: list[dict[str, Any]], out: Callable[[str], None]) -> None:
    out("\n| model | blocks | block ms | base eager | base compiled | mode | r | step ms | speedup | "
        "of ceiling | of measured ceiling | guard/block | cheap/block |")
    out("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for res in results:
        for kind in KINDS:
            tab = res.get(f"{kind}_ms")
            if not tab:
                continue
            d = res["derived"][kind]
            for r, ms in tab.items():
                row = d.get(r, {})
                def f(key, fmt="{:.2f}"):
                    return fmt.format(row[key]) if key in row else "—"
                guard = f"{d['guard_overhead_per_block_frac'] * 100:.1f}%" if r == 0 else ""
                cheap = f"{row['cheap_branch_frac'] * 100:.1f}%" if row else ""
                out(f"| {res['model']} | {res['blocks']} | {res['block_avg_ms']:.3f} | {res['base_eager_ms']:.2f} | "
                    f"{res['base_ms']:.2f} | {kind.replace('_', '-')} | {r:.1f} | {ms:.2f} | {f('speedup')}× | "
                    f"{f('of_ceiling', '{:.0%}')} | {f('of_measured_ceiling', '{:.0%}')} | {guard} | {cheap} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["pixart", "sd3", "flux"], choices=["pixart", "sd3", "flux", "wan"],
                   help="wan (Wan2.1-T2V-1.3B, a video DiT) is not in the issue's table: opt in")
    p.add_argument("--small", action="store_true", help="reduced sizes (CPU / CI); implied without CUDA")
    p.add_argument("--compile", default=None, choices=["reduce-overhead", "default", "eager"],
                   help="mode of the baseline and bare-block compiles (default: reduce-overhead on CUDA, eager on CPU)")
    p.add_argument("--dispatch-compile", default=None, choices=["reduce-overhead", "default", "eager"],
                   help="mode of the specialised step graphs (default: same as --compile)")
    p.add_argument("--modes", nargs="+", default=list(KINDS), choices=list(KINDS),
                   help="what to time on the rewritten graph (default: all)")
    p.add_argument("--no-cond", action="store_true", help="same as leaving cond out of --modes")
    p.add_argument("--fallback", default="residual_linear")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.7])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--keep-going", action="store_true", help="report a failing model's traceback and go on")
    args = p.parse_args(argv)
    if args.no_cond:
        args.modes = [m for m in args.modes if m != "cond"]
    cuda = torch.cuda.is_available()
    args.small = args.small or not cuda
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.compile is None:
        args.compile = "reduce-overhead" if cuda else "eager"
    if args.dispatch_compile is None:
        args.dispatch_compile = args.compile
    logging.getLogger("fx_fastcache").setLevel(logging.ERROR)

    def log(s: str) -> None:
        print(s, flush=True)

    log(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if cuda else 'cpu'}, dtype {dtype}, "
        f"small={args.small}, compile={args.compile}, dispatch={args.dispatch_compile}, fallback={args.fallback}")
    results = []
    for name in args.models:
        try:
            results.append(run_model(name, args, device, dtype, log))
        except Exception:
            if not args.keep_going:
                raise
            log(f"[{name}] FAILED:\n{traceback.format_exc()}")
            continue
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"args": vars(args), "results": results}, fh, indent=1, default=str)
        if cuda:
            torch.cuda.empty_cache()
    report(results, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
