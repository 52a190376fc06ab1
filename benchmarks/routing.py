"""Token routing (enable_token_routing): cost of one block and of a whole generation, and quality.

Measured side by side in one process, per trained model (dit-mnist, pixart-mnist):

* **block**: block 0 of the model on the CFG batch, called as the model calls it (arguments
  recorded by a forward pre-hook), full (N tokens) vs routed: saliency + ``topk`` + gather +
  the block on ``k`` tokens + scatter into ``x + R`` (exactly what the routed cond branch does),
  for ``k`` = 25/50/75 % of N.  ``--backend inductor`` compiles each variant
  (``fullgraph=True, dynamic=False``).  Ratio = routed time / full time.
* **generation**: ``trained.sample`` (Euler, CFG) through ``fastcache.optimize`` for: all blocks
  computed (no routing), routing at each fraction, block skipping alone at each
  ``--skip-thresholds`` value, and block skipping + routing.  Speedup = time of the all-blocks
  graph / time of the config (all configs compiled first, then timed in interleaved rounds,
  minimum kept); PSNR and class accuracy against the plain model's images.

    python benchmarks/routing.py                           # both models, eager generation
    python benchmarks/routing.py --models dit-mnist --images 4 --steps 20 --backend inductor
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import torch

import fx_fastcache as fastcache
from fx_fastcache.bench.metrics import class_accuracy, psnr
from fx_fastcache.families import block_modules, resolve_family
from fx_fastcache.runtime.routing import attention_context_fn, call_with_context, gather_tokens, scatter_tokens
from fx_fastcache.trained import load_trained, sample


def _time_interleaved(fns: dict[Any, Any], repeats: int, inner: int) -> dict[Any, float]:
    """Minimum over ``repeats`` rounds (variants interleaved within each round, so that load
    from other processes hits all of them alike) of the mean time of ``inner`` calls."""
    for fn in fns.values():
        fn()
        fn()
    best = {key: float("inf") for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            best[key] = min(best[key], (time.perf_counter() - t0) / inner)
    return best


def bench_block(tm, fractions: list[float], backend: str, images: int, repeats: int) -> dict[str, Any]:
    spec = resolve_family(tm.model)
    _, block, _ = block_modules(tm.model, spec)[0]
    rec: dict[str, Any] = {}

    def hook(mod, args, kwargs):
        rec["args"], rec["kwargs"] = args, dict(kwargs)

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        y = torch.arange(images) % 10
        kw = tm.call_kwargs(torch.randn(2 * images, tm.in_channels, tm.sample_size, tm.sample_size), 0.5,
                            torch.cat([y, torch.full_like(y, 10)]))
        with torch.no_grad():
            tm.model(**kw)
    finally:
        h.remove()
    kwargs = rec["kwargs"]
    args = rec["args"]
    if args:
        kwargs["hidden_states"] = args[0]
    x = kwargs.pop("hidden_states").contiguous()
    b, n, d = x.shape
    x_ref = x + 0.01 * torch.randn_like(x)
    resid = torch.randn_like(x)

    def full(x):
        return block(x, **kwargs)

    context_fn = attention_context_fn(block)

    class _Reduced(torch.nn.Module):
        """The block on k gathered tokens (keys/values of all tokens when ``all_kv``), exported
        like the routing pass exports it (the attention patch is Python, traced by export)."""

        def __init__(self, all_kv: bool) -> None:
            super().__init__()
            self.block = block
            self.all_kv = all_kv

        def forward(self, xg, x):
            kw = dict(kwargs, hidden_states=xg)
            return call_with_context(self.block, kw, context_fn(self.block, kw, x) if self.all_kv else None)

    exported: dict[tuple[int, bool], Any] = {}

    def reduced(k: int, all_kv: bool):
        key = (k, all_kv)
        if key not in exported:
            ep = torch.export.export(_Reduced(all_kv), (x[:, :k].contiguous(), x), strict=False)
            exported[key] = ep.module()
        return exported[key]

    def routed(x, x_ref, resid, k: int, all_kv: bool, blk):
        s = (x - x_ref).pow(2).sum(-1)
        idx = torch.sort(torch.topk(s, k, dim=1, sorted=False).indices, dim=1).values
        yk = blk(gather_tokens(x, idx), x)
        return scatter_tokens(x + resid, idx, yk)

    def compile_(fn):
        return torch.compile(fn, fullgraph=True, dynamic=False) if backend == "inductor" else fn

    out: dict[str, Any] = {"tokens": n, "batch": b}
    with torch.no_grad():
        fns = {"full": (lambda f: (lambda: f(x)))(compile_(full))}
        ks = {}
        kvs = ["routed", "all"] if context_fn is not None else ["routed"]
        for frac in fractions:
            k = max(1, math.ceil(frac * n))
            ks[frac] = k
            for kv in kvs:
                rb = reduced(k, kv == "all")
                r = compile_(lambda x, x_ref, resid, k=k, a=(kv == "all"), rb=rb: routed(x, x_ref, resid, k, a, rb))
                fns[(frac, kv)] = (lambda r: (lambda: r(x, x_ref, resid)))(r)
        best = _time_interleaved(fns, repeats, 5)
    out["full_ms"] = best["full"] * 1e3
    for frac in fractions:
        for kv in kvs:
            out[f"routed_{int(frac * 100)}_kv_{kv}"] = {"k": ks[frac], "ms": best[(frac, kv)] * 1e3,
                                                        "ratio": best[(frac, kv)] / best["full"]}
    return out


def bench_generation(tm, configs: dict[str, dict], backend: str, images: int, steps: int,
                     repeats: int = 3) -> dict[str, Any]:
    """Every config captured (and compiled) first; then ``repeats`` rounds, configs interleaved
    within each round; time = minimum over rounds (load from other processes hits all alike)."""
    classes = [i % 10 for i in range(images)]
    seeds = list(range(images))
    with torch.no_grad():
        ref = sample(tm, classes, seeds, steps=steps)
    results: dict[str, Any] = {"reference_accuracy": class_accuracy(ref, classes)}
    opts = {}
    for name, cfg in configs.items():
        opts[name] = fastcache.optimize(tm.model, backend=backend, **cfg)
        sample(tm, classes, seeds, steps=1, model=opts[name])  # capture / compile (same shapes as every step)
    best = {name: float("inf") for name in configs}
    imgs = {}
    for _ in range(repeats):
        for name, opt in opts.items():
            fastcache.reset(opt)
            t0 = time.perf_counter()
            imgs[name] = sample(tm, classes, seeds, steps=steps, model=opt)
            best[name] = min(best[name], time.perf_counter() - t0)
    base_time = best[next(iter(configs))]
    for name, opt in opts.items():
        stats = fastcache.get_cache_statistics(opt)
        dt = best[name]
        row = {"time_s": dt, "speedup": base_time / dt, "psnr_db": float(psnr(imgs[name], ref).mean()),
               "accuracy": class_accuracy(imgs[name], classes), "block_approx_ratio": stats["block_approx_ratio"],
               "spatial_approx_ratio": stats["spatial_approx_ratio"]}
        results[name] = row
        print(f"  {name:24s} {dt:7.2f} s  speedup {row['speedup']:.2f}×  PSNR {row['psnr_db']:6.2f} dB  "
              f"acc {row['accuracy']:.2f}  blocks skipped {row['block_approx_ratio']:.2f}  "
              f"tokens static {row['spatial_approx_ratio']:.2f}", flush=True)
    return results


def attention_context(tm, fractions: list[float], images: int, steps: int, warmup: int = 2) -> dict[str, Any]:
    """DiT only, eager Python: routed tokens attending to routed tokens only (what the graph
    does) vs to *all* tokens' keys/values (``attn1`` gets the full normalised tokens as its
    key/value input).  Same routing rule as the graph (saliency since last computation,
    cached residual for static tokens); PSNR/accuracy against the plain model."""
    import inspect

    spec = resolve_family(tm.model)
    if spec.name != "dit":
        raise ValueError(f"--attention-context is implemented for the DiT family only, not {spec.name!r}")
    classes = [i % 10 for i in range(images)]
    seeds = list(range(images))
    with torch.no_grad():
        ref = sample(tm, classes, seeds, steps=steps)
    out: dict[str, Any] = {}
    for frac in fractions:
        for kv in ("routed", "all"):
            state: dict[int, dict] = {}
            calls = {"i": 0}
            patched = []
            blocks = block_modules(tm.model, spec)
            for j, (_, block, _) in enumerate(blocks):
                orig, sig = block.forward, inspect.signature(block.forward)
                attn_orig = block.attn1.forward

                def forward(*a, _j=j, _orig=orig, _sig=sig, _block=block, _attn=attn_orig, **kw):
                    bound = _sig.bind(*a, **kw)
                    x = bound.arguments["hidden_states"]
                    st = state.get(_j)
                    step = calls["i"] // len(blocks)
                    if st is None or step < warmup:
                        y = _orig(*bound.args, **bound.kwargs)
                        state[_j] = {"x_ref": x.clone(), "resid": y - x}
                        return y
                    k = max(1, math.ceil(frac * x.shape[1]))
                    s = (x - st["x_ref"]).pow(2).sum(-1)
                    idx = torch.sort(torch.topk(s, k, dim=1).indices, dim=1).values
                    if kv == "all":
                        full = _block.norm1(x, bound.arguments.get("timestep"), bound.arguments.get("class_labels"),
                                            hidden_dtype=x.dtype)[0]
                        _block.attn1.forward = lambda h, encoder_hidden_states=None, **kw2: _attn(
                            h, encoder_hidden_states=full, **kw2)
                    bound.arguments["hidden_states"] = gather_tokens(x, idx)
                    try:
                        yk = _orig(*bound.args, **bound.kwargs)
                    finally:
                        _block.attn1.__dict__.pop("forward", None)
                    y = scatter_tokens(x + st["resid"], idx, yk)
                    e = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
                    st["x_ref"] = st["x_ref"].scatter(1, e, torch.gather(x, 1, e))
                    st["resid"] = y - x
                    return y

                block.forward = forward
                patched.append(block)

            try:
                with torch.no_grad():
                    imgs = _sample_counting(tm, classes, seeds, steps, calls, len(blocks))
            finally:
                for b in patched:
                    b.__dict__.pop("forward", None)
            row = {"psnr_db": float(psnr(imgs, ref).mean()), "accuracy": class_accuracy(imgs, classes)}
            out[f"route {int(frac * 100)}% kv={kv}"] = row
            print(f"  route {int(frac * 100):3d}%  keys/values of {kv:6s} tokens: PSNR {row['psnr_db']:6.2f} dB  "
                  f"acc {row['accuracy']:.2f}", flush=True)
    return out


def _sample_counting(tm, classes, seeds, steps, calls, n_blocks):
    """``sample`` whose model call sets the step counter read by the patched blocks."""
    step = {"i": -1}

    def model(**kw):
        step["i"] += 1
        calls["i"] = step["i"] * n_blocks
        return tm.model(**kw)

    return sample(tm, classes, seeds, steps=steps, model=model)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["dit-mnist", "pixart-mnist"])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5, 0.75], help="fraction of tokens routed")
    p.add_argument("--skip-thresholds", nargs="+", type=float, default=[0.05, 0.1])
    p.add_argument("--backend", choices=["eager", "inductor"], default="eager", help="backend of the generation")
    p.add_argument("--block-backend", choices=["eager", "inductor"], default="inductor")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gen-repeats", type=int, default=3, help="timed generations per config (minimum kept)")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--attention-context", action="store_true",
                   help="only: quality of routed tokens attending to routed vs all tokens' keys/values (DiT)")
    p.add_argument("--json", default=None, help="write all numbers to this file")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 64  # one compiled variant per (fraction, attention context)
    report: dict[str, Any] = {"threads": torch.get_num_threads(), "backend": args.backend}
    if args.attention_context:
        for name in args.models:
            print(f"{name}: attention context, {args.images} images × {args.steps} steps", flush=True)
            report[name] = attention_context(load_trained(name), args.fractions, args.images, args.steps)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        return 0
    for name in args.models:
        torch._dynamo.reset()
        tm = load_trained(name)
        print(f"{name}: block 0, CFG batch {2 * args.images}, {args.block_backend}", flush=True)
        blk = bench_block(tm, args.fractions, args.block_backend, args.images, args.repeats)
        print(f"  full block {blk['full_ms']:.2f} ms ({blk['tokens']} tokens)")
        for key, r in blk.items():
            if key.startswith("routed_"):
                print(f"  {key:22s} (k={r['k']:3d}) {r['ms']:.2f} ms  = {r['ratio']:.2f}× full block")
        entry: dict[str, Any] = {"block": blk}
        if not args.skip_generation:
            configs: dict[str, dict] = {"all blocks": dict(enable_block_approx=False)}
            for frac in args.fractions:
                configs[f"route {int(frac * 100)}%"] = dict(enable_block_approx=False, enable_token_routing=True,
                                                           motion_threshold=1.0 - frac)
            for thr in args.skip_thresholds:
                configs[f"skip thr={thr}"] = dict(cache_ratio_threshold=thr)
                for frac in args.fractions[1:]:
                    configs[f"skip thr={thr} + route {int(frac * 100)}%"] = dict(
                        cache_ratio_threshold=thr, enable_token_routing=True, motion_threshold=1.0 - frac)
            print(f"{name}: generation, {args.images} images × {args.steps} steps, {args.backend}", flush=True)
            entry["generation"] = bench_generation(tm, configs, args.backend, args.images, args.steps,
                                                   args.gen_repeats)
        report[name] = entry
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
