"""Cache-state memory of FastCache (guarded spans vs one guard per block) and of diffusers' caches.

Three measurements, printed as one Markdown table per section:

1. **FastCache state per cache context** at real size: PixArt-Σ, SD3-medium and FLUX.1-dev at
   1024², Wan2.1-1.3B at 480p × 33 frames, Wan2.1-14B at 720p × 81 frames (default config:
   ``step_forecast`` + ``forecast``).  How: the real-width config is built on
   ``torch.device("meta")`` with ``--depth`` blocks per block list (no memory is allocated) and
   captured by ``fastcache.optimize(...).capture``; the state is every per-context buffer of the
   captured graph (``fx_fastcache.context_state.swappable_buffers``: clock, guards, fallbacks,
   step decider), summed from shapes and dtypes.  ``span="auto"`` does not depend on depth (one
   span), so its number is the capture's; ``span="block"`` is the capture's per-block state
   times the real block count (every block of a list holds the same state), plus the rest.
   "activations" = state bytes / one hidden-state activation (batch × tokens × width × dtype).
2. **diffusers' caches** (First-Block-Cache, MagCache, TaylorSeer; ``diffusers.hooks``): run
   for ``--steps`` steps at reduced size on CPU (same family, small width/tokens, at a small
   depth and at twice it), every tensor their hooks hold is collected (deduplicated by storage),
   classified by shape as an image-token activation, a text-token activation or image+text,
   extrapolated linearly to the real depth and scaled to the real config's activation sizes.
   Weights and the model's own buffers are excluded.  cache-dit's DBCache (F1B0) and DBCache with
   its TaylorSeer calibrator (order 1) are measured the same way when cache-dit is installed (the
   ``peers`` extra), with the benchmark peer's adapter (the block lists and forward patterns of cache-dit's
   own adapters; :func:`fx_fastcache.bench.peers.cache_dit_dbcache`), one cache
   context (Wan's adapter separates CFG into two; the table is per context), at threshold 0 so every
   step computes and the calibrator holds its full state.
3. **CPU peak memory** (``ru_maxrss`` of a fresh process) of a reduced-size PixArt generation:
   uncached vs ``optimize(backend="eager")`` with ``span="auto"`` and ``span="block"``.

    python benchmarks/memory.py                     # everything (about 10 min on 1 CPU thread)
    python benchmarks/memory.py --skip-peak --models pixart,flux
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

import fx_fastcache as fastcache
from fx_fastcache.context_state import swappable_buffers

GB = 1e9
MB = 1e6


@dataclass
class Config:
    key: str
    title: str
    family: str  # "pixart" | "sd3" | "flux" | "wan"
    dims: dict[str, Any]
    contexts: int  # cache contexts per generation with CFG (batched CFG: 1)
    blocks: dict[str, int]  # block list -> real block count


CONFIGS = {
    "pixart": Config("pixart", "PixArt-Σ 1024², CFG batch 2", "pixart",
                     dict(layers=28, heads=16, hd=72, size=128, text=300, cap=4096, batch=2), 1,
                     {"transformer_blocks": 28}),
    "sd3": Config("sd3", "SD3-medium 1024², CFG batch 2", "sd3",
                  dict(layers=24, heads=24, hd=64, size=128, text=333, joint=4096, pooled=2048, batch=2, pos=192), 1,
                  {"transformer_blocks": 24}),
    "flux": Config("flux", "FLUX.1-dev 1024² (guidance-distilled, 1 call)", "flux",
                   dict(layers=19, single=38, heads=24, hd=128, side=64, text=512, joint=4096, pooled=768,
                        axes=(16, 56, 56)), 1, {"transformer_blocks": 19, "single_transformer_blocks": 38}),
    "wan13": Config("wan13", "Wan2.1-1.3B 480p×33f, CFG = 2 contexts", "wan",
                    dict(layers=30, heads=12, hd=128, ffn=8960, frames=9, hh=60, ww=104, text=512, tdim=4096), 2,
                    {"blocks": 30}),
    "wan14": Config("wan14", "Wan2.1-14B 720p×81f, CFG = 2 contexts", "wan",
                    dict(layers=40, heads=40, hd=128, ffn=13824, frames=21, hh=90, ww=160, text=512, tdim=4096), 2,
                    {"blocks": 40}),
}

#: Reduced sizes for the CPU runs of diffusers' caches (same families, small widths and tokens).
SMALL = {
    "pixart": dict(layers=4, heads=2, hd=16, size=16, text=8, cap=32, batch=2),
    "sd3": dict(layers=4, heads=2, hd=16, size=16, text=8, joint=32, pooled=32, batch=2, pos=16),
    "flux": dict(layers=2, single=4, heads=2, hd=16, side=8, text=8, joint=32, pooled=32, axes=(4, 6, 6)),
    "wan": dict(layers=4, heads=2, hd=16, ffn=64, frames=2, hh=8, ww=8, text=8, tdim=32),
}


def build(family: str, d: dict[str, Any], device: torch.device, dtype: torch.dtype, depth: int | None = None):
    """``(model, kwargs at timestep 500)`` of ``family`` with dims ``d`` (``depth``: blocks per list)."""
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel

    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        if device.type == "meta":
            return torch.empty(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def lay(n):
        return n if depth is None else min(n, depth)

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if family == "pixart":
                m = PixArtTransformer2DModel(num_attention_heads=d["heads"], attention_head_dim=d["hd"], in_channels=4,
                                             out_channels=8, num_layers=lay(d["layers"]),
                                             cross_attention_dim=d["heads"] * d["hd"], sample_size=d["size"],
                                             patch_size=2, caption_channels=d["cap"],
                                             interpolation_scale=2 if d["size"] >= 128 else None,
                                             use_additional_conditions=False)
                kw = dict(hidden_states=rnd(d["batch"], 4, d["size"], d["size"]),
                          encoder_hidden_states=rnd(d["batch"], d["text"], d["cap"]),
                          timestep=torch.full((d["batch"],), 500.0), added_cond_kwargs={"resolution": None,
                                                                                       "aspect_ratio": None},
                          return_dict=False)
            elif family == "sd3":
                m = SD3Transformer2DModel(sample_size=d["size"], patch_size=2, in_channels=16,
                                          num_layers=lay(d["layers"]),
                                          attention_head_dim=d["hd"], num_attention_heads=d["heads"],
                                          joint_attention_dim=d["joint"], caption_projection_dim=d["heads"] * d["hd"],
                                          pooled_projection_dim=d["pooled"], out_channels=16,
                                          pos_embed_max_size=d["pos"])
                kw = dict(hidden_states=rnd(d["batch"], 16, d["size"], d["size"]),
                          encoder_hidden_states=rnd(d["batch"], d["text"], d["joint"]),
                          pooled_projections=rnd(d["batch"], d["pooled"]), timestep=torch.full((d["batch"],), 500.0),
                          return_dict=False)
            elif family == "flux":
                side = d["side"]
                m = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=lay(d["layers"]),
                                           num_single_layers=lay(d["single"]), attention_head_dim=d["hd"],
                                           num_attention_heads=d["heads"], joint_attention_dim=d["joint"],
                                           pooled_projection_dim=d["pooled"], guidance_embeds=True,
                                           axes_dims_rope=d["axes"])
                ar = torch.arange(side * side, device=device)
                img_ids = torch.stack([torch.zeros_like(ar), ar // side, ar % side], dim=1).float()
                kw = dict(hidden_states=rnd(1, side * side, 64), encoder_hidden_states=rnd(1, d["text"], d["joint"]),
                          pooled_projections=rnd(1, d["pooled"]), timestep=torch.full((1,), 0.5),
                          img_ids=img_ids, txt_ids=torch.zeros(d["text"], 3),
                          guidance=torch.full((1,), 3.5), return_dict=False)
            elif family == "wan":
                m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=d["heads"],
                                          attention_head_dim=d["hd"], in_channels=16, out_channels=16,
                                          text_dim=d["tdim"], freq_dim=256 if d["tdim"] >= 1024 else 16,
                                          ffn_dim=d["ffn"], num_layers=lay(d["layers"]), cross_attn_norm=True,
                                          qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
                kw = dict(hidden_states=rnd(1, 16, d["frames"], d["hh"], d["ww"]),
                          encoder_hidden_states=rnd(1, d["text"], d["tdim"]), timestep=torch.full((1,), 500.0),
                          return_dict=False)
            else:
                raise ValueError(f"unknown family {family!r}")
    finally:
        torch.set_default_dtype(old)
    return m.to(dtype=dtype).eval().requires_grad_(False), kw


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def stream_sizes(cfg_dims: dict[str, Any], family: str, dtype_bytes: int = 2) -> tuple[int, int, int, int]:
    """``(image tokens, text tokens, width, batch)`` of one block input at these dims."""
    d = cfg_dims
    width = d["heads"] * d["hd"]
    if family in ("pixart", "sd3"):
        return (d["size"] // 2) ** 2, d["text"], width, d["batch"]
    if family == "flux":
        return d["side"] ** 2, d["text"], width, 1
    return d["frames"] * (d["hh"] // 2) * (d["ww"] // 2), d["text"], width, 1


# -- 1. FastCache state from real-width captures on meta -------------------------------------
def fastcache_state(cfg: Config, depth: int, dtype: torch.dtype) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tokens, _, width, batch = stream_sizes(cfg.dims, cfg.family)
    act = batch * tokens * width * torch.finfo(dtype).bits // 8
    out["activation_bytes"] = act
    for span in ("auto", "block"):
        t0 = time.time()
        model, kw = build(cfg.family, cfg.dims, torch.device("meta"), dtype, depth=depth)
        opt = fastcache.optimize(model, backend="eager", span=span)
        entry = opt.capture(**kw)
        bufs = swappable_buffers(entry.gm, opt.store)
        per_guard: dict[str, int] = {}
        rest = 0
        for name, b in bufs:
            if name.startswith("fastcache_guard_"):
                g = name.split(".")[0]
                per_guard[g] = per_guard.get(g, 0) + _nbytes(b)
            else:
                rest += _nbytes(b)
        guards = entry.guards
        if span == "auto":
            total = rest + sum(per_guard.values())
            how = f"capture of {sum(len(g.blocks) for g in guards)} blocks on meta ({len(guards)} span(s))"
        else:  # scale each list's per-block state to its real block count
            total = rest
            for path, n_real in cfg.blocks.items():
                mine = [g for g in guards if g.block_name.startswith(path + ".")]
                one = per_guard[f"fastcache_guard_{mine[0].index}"]
                total += one * n_real
            how = f"per-block state of a {len(guards)}-block capture on meta × real block counts"
        out[span] = {"bytes": total, "activations": total / act, "spans": len(guards), "how": how,
                     "capture_s": time.time() - t0}
    return out


# -- 2. diffusers' caches at reduced size on CPU ---------------------------------------------
def _held(model: torch.nn.Module, tensors) -> list[torch.Tensor]:
    """``tensors`` without weights or model buffers and empty ones, one per storage."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    found: dict[int, torch.Tensor] = {}
    for t in tensors:
        p = t.untyped_storage().data_ptr()
        if p not in own and t.numel() > 0:
            found.setdefault(p, t)
    return list(found.values())


def _hook_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor reachable from the diffusers hooks of ``model`` (not weights or model buffers)."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(o: Any, depth: int) -> None:
        if depth > 8 or id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            found.append(o)
            return
        if isinstance(o, torch.nn.Module):
            return
        if isinstance(o, dict):
            for v in o.values():
                walk(v, depth + 1)
        elif isinstance(o, (list, tuple, set)):
            for v in o:
                walk(v, depth + 1)
        elif hasattr(o, "__dict__") and not isinstance(o, type):
            for v in vars(o).values():
                walk(v, depth + 1)

    for m in model.modules():
        reg = getattr(m, "_diffusers_hook", None)
        if reg is not None:
            walk(getattr(reg, "hooks", {}), 0)
    return _held(model, found)


def peer_state(cfg: Config, peer: str, steps: int) -> dict[str, Any]:
    """A peer's held state scaled to the real config: measured at the small depth and at twice
    it, extrapolated linearly in depth (per-module caches such as TaylorSeer's grow with it),
    and scaled from the small to the real activation sizes."""
    small = SMALL[cfg.family]
    one = _peer_state_at(cfg, peer, steps, small)
    two = _peer_state_at(cfg, peer, steps, {**small, "layers": 2 * small["layers"],
                                            **({"single": 2 * small["single"]} if "single" in small else {})})
    k = cfg.dims["layers"] / small["layers"]  # real depth in units of the small depth
    out = {key: one[key] + (two[key] - one[key]) * (k - 1.0) for key in ("bytes", "activations", "image_acts",
                                                                          "text_acts")}
    out.update(tensors=one["tensors"], tensors_at_2x_depth=two["tensors"], depth_scale=k,
               other_bytes_small=one["other_bytes_small"])
    return out


def _peer_state_at(cfg: Config, peer: str, steps: int, small: dict[str, Any]) -> dict[str, Any]:
    from diffusers.hooks import (FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig, apply_first_block_cache,
                                 apply_mag_cache, apply_taylorseer_cache)

    model, kw = build(cfg.family, small, torch.device("cpu"), torch.float32)
    if peer.startswith("cache_dit"):
        from fx_fastcache.bench.peers import cache_dit_dbcache, cache_dit_state_tensors

        run = cache_dit_dbcache(model, 0.0, steps, warmup_steps=2, taylorseer_order=int(peer == "cache_dit_taylorseer"))
        _generate(cfg, run.model, kw, steps)
        return _count_held(cfg, small, _held(run.model, cache_dit_state_tensors(run.model)))
    if peer == "first_block_cache":
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.05))
    elif peer == "mag_cache":
        apply_mag_cache(model, MagCacheConfig(threshold=0.06, num_inference_steps=steps, mag_ratios=[1.0] * steps))
    elif peer == "taylorseer":
        apply_taylorseer_cache(model, TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                                            max_order=1, taylor_factors_dtype=torch.float32))
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(model, CacheContext("cond"))  # what CacheMixin.cache_context does (PixArt has none)
    _generate(cfg, model, kw, steps)
    return _count_held(cfg, small, _hook_tensors(model))


def _generate(cfg: Config, model, kw: dict[str, Any], steps: int) -> None:
    ts = torch.linspace(1.0, 0.2, steps) if cfg.family == "flux" else torch.linspace(999.0, 200.0, steps)
    with torch.no_grad():
        for t in ts.tolist():
            call = dict(kw)
            call["timestep"] = torch.full_like(kw["timestep"], t)
            model(**call)


def _count_held(cfg: Config, small: dict[str, Any], held: list[torch.Tensor]) -> dict[str, Any]:
    """Classify held tensors by shape (image-token, text-token, image+text activations) and scale to ``cfg``."""
    tokens, text, width, batch = stream_sizes(small, cfg.family)
    r_tok, r_text, r_width, r_batch = stream_sizes(cfg.dims, cfg.family)
    counts = {"image": 0.0, "text": 0.0, "other_bytes": 0}
    for t in held:
        shape = tuple(t.shape)
        per = t.numel() / max(1, t.shape[-1]) if t.ndim else 1
        if t.ndim >= 2 and shape[-1] == width and per in (batch * tokens, tokens):
            counts["image"] += t.numel() / (batch * tokens * width)
        elif t.ndim >= 2 and shape[-1] == width and per in (batch * text, text):
            counts["text"] += t.numel() / (batch * text * width)
        elif t.ndim >= 2 and shape[-1] == width and per in (batch * (tokens + text), tokens + text):
            counts["image"] += t.numel() / (batch * (tokens + text) * width) * 1.0
            counts["text"] += t.numel() / (batch * (tokens + text) * width) * 1.0
        else:
            counts["other_bytes"] += _nbytes(t)
    act = r_batch * r_tok * r_width * 2  # bf16 at real size
    text_act = r_batch * r_text * r_width * 2
    real = counts["image"] * act + counts["text"] * text_act
    return {"image_acts": counts["image"], "text_acts": counts["text"], "other_bytes_small": counts["other_bytes"],
            "bytes": real, "activations": real / act, "tensors": len(held)}


# -- 3. CPU peak memory of a reduced-size generation -----------------------------------------
PEAK_DIMS = dict(layers=16, heads=4, hd=64, size=96, text=16, cap=64, batch=2)


def _peak_child(variant: str, steps: int) -> None:
    torch.set_num_threads(1)
    model, kw = build("pixart", PEAK_DIMS, torch.device("cpu"), torch.float32)
    run = model
    if variant != "uncached":
        run = fastcache.optimize(model, backend="eager", span=variant, cache_ratio_threshold=0.5)
    with torch.no_grad():
        for t in torch.linspace(999.0, 100.0, steps).tolist():
            call = dict(kw)
            call["timestep"] = torch.full_like(kw["timestep"], t)
            run(**call)
    print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def peak_memory(steps: int) -> dict[str, float]:
    out = {}
    for variant in ("uncached", "auto", "block"):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        p = subprocess.run([sys.executable, __file__, "--peak-child", variant, "--steps", str(steps)],
                           capture_output=True, text=True, env=env, check=True)
        out[variant] = json.loads(p.stdout.strip().splitlines()[-1])["maxrss_kb"] / 1024.0
    return out


# -- report ----------------------------------------------------------------------------------
def fmt_bytes(b: float) -> str:
    return f"{b / GB:.2f} GB" if b >= 0.1 * GB else f"{b / MB:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--depth", type=int, default=2, help="blocks per block list in the meta captures")
    ap.add_argument("--steps", type=int, default=6, help="steps of the peer runs / the peak-memory generation")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--skip-peak", action="store_true")
    ap.add_argument("--json", default="", help="also write the numbers to this file")
    ap.add_argument("--peak-child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peak_child:
        _peak_child(args.peak_child, args.steps)
        return 0
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    bad = [k for k in keys if k not in CONFIGS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {list(CONFIGS)}")
    results: dict[str, Any] = {"ours": {}, "peers": {}, "peak": {}}
    lines = ["### FastCache state per cache context (default config, bf16)", "",
             "| config | one activation | span=\"block\" (per block) | span=\"auto\" (spans) | auto: spans | "
             "contexts | auto, all contexts |", "|---|---|---|---|---|---|---|"]
    for k in keys:
        cfg = CONFIGS[k]
        r = fastcache_state(cfg, args.depth, torch.bfloat16)
        results["ours"][k] = r
        a, b = r["auto"], r["block"]
        lines.append(f"| {cfg.title} | {fmt_bytes(r['activation_bytes'])} | {fmt_bytes(b['bytes'])} = "
                     f"{b['activations']:.1f} act | {fmt_bytes(a['bytes'])} = {a['activations']:.2f} act | "
                     f"{a['spans']} | {cfg.contexts} | {fmt_bytes(a['bytes'] * cfg.contexts)} |")
        print(f"[ours] {k}: {a['how']}; {b['how']}", file=sys.stderr, flush=True)
    if not args.skip_peers:
        lines += ["", f"### peers' caches, diffusers and cache-dit (counted after {args.steps} steps at reduced size on CPU, "
                      f"scaled to the real config, bf16)", "",
                  "| config | First-Block-Cache | MagCache | TaylorSeer (order 1) | cache-dit DBCache | "
                  "cache-dit DBCache + TaylorSeer (order 1) | FastCache span=\"auto\" |",
                  "|---|---|---|---|---|---|---|"]
        peer_names = ["first_block_cache", "mag_cache", "taylorseer", "cache_dit", "cache_dit_taylorseer"]
        for k in keys:
            cfg = CONFIGS[k]
            row = []
            for peer in peer_names:
                if peer.startswith("cache_dit") and importlib.util.find_spec("cache_dit") is None:
                    row.append("not installed (`pip install cache-dit`)")
                    continue
                try:
                    r = peer_state(cfg, peer, args.steps)
                    results["peers"].setdefault(k, {})[peer] = r
                    row.append(f"{fmt_bytes(r['bytes'])} = {r['activations']:.2f} act" if r["tensors"] else
                               "nothing cached (no module matches its defaults)")
                except Exception as e:  # report, do not hide: the cell says what failed
                    results["peers"].setdefault(k, {})[peer] = {"error": repr(e)}
                    row.append(f"failed: {type(e).__name__}")
                    print(f"[peers] {k} {peer}: {e!r}", file=sys.stderr, flush=True)
            a = results["ours"][k]["auto"]
            lines.append(f"| {cfg.title} | {' | '.join(row)} | {fmt_bytes(a['bytes'])} = {a['activations']:.2f} act |")
    if not args.skip_peak:
        pk = peak_memory(args.steps)
        results["peak"] = pk
        tokens = (PEAK_DIMS["size"] // 2) ** 2
        lines += ["", f"### CPU peak RSS, reduced PixArt ({PEAK_DIMS['layers']} blocks, width "
                      f"{PEAK_DIMS['heads'] * PEAK_DIMS['hd']}, {tokens} tokens, batch {PEAK_DIMS['batch']}, fp32, "
                      f"{args.steps} steps, eager)", "",
                  "| uncached | optimized span=\"auto\" | optimized span=\"block\" |", "|---|---|---|",
                  f"| {pk['uncached']:.0f} MB | {pk['auto']:.0f} MB ({pk['auto'] - pk['uncached']:+.0f} MB) | "
                  f"{pk['block']:.0f} MB ({pk['block'] - pk['uncached']:+.0f} MB) |"]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
