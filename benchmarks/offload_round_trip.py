"""What a move away and back costs the next generation: graphs kept per placement against dropped.

Model CPU offload moves the transformer to the GPU at every pipeline call and back to the CPU after it.  Until
the twenty-second session every move dropped the captured graphs, so every pipeline call exported (and, with
inductor, compiled) again.  This script times the first generation after each return, side by side in one
process: ``kept`` (the library now) and ``dropped`` (``opt.drop_graphs()`` after the return: what every move did
before).  On a machine without a GPU a dtype round trip (float32 -> float64 -> float32) stands in for the
offload's device round trip; ``--device cuda`` moves between the CPU and the GPU, as the offload does.

    python benchmarks/offload_round_trip.py --backend inductor
    python benchmarks/offload_round_trip.py --backend inductor --execution step_dispatch --device cuda
"""
from __future__ import annotations

import argparse
import time

import torch
from torch._dynamo.utils import counters

import fx_fastcache as fastcache
from fx_fastcache.trained import load_trained


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dit-mnist")
    ap.add_argument("--backend", default="inductor", choices=["eager", "inductor"])
    ap.add_argument("--execution", default="in_graph", choices=["in_graph", "step_dispatch"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu: a dtype round trip stands in for the offload; cuda: CPU <-> GPU, as the offload")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--trips", type=int, default=3)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (torch.cuda.is_available() is False); use --device cpu")
    extra = {"dispatch_compile": "default" if args.device == "cpu" else "reduce-overhead"} \
        if args.execution == "step_dispatch" else {}
    home, away = (torch.device(args.device), torch.float32), (torch.device("cpu"), torch.float64)
    if args.device == "cuda":
        away = (torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, 1, 32, 32, generator=g)
    y = torch.arange(args.batch) % 10
    times: dict[str, list[float]] = {}
    compiled: dict[str, list[int]] = {}
    for mode in ("kept", "dropped"):
        tm = load_trained(args.model)
        tm.model.to(*home)
        opt = fastcache.optimize(tm.model, backend=args.backend, execution=args.execution, **extra)

        def generation() -> float:
            x = x0.to(*home)
            t0 = time.perf_counter()
            with torch.no_grad():
                for i in range(args.steps):
                    t = torch.full((args.batch,), 1.0 - i / args.steps, device=home[0])
                    out = opt(**tm.call_kwargs(x, t, y.to(home[0])))
                    x = x - (out[0] if isinstance(out, tuple) else out).to(x.dtype) / args.steps
            if args.device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        generation()  # the first capture, at home
        times[mode] = []
        compiled[mode] = [counters["stats"]["unique_graphs"]]
        for _ in range(args.trips):
            opt.to(*away)
            opt.to(*home)
            if mode == "dropped":
                opt.drop_graphs()  # what every move did before
            times[mode].append(generation())
            compiled[mode].append(counters["stats"]["unique_graphs"])
    print(f"{args.model}, backend={args.backend}, execution={args.execution}, round trips through {away[1]} on "
          f"{away[0]} (home {home[1]} on {home[0]}), {args.steps} steps, batch {args.batch}:")
    for mode, ts in times.items():
        print(f"  {mode:8s} first generation after each return: " + ", ".join(f"{t:.2f} s" for t in ts)
              + "; graphs dynamo compiled so far, after each: " + ", ".join(map(str, compiled[mode])))
    ratio = sum(times["dropped"]) / sum(times["kept"])
    print(f"  dropped / kept: {ratio:.1f}x")


if __name__ == "__main__":
    main()
