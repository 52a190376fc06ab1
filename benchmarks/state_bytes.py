"""Bytes of our per-generation state (fallback buffers + step decider) on dit-mnist, 1 image (2 CFG rows).

    python benchmarks/state_bytes.py
(the peers report theirs in the sweep: ``state_bytes`` of each run; #11 measures ours in depth)
"""
import torch, fx_fastcache as fastcache
torch.set_num_threads(1)
from fx_fastcache.trained import load_trained, sample
tm = load_trained("dit-mnist")
opt = fastcache.optimize(tm.model, backend="eager", policy="step_forecast", fallback="forecast")
sample(tm, [1], [5], steps=3, model=opt)
seen = {}
for e in opt.entries():
    for g in e.guards:
        for n, b in g.fallback.named_buffers():
            seen[(b.untyped_storage().data_ptr())] = b.untyped_storage().nbytes()
    if e.step_decider is not None:
        for n, b in e.step_decider.named_buffers():
            seen[(b.untyped_storage().data_ptr())] = b.untyped_storage().nbytes()
print("bytes per image (batch 2 rows):", sum(seen.values()), sum(seen.values()) / 1024, "KiB")
