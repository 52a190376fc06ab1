"""Train a reference family of our own on MNIST (issue #13), on a CPU: SD3-, Flux- or Wan-style.

A driver around the reference script (``train_reference_dits.py``: same data, objective
``v = eps - x0``, ``Cond`` class embeddings, EMA, sampler and digit classifier), with models
small enough to train on one CPU thread in about an hour (64 tokens of 4 x 32 channels, batch 64):

* ``--kind sd3``: ``SD3Transformer2DModel``, patch 4, 6 joint blocks. 3300 s gave the model vendored
  as ``fx_fastcache/assets/sd3-mnist``.
* ``--kind flux``: ``FluxTransformer2DModel``, 2 double-stream + 6 single-stream blocks, RoPE, the
  32 x 32 image packed into 4 x 4 patches (64 tokens of 16 channels; ``fx_fastcache.trained``
  packs and unpacks it the same way). Vendored as ``fx_fastcache/assets/flux-mnist``.
* ``--kind wan``: ``WanTransformer3DModel`` (the video family) on one-frame videos, patch (1, 4, 4), 6 blocks
  with cross-attention to the caption tokens (as PixArt), 3-D RoPE. Trained in the thirtieth session after
  every rule was fixed, its evaluation groups (``benchmarks/peer_sweep.py --group fifth`` / ``fifth_peers``)
  committed before its weights existed; 3300 s gave the model vendored as ``fx_fastcache/assets/wan-mnist``.

Each run writes ``report.json`` (steps, loss, classifier accuracy and Fréchet distance of 100
samples with 20 steps) and ``samples.png`` next to the weights.

    python benchmarks/train_mnist_family.py --kind sd3 --reference ../shared/reference \
        --models ../shared/models --out out/sd3-mnist --seconds 3300
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PATCH = 4  # flux: 4 x 4 pixels per token


def build(kind: str):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel

    if kind == "sd3":
        return SD3Transformer2DModel(sample_size=32, patch_size=4, in_channels=1, out_channels=1, num_layers=6,
                                     attention_head_dim=32, num_attention_heads=4, joint_attention_dim=256,
                                     caption_projection_dim=128, pooled_projection_dim=256, pos_embed_max_size=32)
    if kind == "flux":
        return FluxTransformer2DModel(patch_size=1, in_channels=PATCH * PATCH, num_layers=2, num_single_layers=6,
                                      attention_head_dim=32, num_attention_heads=4, joint_attention_dim=256,
                                      pooled_projection_dim=256, guidance_embeds=False, axes_dims_rope=(8, 12, 12))
    if kind == "wan":
        return WanTransformer3DModel(patch_size=(1, PATCH, PATCH), num_attention_heads=4, attention_head_dim=32,
                                     in_channels=1, out_channels=1, text_dim=256, freq_dim=256, ffn_dim=512,
                                     num_layers=6, cross_attn_norm=True, rope_max_seq_len=64)
    raise ValueError(f"--kind {kind!r}: choose sd3, flux or wan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["sd3", "flux", "wan"], default="sd3")
    p.add_argument("--reference", required=True, help="folder of train_reference_dits.py")
    p.add_argument("--models", required=True, help="folder with mnist5k.npz and digit_classifier.safetensors")
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=3300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: sd3 1e-3, flux and wan 5e-4)")
    a = p.parse_args()
    sys.path.insert(0, a.reference)
    import train_reference_dits as T
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from fx_fastcache.trained import TrainedModel, sample

    torch.set_num_threads(a.threads)
    out, seconds, batch = a.out, a.seconds, 64
    lr = a.lr or {"sd3": 1e-3, "flux": 5e-4, "wan": 5e-4}[a.kind]
    x, y = T.load_mnist(str(Path(a.models) / "mnist5k.npz"), torch.device("cpu"))
    torch.manual_seed(0)
    m = build(a.kind)
    cond = T.Cond()
    params = list(m.parameters()) + list(cond.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # the library's own call convention (packing for flux), so training and sampling agree; the tables
    # are the live parameters, so the final sampling below sees the EMA weights copied into them
    tm = TrainedModel(name=a.kind, kind=a.kind, model=m, conditioning=cond.txt.weight,
                      pooled=None if a.kind == "wan" else cond.pooled.weight)
    t0, step, losses, skipped = time.time(), 0, [], 0
    while time.time() - t0 < seconds:
        idx = torch.randint(0, len(x), (batch,)); x0, yb = x[idx], y[idx].clone()
        yb[torch.rand(batch) < 0.1] = T.NULL
        sigma = torch.sigmoid(torch.randn(batch)); eps = torch.randn_like(x0)
        xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 200) * max(0.1, 1 - (time.time() - t0) / seconds)
        v = tm.unpack_output(m(**tm.call_kwargs(xt, sigma, yb))[0])
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True); loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not (torch.isfinite(loss) and torch.isfinite(gn)):
            skipped += 1
            if skipped > 100:
                raise RuntimeError(f"{a.kind}: training diverged at step {step}; lower --lr (was {lr})")
            continue
        opt.step()
        with torch.no_grad():
            d = min(0.999, (1 + step) / (10 + step))
            for e, p in zip(ema, params):
                e.mul_(d).add_(p.detach(), alpha=1 - d)
        losses.append(loss.item())
        if step % 500 == 0:
            print("step", step, "t", round(time.time() - t0), "loss", np.mean(losses[-100:]), flush=True)
        step += 1
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    m.eval(); cond.eval()
    os.makedirs(out, exist_ok=True)
    m.to(torch.float16).save_pretrained(out, safe_serialization=True); m.to(torch.float32)
    save_file({k: v.detach().contiguous() for k, v in cond.state_dict().items()},
              os.path.join(out, "conditioning.safetensors"))
    clf = T.DigitNet(); clf.load_state_dict(load_file(str(Path(a.models) / "digit_classifier.safetensors"))); clf.eval()
    yy = torch.arange(10).repeat_interleave(10)
    imgs = sample(tm, classes=yy, seeds=list(range(100)), steps=20)
    with torch.no_grad():
        acc = (clf(imgs).argmax(1) == yy).float().mean().item()
        fr = T.frechet(clf.features(imgs).numpy(), clf.features(x[:2000]).numpy())
    rep = {"kind": a.kind, "train_steps": step, "skipped_steps": skipped, "final_loss": float(np.mean(losses[-200:])),
           "sample_class_acc": acc, "frechet_vs_real": fr, "seconds": seconds, "batch": batch, "lr": lr}
    print(rep, flush=True)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(rep, f, indent=1)
    g = ((imgs + 1) * 127.5).clamp(0, 255).byte().view(10, 10, 32, 32).permute(0, 2, 1, 3).reshape(320, 320).numpy()
    Image.fromarray(g).save(os.path.join(out, "samples.png"))


if __name__ == "__main__":
    main()
