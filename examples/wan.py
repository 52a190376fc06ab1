"""FastCache on a Wan 2.1 text-to-video pipeline (CFG: two transformer calls per step, each with its own cache state).

    python examples/wan.py                        # Wan-AI/Wan2.1-T2V-1.3B-Diffusers (downloaded weights), CUDA
    python examples/wan.py --compare --out wan.png   # also run uncached; save the first frame
    python examples/wan.py --tiny                 # tiny random-weight pipeline: checks the plumbing, not quality (quality: fx-fastcache demo)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

PROMPT = "a cat walks on the grass, realistic"


def load(args, device, dtype):
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(args.model_id, subfolder="vae", torch_dtype=torch.float32)
    return WanPipeline.from_pretrained(args.model_id, vae=vae, torch_dtype=dtype).to(device)


def call_kwargs(args):
    return dict(prompt=args.prompt, negative_prompt="blurry, low quality", height=480, width=832, num_frames=33,
                guidance_scale=5.0, output_type="np")


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0], "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 30)
    p.add_argument("--prompt", default=PROMPT)
    args = p.parse_args(argv)
    return _common.run(args, "wan", load, call_kwargs)


if __name__ == "__main__":
    sys.exit(main())
