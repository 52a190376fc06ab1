"""Shared command line of the example scripts: build a pipeline, enable FastCache, run, report.

Each ``examples/<family>.py`` only says how to load its pipeline from downloaded weights and
which call arguments to use; ``--tiny`` swaps in the offline random-weight pipeline of the same
family (``fx_fastcache.tiny_pipelines``, same family names: dit, pixart, sd3, flux, wan), which
is what CI runs.  ``--tiny`` checks the plumbing, not quality (random weights, tiny images).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import fx_fastcache as fastcache
from fx_fastcache.quiet import library_noise_silenced
from fx_fastcache.tiny_pipelines import make_tiny_pipeline


TINY_NOTE = ("--tiny: a tiny pipeline with random weights, so its images are noise and few blocks are approximated. "
             "This checks the plumbing (capture, guards, pipeline hooks, statistics), not quality; to see what "
             "FastCache does to images run `fx-fastcache demo` (trained DiT) or "
             "`fx-fastcache bench --model pixart-mnist` (trained PixArt).")


def parser(description: str, default_model: str, default_steps: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true",
                   help="tiny offline random-weight pipeline (no download, CPU): checks the plumbing, not image "
                        "quality; for quality run `fx-fastcache demo` or `fx-fastcache bench --model pixart-mnist`")
    p.add_argument("--model-id", default=default_model, help="hub id or local folder of the pipeline")
    p.add_argument("--steps", type=int, default=default_steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, choices=["inductor", "eager"],
                   help="default: inductor on CUDA, eager otherwise")
    p.add_argument("--policy", default="step_forecast")
    p.add_argument("--fallback", default="forecast")
    p.add_argument("--threshold", type=float, default=0.08, help="cache_ratio_threshold")
    p.add_argument("--step-dispatch", default="auto", choices=["auto", "none", "reduce-overhead", "default", "eager"],
                   help="replay per-pattern graphs chosen once per step (docs/GPU.md); auto: reduce-overhead on "
                        "CUDA for step-level policies, none otherwise")
    p.add_argument("--compare", action="store_true", help="also run without FastCache and report the difference")
    p.add_argument("--out", default=None, help="save the first image here (PNG)")
    p.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="split the sequence over N processes with diffusers' context parallelism; launch with "
                        "`torchrun --nproc-per-node N` (docs/MULTI_DEVICE.md)")
    p.add_argument("--cp-mode", default="ulysses", choices=["ulysses", "ring"],
                   help="context-parallel attention: ulysses (all-to-all) or ring")
    return p


def setup_context_parallel(args: argparse.Namespace, device: torch.device) -> tuple[torch.device, bool]:
    """Join the ``torchrun`` process group for ``--context-parallel N``; returns (device, is rank 0)."""
    import os

    import torch.distributed as dist

    if args.context_parallel <= 1:
        return device, True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.context_parallel:
        raise SystemExit(f"--context-parallel {args.context_parallel} needs {args.context_parallel} processes, this "
                         f"run has {world}: launch with `torchrun --nproc-per-node {args.context_parallel} "
                         f"examples/...`")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:  # CPU (tests, --tiny): diffusers needs two workarounds there, see fx_fastcache/cpu_parallel.py
        from fx_fastcache.cpu_parallel import patch_diffusers_for_cpu

        patch_diffusers_for_cpu()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank() == 0


def enable_context_parallel(args: argparse.Namespace, pipe: Any) -> None:
    """diffusers' context parallelism on ``pipe.transformer`` (every rank runs the same pipeline call)."""
    if args.context_parallel <= 1:
        return
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(**{f"{args.cp_mode}_degree": args.context_parallel})
    pipe.transformer.enable_parallelism(config=config)


def run(args: argparse.Namespace, family: str, load: Callable[[argparse.Namespace, torch.device, torch.dtype], Any],
        call_kwargs: Callable[[argparse.Namespace], dict[str, Any]], tiny_extra: dict[str, Any] | None = None) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    device, main_rank = setup_context_parallel(args, device)
    say = print if main_rank else (lambda *a, **k: None)
    if args.tiny:
        print(TINY_NOTE)
        tp = make_tiny_pipeline(family)
        pipe = tp.pipe
        kwargs = tp.call_kwargs(seed=args.seed, num_inference_steps=args.steps, **(tiny_extra or {}))
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        with library_noise_silenced():  # notices about parts of transformers the pipeline does not use
            pipe = load(args, device, dtype)
        pipe.set_progress_bar_config(disable=True)
        kwargs = call_kwargs(args)
        kwargs["num_inference_steps"] = args.steps
        kwargs["generator"] = torch.Generator(device="cpu").manual_seed(args.seed)
    enable_context_parallel(args, pipe)  # before or after enable_fastcache: both work
    dispatch = args.step_dispatch
    if dispatch == "auto":
        dispatch = "reduce-overhead" if device.type == "cuda" and args.policy != "chi2" else "none"
    dispatch = None if dispatch == "none" else dispatch
    # with step dispatch the per-pattern graphs are compiled by the dispatcher: capture eagerly
    backend = args.backend or ("inductor" if device.type == "cuda" and dispatch is None else "eager")

    reference = None
    if args.compare:
        t0 = time.perf_counter()
        reference = _frames(pipe(**dict(kwargs, generator=torch.Generator().manual_seed(args.seed))))
        say(f"without FastCache: {time.perf_counter() - t0:.2f}s")

    fastcache.enable_fastcache(pipe, backend=backend, policy=args.policy, fallback=args.fallback,
                               cache_ratio_threshold=args.threshold, step_dispatch=dispatch)
    t0 = time.perf_counter()
    images = _frames(pipe(**dict(kwargs, generator=torch.Generator().manual_seed(args.seed))))
    elapsed = time.perf_counter() - t0
    stats = fastcache.get_cache_statistics(pipe)
    mode = backend if dispatch is None else f"step dispatch, {dispatch}"
    say(f"with FastCache ({mode}, first call includes capture): {elapsed:.2f}s; "
        f"{stats['blocks_approximated']}/{stats['block_evaluations']} block evaluations approximated "
        f"({stats['block_approx_ratio']:.0%}) over {stats['calls']} transformer calls")
    if args.context_parallel > 1:
        import torch.distributed as dist

        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, [b["approximated"] for b in stats["per_block"]])
        say(f"context parallel ({args.cp_mode}, {len(every)} ranks): per-block skips "
            f"{'identical on every rank' if all(e == every[0] for e in every) else f'DIFFER between ranks: {every}'}")
    if reference is not None:
        import numpy as np

        a, b = np.asarray(reference, dtype=np.float32), np.asarray(images, dtype=np.float32)
        if a.max() > 1.5:  # PIL images
            a, b = a / 255.0, b / 255.0
        mse = float(((a - b) ** 2).mean())
        psnr = float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
        say(f"PSNR vs. uncached: {psnr:.1f} dB")
    if args.out and main_rank:
        _save(images, args.out)
        say(f"saved {args.out}")
    fastcache.disable_fastcache(pipe)
    if args.context_parallel > 1:
        import torch.distributed as dist

        # every rank waits here until the others are done (rank 0 still writes the image): a gloo peer that
        # shuts its connections down while another rank is busy can take that rank down at exit (seen in CI)
        dist.barrier()
        dist.destroy_process_group()
        # then leave without interpreter finalization: torch's distributed threads can abort the process
        # while Python tears down (pytorch/pytorch#179291); everything this run does is done and flushed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _frames(out: Any) -> Any:
    """Images of an image pipeline, or the videos (frames) of a video pipeline."""
    return out.frames if hasattr(out, "frames") else out.images


def _save(images: Any, path: str) -> None:
    """Save the first image (of a video: its first frame) as a PNG."""
    import numpy as np
    from PIL import Image

    img = images[0]
    if not isinstance(img, Image.Image) and np.asarray(img).ndim == 4:  # (frames, H, W, C)
        img = np.asarray(img)[0]
    if not isinstance(img, Image.Image):
        img = Image.fromarray((np.clip(np.asarray(img), 0, 1) * 255).round().astype("uint8"))
    img.save(path)
