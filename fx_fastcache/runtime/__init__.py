"""Small ``nn.Module``\\ s that the ``guard_blocks`` pass inserts into the captured graph.

They hold all mutable state as registered buffers and update it in place, inside the graph,
with ``torch.where`` (no ``.item()``, no host sync, no data-dependent Python control flow).
"""
from .clock import Clock
from .guard import BlockGuard

__all__ = ["Clock", "BlockGuard"]
