"""FastCache on a FLUX.1 pipeline (optionally with true classifier-free guidance: two transformer calls per step).

    python examples/flux.py                       # black-forest-labs/FLUX.1-dev (downloaded weights), CUDA
    python examples/flux.py --true-cfg 2.0 --negative-prompt "blurry" --compare --out flux.png
    python examples/flux.py --tiny [--true-cfg 2.0]   # tiny random-weight pipeline: checks the plumbing, not quality (quality: fx-fastcache demo)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

PROMPT = "a tiny astronaut hatching from an egg on the moon"


def load(args, device, dtype):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(args.model_id, torch_dtype=dtype).to(device)


def call_kwargs(args):
    return dict(prompt=args.prompt, guidance_scale=3.5, height=1024, width=1024, output_type="pil")


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0], "black-forest-labs/FLUX.1-dev", 28)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--true-cfg", type=float, default=1.0,
                   help="true_cfg_scale (> 1 with a negative prompt: 2 transformer calls per step)")
    p.add_argument("--negative-prompt", default="blurry")
    args = p.parse_args(argv)

    extra = dict(true_cfg_scale=args.true_cfg, negative_prompt=args.negative_prompt) if args.true_cfg > 1 else {}

    def kwargs(a):
        return dict(call_kwargs(a), **extra)

    return _common.run(args, "flux", load, kwargs, tiny_extra=extra)


if __name__ == "__main__":
    sys.exit(main())
