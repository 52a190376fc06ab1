"""FastCache on a Stable Diffusion 3 pipeline.

    python examples/sd3.py                        # stabilityai/stable-diffusion-3-medium-diffusers, CUDA
    python examples/sd3.py --prompt "a lighthouse at dusk" --compare --out sd3.png
    python examples/sd3.py --tiny                 # tiny random-weight pipeline: checks the plumbing, not quality (quality: fx-fastcache demo)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

PROMPT = "a photo of a cat holding a sign that says hello world"


def load(args, device, dtype):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(args.model_id, torch_dtype=dtype).to(device)


def call_kwargs(args):
    return dict(prompt=args.prompt, negative_prompt="", guidance_scale=7.0, output_type="pil")


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0], "stabilityai/stable-diffusion-3-medium-diffusers", 28)
    p.add_argument("--prompt", default=PROMPT)
    args = p.parse_args(argv)
    return _common.run(args, "sd3", load, call_kwargs)


if __name__ == "__main__":
    sys.exit(main())
