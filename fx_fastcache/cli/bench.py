"""``fx-fastcache bench``: the speed/quality sweep (methods x thresholds) on a trained model.

Writes ``{out}/{stem}.json``, ``.md`` and ``.png`` (the frontier plot) and prints the table.
The same sweep is importable as :func:`fx_fastcache.bench.run_benchmark`.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

from fx_fastcache.bench import parse_methods, run_benchmark, write_all
from fx_fastcache.bench.report import markdown_table, write_json
from fx_fastcache.bench.runner import DEFAULT_METHODS, methods_help
from fx_fastcache.cli.common import (
    TRAINED,
    CLIError,
    check_model_name,
    finite_float,
    non_negative_int,
    positive_int,
    quiet_library_warnings,
    show_progress,
)

logger = logging.getLogger(__name__)


def _floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not math.isfinite(v) or v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected finite non-negative thresholds, got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="dit-mnist",
                   help="dit-mnist | pixart-mnist | sd3-mnist | flux-mnist | wan-mnist | PATH of a diffusers DiT/PixArt/SD3/Flux/Wan folder (trained models only: "
                        "quality on random tiny-* models means nothing)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=methods_help() + " (default: %(default)s)")
    p.add_argument("--thresholds", type=_floats, default=None,
                   help="comma-separated threshold grid used for every method (default: a grid per method)")
    p.add_argument("--images", type=positive_int, default=16, help="evaluation images, at least 2 (default 16)")
    p.add_argument("--steps", type=positive_int, default=20, help="Euler steps (default 20)")
    p.add_argument("--cfg", type=finite_float, default=2.0, help="classifier-free guidance scale (default 2.0)")
    p.add_argument("--shift", type=finite_float, default=1.0,
                   help="schedule shift of the sampler, sigma = s*u / (1 + (s-1)*u): 1 = uniform (default), 3 = what "
                        "SD3 pipelines sample with; calibration, plan search and the peers run on it too")
    p.add_argument("--eval-seed", type=int, default=1000, help="first evaluation seed (default 1000)")
    p.add_argument("--calib-images", type=positive_int, default=4, help="calibration generations' images (default 4)")
    p.add_argument("--calib-seed", type=int, default=0, help="first calibration seed, disjoint from evaluation (default 0)")
    p.add_argument("--backend", choices=("eager", "inductor"), default="eager",
                   help="backend of the FastCache graphs (default eager: an inductor compile of the 12-block DiT took "
                        "about 2 minutes on 2 shared cores, more than a small sweep)")
    p.add_argument("--timing-images", type=non_negative_int, default=4,
                   help="images of the interleaved uncached/cached timing batch; 0 skips timing (default 4)")
    p.add_argument("--timing-repeats", type=positive_int, default=1, help="timing pairs per run, best kept (default 1)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    p.add_argument("--stem", default=None, help="file name stem (default bench-<model>)")
    p.add_argument("--progress", action="store_true",
                   help="tqdm bar (stderr) over the steps of each generation even when stderr is not a terminal")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")


def run(args: argparse.Namespace) -> int:
    import torch

    try:
        methods = parse_methods(args.methods.split(","), args.thresholds)
    except ValueError as e:
        raise CLIError(f"--methods {args.methods!r}: {e}") from None
    if args.shift <= 0:
        raise CLIError(f"--shift {args.shift}: the schedule shift must be > 0 (1 = uniform, 3 = SD3's)")
    if args.images < 2:
        raise CLIError(f"--images {args.images}: the Fréchet distance needs at least 2 evaluation images; "
                       f"pass --images 2 or more (default 16)")
    check_model_name(str(args.model), allowed=TRAINED,
                     why_not="bench measures quality, which needs a trained model (tiny-* models have random "
                             "weights; use them with diff, schedule or export-onnx)")
    if Path(args.out).is_file():
        raise CLIError(f"--out {args.out!r} is a file; pass a folder for the JSON, Markdown and PNG outputs")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    progress = args.progress or show_progress(args.no_progress)
    stem = args.stem or f"bench-{Path(str(args.model)).name}"
    t0 = time.perf_counter()
    done: list[dict] = []
    partial = Path(args.out) / f"{stem}.partial.json"

    def on_run(rec: dict) -> None:
        done.append(rec)  # keep what is finished if a long sweep is interrupted
        write_json({"setup": {"model": args.model, "partial": True}, "runs": done}, partial)
        thr = rec.get("threshold")
        sp = rec.get("speedup")
        print(f"  {rec['method']:<44} thr={'-' if thr is None else format(thr, '.3g'):>6} "
              f"replaced={100 * rec['replaced_fraction']:5.1f}%  PSNR {rec['psnr_mean']:6.2f} ({rec['psnr_worst']:6.2f})"
              f"  SSIM {rec['ssim_mean']:.4f}" + (f"  speedup {sp:.2f}x (ideal {rec['ideal_speedup']:.2f}x)" if sp else ""),
              flush=True)

    with quiet_library_warnings():
        result = run_benchmark(model=args.model, methods=methods, n_images=args.images, steps=args.steps,
                               cfg=args.cfg, shift=args.shift, eval_seed=args.eval_seed, calib_images=args.calib_images,
                               calib_seed=args.calib_seed, backend=args.backend, timing_images=args.timing_images,
                               timing_repeats=args.timing_repeats, on_run=on_run, progress=progress)
    result["setup"]["wall_s"] = time.perf_counter() - t0
    paths = write_all(result, args.out, stem)
    partial.unlink(missing_ok=True)
    print()
    print(markdown_table(result))
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']} ({result['setup']['wall_s']:.0f} s)")
    return 0
