"""Bytes of our per-generation state (fallback buffers + step decider) on dit-mnist, 1 image (2 CFG rows).

    python benchmarks/state_bytes.py
(the peers report theirs in the sweep: ``state_bytes`` of each run; #11 measures ours in depth)
"""
import argparse

import torch

import fx_fastcache as fastcache
from fx_fastcache.trained import load_trained, sample


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(1)
    tm = load_trained("dit-mnist")
    opt = fastcache.optimize(tm.model, backend="eager", policy="step_forecast", fallback="forecast")
    sample(tm, [1], [5], steps=3, model=opt)
    seen = {}
    for e in opt.entries():
        mods = [g.fallback for g in e.guards] + ([e.step_decider] if e.step_decider is not None else [])
        for m in mods:
            for _, b in m.named_buffers():
                seen[b.untyped_storage().data_ptr()] = b.untyped_storage().nbytes()
    print("bytes per image (batch 2 rows):", sum(seen.values()), sum(seen.values()) / 1024, "KiB")


if __name__ == "__main__":
    main()
