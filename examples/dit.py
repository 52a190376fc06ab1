"""FastCache on a class-conditional DiT pipeline.

    python examples/dit.py                        # facebook/DiT-XL-2-256 (downloaded weights), CUDA
    python examples/dit.py --compare --out dit.png
    python examples/dit.py --tiny                 # tiny random-weight pipeline: checks the plumbing, not quality (quality: fx-fastcache demo)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def load(args, device, dtype):
    from diffusers import DiTPipeline, DPMSolverMultistepScheduler

    pipe = DiTPipeline.from_pretrained(args.model_id, torch_dtype=dtype)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe.to(device)


def call_kwargs(args):
    return dict(class_labels=[207, 360, 387, 974], guidance_scale=4.0, output_type="pil")


def main(argv: list[str] | None = None) -> int:
    args = _common.parser(__doc__.splitlines()[0], "facebook/DiT-XL-2-256", 25).parse_args(argv)
    return _common.run(args, "dit", load, call_kwargs)


if __name__ == "__main__":
    sys.exit(main())
