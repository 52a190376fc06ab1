"""Cost of the rewrite when nothing is skipped: original model vs FastCache with approximation off.

Same inputs, calls interleaved in one process (trained DiT, batch 32 = 16 images with CFG).

    python benchmarks/guard_overhead.py --backend eager
    python benchmarks/guard_overhead.py --backend dispatch

``--backend dispatch`` times, against ``torch.compile`` of the original, the all-computed copy
that step dispatch replays (:func:`fx_fastcache.step_dispatch.specialise`, inductor), twice: with
the guards' state updates specialised on a plain bool (what the library does) and, for
comparison, on a constant bool *tensor* (what it did before: full-tensor selects that inductor
does not fold).
"""
from __future__ import annotations

import argparse
import time

import torch

import fx_fastcache as fastcache
from fx_fastcache.step_dispatch import specialise
from fx_fastcache.trained import load_trained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="eager", choices=["eager", "inductor", "dispatch"])
    ap.add_argument("--model", default="dit-mnist")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tm = load_trained(args.model)
    x = torch.randn(args.batch, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(args.batch) % 10
    base = tm.model if args.backend == "eager" else torch.compile(tm.model)

    def kw(i: int) -> dict:
        return tm.call_kwargs(x, torch.tensor(1.0 - i / 20), y)

    if args.backend == "dispatch":
        return dispatch_overhead(tm, base, kw, args.repeats)
    opt = fastcache.optimize(tm.model, backend=args.backend, enable_block_approx=False)

    with torch.no_grad():
        for i in range(3):
            base(**kw(i))
            opt(**kw(i))
        a = b = 0.0
        n = 0
        for _ in range(args.repeats):
            for i in range(4):
                t0 = time.perf_counter()
                base(**kw(i))
                a += time.perf_counter() - t0
                t0 = time.perf_counter()
                opt(**kw(i))
                b += time.perf_counter() - t0
                n += 1
    print(f"{args.backend}: original {a / n * 1000:.1f} ms/call, FastCache with nothing skipped "
          f"{b / n * 1000:.1f} ms/call, overhead {100 * (b / a - 1):.1f}%")


def _with_tensor_flags(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The same specialised copy, but the guards' updates get a constant bool tensor."""
    g = gm.graph
    for n in list(g.nodes):
        if n.op == "call_module" and n.args and n.args[0] == "update" and type(n.args[1]) is bool:
            with g.inserting_before(n):
                const = g.call_function(torch.full, ((), n.args[1]), {"dtype": torch.bool})
            n.args = (n.args[0], const, *n.args[2:])
    g.lint()
    gm.recompile()
    return gm


def dispatch_overhead(tm, base, kw, repeats: int) -> None:
    opt = fastcache.optimize(tm.model, backend="eager", policy="schedule", fallback="residual_linear")
    entry = opt.capture(**kw(0))
    n = len(entry.guards)
    copies = {"bool": specialise(entry.gm, (False,) * n),
              "tensor": _with_tensor_flags(specialise(entry.gm, (False,) * n))}
    fns = {"original": base, **{k: torch.compile(v, fullgraph=True) for k, v in copies.items()}}
    total = dict.fromkeys(fns, 0.0)
    calls = 0
    with torch.no_grad():
        for i in range(3):
            for f in fns.values():
                f(**kw(i))
        for _ in range(repeats):
            for i in range(4):
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    f(**kw(i))
                    total[name] += time.perf_counter() - t0
                calls += 1
    a = total["original"]
    print(f"dispatch (inductor, residual_linear, all {n} blocks computed): original {a / calls * 1000:.1f} ms/call; "
          + "; ".join(f"{k} flags {total[k] / calls * 1000:.1f} ms/call ({100 * (total[k] / a - 1):+.1f}%)"
                      for k in copies))


if __name__ == "__main__":
    main()
