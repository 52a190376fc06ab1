"""No-regression check of guarded spans: span="auto" vs "block" on the trained models (dit-mnist, pixart-mnist),
4 images x 20 steps, eager, default config: same decisions => same images within float tolerance.

    OMP_NUM_THREADS=1 python benchmarks/span_equivalence.py
"""
import torch, fx_fastcache as fastcache
from fx_fastcache.trained import load_trained, sample
torch.set_num_threads(1)
for name in ("dit-mnist", "pixart-mnist"):
    tm = load_trained(name)
    res = {}
    for span in ("block", "auto"):
        opt = fastcache.optimize(tm.model, backend="eager", span=span)
        imgs = sample(tm, [1, 3, 5, 7], [0, 1, 2, 3], steps=20, model=opt)
        st = fastcache.get_cache_statistics(opt)
        res[span] = (imgs, st["block_approx_ratio"], [b["approximated"] for b in st["per_block"]],
                     len(opt.entries()[0].guards))
    d = float((res["auto"][0] - res["block"][0]).abs().max())
    print(f"{name}: max |auto - block| = {d:.3g}; replaced fraction block {res['block'][1]:.3f} auto {res['auto'][1]:.3f}; "
          f"same per-block decisions: {res['block'][2] == res['auto'][2]}; guards block {res['block'][3]} auto {res['auto'][3]}")
