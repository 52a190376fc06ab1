"""FastCache on a PixArt-Σ text-to-image pipeline.

    python examples/pixart.py               # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS (downloaded weights), CUDA
    python examples/pixart.py --prompt "a red fox in the snow" --compare --out pixart.png
    python examples/pixart.py --tiny        # tiny random-weight pipeline: checks the plumbing, not quality (quality: fx-fastcache demo)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

PROMPT = "a small cactus with a happy face in the Sahara desert"


def load(args, device, dtype):
    from diffusers import PixArtSigmaPipeline

    return PixArtSigmaPipeline.from_pretrained(args.model_id, torch_dtype=dtype).to(device)


def call_kwargs(args):
    return dict(prompt=args.prompt, guidance_scale=4.5, output_type="pil")


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0], "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", 20)
    p.add_argument("--prompt", default=PROMPT)
    args = p.parse_args(argv)
    return _common.run(args, "pixart", load, call_kwargs)


if __name__ == "__main__":
    sys.exit(main())
