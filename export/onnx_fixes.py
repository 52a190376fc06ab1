"""Node rewrites the exported ONNX graph needs to run in onnxruntime (not part of the FastCache rewrite).

Why it exists: two patterns that ``torch.export`` captures from diffusers models export to ONNX
nodes onnxruntime rejects:

* no-op ``aten.squeeze.dim`` nodes (squeezing a dimension whose size is not 1) export to a
  ``Squeeze`` onnxruntime refuses ("Dimension of input 1 must be 1", seen on PixArt): dropped;
* ``masked_fill`` on a bool tensor exports to a bool ``Where``, which onnxruntime's CPU provider
  does not implement (HunyuanVideo builds its attention mask that way): rewritten into
  ``logical_and``/``logical_or``.

Both apply to the stateless graph of :func:`fx_fastcache.passes.explicit_state.explicit_state`
and its cond branches, just before the ONNX export.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

SQUEEZE_OPS = (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims)


def _rewrite_nodes(gm: fx.GraphModule, rewrite: Callable[[fx.Graph, fx.Node], bool]) -> int:
    """Apply ``rewrite(graph, node)`` (True = it replaced the node) to every node of ``gm`` and of
    its subgraphs (cond branches); lint and recompile the graphs it changed; return the count."""
    count = 0
    for mod in gm.modules():
        if not isinstance(mod, fx.GraphModule):
            continue
        changed = sum(rewrite(mod.graph, n) for n in list(mod.graph.nodes))
        if changed:
            mod.graph.lint()
            mod.recompile()
        count += changed
    return count


def _bool_masked_fill(g: fx.Graph, n: fx.Node) -> bool:
    """``masked_fill(x, m, v)`` with bool ``x`` → ``x & ~m`` (v false) or ``x | m`` (v true)."""
    aten = torch.ops.aten
    if n.op != "call_function" or n.target is not aten.masked_fill.Scalar:
        return False
    x, mask, value = n.args[:3]
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if val is None or val.dtype != torch.bool:
        return False
    with g.inserting_before(n):
        if bool(value):
            new = g.call_function(aten.logical_or.default, (x, mask))
        else:
            keep = g.call_function(aten.logical_not.default, (mask,))
            new = g.call_function(aten.logical_and.default, (x, keep))
    new.meta = dict(n.meta)
    n.replace_all_uses_with(new)
    g.erase_node(n)
    return True


def _noop_squeeze(g: fx.Graph, n: fx.Node) -> bool:
    """Drop a ``squeeze.dim(s)`` that squeezes no size-1 dimension."""
    if n.op != "call_function" or n.target not in SQUEEZE_OPS:
        return False
    src = n.args[0]
    vin = src.meta.get("val") if isinstance(src, fx.Node) else None
    vout = n.meta.get("val")
    if vin is None and vout is None:
        return False
    shape = tuple((vin if vin is not None else vout).shape)
    dims = n.args[1] if len(n.args) > 1 else []
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not shape or any(shape[d] == 1 for d in dims):
        return False
    n.replace_all_uses_with(src)
    g.erase_node(n)
    return True


def rewrite_bool_masked_fills(gm: fx.GraphModule) -> int:
    """Rewrite bool ``masked_fill`` into logical ops in ``gm`` and its subgraphs; returns how many."""
    return _rewrite_nodes(gm, _bool_masked_fill)


def drop_noop_squeezes(gm: fx.GraphModule) -> int:
    """Remove ``squeeze.dim(s)`` nodes that squeeze no size-1 dimension, in ``gm`` and its subgraphs."""
    return _rewrite_nodes(gm, _noop_squeeze)
