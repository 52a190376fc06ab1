"""Does onnxruntime execute only the taken branch of each block's ``If``?

Exports a model with a schedule, then times single steps of the same session with every
block skipped (``skip`` all True: the fallback branches) and with none skipped (the block
branches), interleaved in one run, and prints the medians and their ratio.  If both
branches ran, the two times would be equal.

    python benchmarks/onnx_branch.py --model dit-mnist --reps 30
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dit-mnist")
    ap.add_argument("--batch", type=int, default=None, help="model-call batch (default 4 trained / 2 tiny)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = default)")
    ap.add_argument("--onnx", default=None, help="reuse this exported file instead of exporting")
    args = ap.parse_args()

    from fx_fastcache.calibration import model_fingerprint
    from fx_fastcache.cli.common import resolve_model
    from fx_fastcache.config import FastCacheConfig
    from fx_fastcache.export.onnx import export_onnx
    from fx_fastcache.export.runner import OnnxRunner
    from fx_fastcache.export.schedule import Schedule
    from fx_fastcache.families import block_modules, resolve_family

    r = resolve_model(args.model)
    batch = args.batch or (4 if r.trained is not None else 2)
    names = [n for n, _, _ in block_modules(r.model, resolve_family(r.model))]
    sched = Schedule([[False] * len(names), [True] * len(names)], names, model_fingerprint(r.model),
                     FastCacheConfig().to_dict(), args.model)
    path = Path(args.onnx) if args.onnx else Path(tempfile.mkdtemp()) / "m.onnx"
    if not args.onnx:
        t0 = time.perf_counter()
        export_onnx(r.model, sched, r.make_inputs(1000.0, batch), path)
        print(f"export: {time.perf_counter() - t0:.1f} s -> {path}")
    runner = OnnxRunner(path, threads=args.threads)
    kw = r.make_inputs(900.0, batch)
    feeds = {n: runner._to_np(n, kw[n]) for n in runner.spec.inputs}
    runner.run_step(feeds)  # one full step so the state is real
    state = dict(zip((s.input_name for s in runner.spec.state), runner.state))
    masks = {"all skipped": np.ones(len(names), np.bool_), "none skipped": np.zeros(len(names), np.bool_)}
    times: dict[str, list[float]] = {k: [] for k in masks}
    for _ in range(3):  # warm-up
        for m in masks.values():
            runner.backend.run({**feeds, "skip": m, **state})
    for _ in range(args.reps):
        for k, m in masks.items():
            t0 = time.perf_counter()
            runner.backend.run({**feeds, "skip": m, **state})
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{args.model}: {len(names)} blocks, batch {batch}, onnxruntime {__import__('onnxruntime').__version__}, "
          f"torch threads {torch.get_num_threads()}, {args.reps} interleaved reps")
    for k, v in med.items():
        q = sorted(times[k])
        print(f"  {k:<13} median {v:8.2f} ms   (p10 {q[len(q) // 10] * 1e3:.2f}, p90 {q[9 * len(q) // 10] * 1e3:.2f})")
    print(f"  ratio none/all = {med['none skipped'] / med['all skipped']:.1f}x")


if __name__ == "__main__":
    main()
