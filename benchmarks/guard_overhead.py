"""Cost of the rewrite when nothing is skipped: original model vs FastCache with approximation off.

Same inputs, calls interleaved in one process (trained DiT, batch 32 = 16 images with CFG).

    python benchmarks/guard_overhead.py --backend eager
"""
from __future__ import annotations

import argparse
import time

import torch

import fx_fastcache as fastcache
from fx_fastcache.trained import load_trained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="eager", choices=["eager", "inductor"])
    ap.add_argument("--model", default="dit-mnist")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tm = load_trained(args.model)
    x = torch.randn(args.batch, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(args.batch) % 10
    base = tm.model if args.backend == "eager" else torch.compile(tm.model)
    opt = fastcache.optimize(tm.model, backend=args.backend, enable_block_approx=False)

    def kw(i: int) -> dict:
        return tm.call_kwargs(x, torch.tensor(1.0 - i / 20), y)

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


if __name__ == "__main__":
    main()
