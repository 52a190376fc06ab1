"""Split a rewritten graph at its decisions: a *prefix* that decides, a *suffix* that computes.

Why this exists: on CUDA an in-graph ``torch.cond`` costs a device-to-host sync per guarded
block and forbids CUDA graphs (docs/GPU.md).  A step-level policy (``step_forecast``,
``teacache``, ``first_block_cache``, ``schedule``) decides every block of a step from values
that exist *before* the blocks run: the clock, the step decider's verdict and each guard's own
counters.  So the graph can be cut in two:

* the **prefix** holds every node the guards' ``decide`` calls depend on (clock, embeddings,
  block 0's probe, the step decider and its state update; for First-Block-Cache also block 0
  itself, which always computes) and returns the decisions stacked in one bool tensor plus
  the values the rest of the graph reads from it;
* the **suffix** is everything else, specialised per skip pattern exactly like
  :func:`~fx_fastcache.step_dispatch.specialise` (no ``cond`` left, the guard updates get a
  plain bool).

:class:`~fx_fastcache.step_dispatch.StepDispatch` then runs prefix → one host read of the
decisions (the only sync of the step) → the suffix compiled for that pattern, which can be
replayed as a CUDA graph.  Nothing is computed twice and every state update runs exactly once,
in the same order relative to the reads that matter, so the result equals the in-graph
version (tests/test_step_dispatch.py).

Per-block policies (``chi2``) decide block ``i`` from block ``i``'s input, which only exists
after block ``i − 1`` ran: they cannot be split and get a ``ValueError`` naming the policy.
"""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree

from . import graph_protocol as gp
from .graph_protocol import is_cond, is_decide
from .quiet import quiet_deepcopy
from .runtime.pin import unpin

__all__ = ["DecisionSplit", "split_at_decisions", "resolve_conds", "guard_index"]


def _device_of(operands: Any) -> torch.device:
    for o in operands:
        val = o.meta.get("val") if isinstance(o, fx.Node) else None
        if isinstance(val, torch.Tensor):
            return val.device
    return torch.device("cpu")


def resolve_conds(graph: fx.Graph, choose: dict[fx.Node, bool]) -> None:
    """Replace each ``cond`` whose predicate node is a key of ``choose`` by a direct call of the
    chosen branch (``True`` = the fallback).  The guard's own ``update`` receives the choice as a
    plain ``bool``; other readers of the predicate (the token router) a constant tensor.
    Predicate nodes left without readers are erased."""
    for cond in gp.conds(graph):
        pred, cheap, full, operands = cond.args
        if pred not in choose:
            continue
        skip = bool(choose[pred])
        with graph.inserting_before(cond):
            call = graph.call_module((cheap if skip else full).target, tuple(operands))
            const = graph.call_function(torch.full, ((), skip),
                                        {"dtype": torch.bool, "device": _device_of(operands)})
        cond.replace_all_uses_with(call)
        guard = gp.guard_of_cond(cond)
        for user in list(pred.users):
            if user is cond:
                continue
            user.replace_input_with(pred, skip if gp.is_update(user, guard) else const)
        graph.erase_node(cond)
        for n in (cheap, full):
            if n.op == "get_attr" and not n.users:
                graph.erase_node(n)
        if not const.users:
            graph.erase_node(const)
        if not pred.users:
            graph.erase_node(pred)


def guard_index(node: fx.Node) -> int:
    """Block index of a guard call or of a suffix's ``fastcache_pred_<i>`` placeholder."""
    i = gp.index_of(node.target)
    if i is not None:
        return i
    raise RuntimeError(f"cond predicate {node.name} is not a guard decision; cannot specialise this graph")


@dataclass
class DecisionSplit:
    """The two halves of a rewritten graph (see the module docstring).

    ``prefix(*flat_inputs) -> (decisions, *live)``; ``decisions[j]`` is block
    ``decided_blocks[j]``'s predicate; the other blocks always compute.
    ``suffix(pattern)(*flat_inputs, *live)`` returns the flat outputs of the original graph.
    """

    root: fx.GraphModule
    prefix: fx.GraphModule
    suffix_template: fx.Graph
    decided_blocks: list[int]
    n_blocks: int
    in_spec: Any
    out_spec: Any
    #: First block index of a guarded span → every block index of it (``passes/group_spans.py``).
    span_of: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def flatten(self, kw: dict[str, Any]) -> list[Any]:
        return list(fx_pytree.tree_flatten_spec(((), kw), self.in_spec))

    def unflatten(self, out: Any) -> Any:
        if self.out_spec is None:
            return out
        return pytree.tree_unflatten(list(out) if isinstance(out, (list, tuple)) else [out], self.out_spec)

    def pattern(self, decisions: list[bool]) -> tuple[bool, ...]:
        pat = [False] * self.n_blocks
        for i, d in zip(self.decided_blocks, decisions):
            for j in self.span_of.get(i, (i,)):  # a guarded span: every block takes its decision
                pat[j] = bool(d)
        return tuple(pat)

    def suffix(self, pattern: tuple[bool, ...]) -> fx.GraphModule:
        graph = quiet_deepcopy(self.suffix_template)
        preds = {n: bool(pattern[guard_index(n)]) for n in graph.nodes
                 if n.op == "placeholder" and gp.index_of(n.target) is not None}
        resolve_conds(graph, preds)
        left = [n.name for n in preds if n in graph.nodes]
        if left:
            raise RuntimeError(f"decisions {left} are still read after specialisation; cannot build the suffix")
        gm = fx.GraphModule(self.root, graph)
        gm.graph.lint()
        gm.recompile()
        return gm


def _ancestors(roots: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _with_writes(root: fx.GraphModule, graph: fx.Graph,
                 prefix: set[fx.Node]) -> tuple[set[fx.Node], list[fx.Node]]:
    """``prefix`` and the in-place writes its nodes read through, and those writes.  A write has no users,
    so the data edges miss it, and Wan Animate's ``hidden_states[:, :, 1:] += pose`` (``aten.copy_`` into a
    slice) stayed in the suffix while the prefix read the tensor without it (1.4 off with approximation
    off).  A write joins the prefix, with its inputs, when a prefix node after it reads the tensor it
    writes; so does every node before it that reads that tensor (it must still read it unwritten)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    readers: dict[fx.Node, list[fx.Node]] = {}  # base -> the nodes that are or read a view of it
    writes: list[tuple[fx.Node, set[fx.Node]]] = []
    for n in graph.nodes:
        for x in {gp.view_base(i) for i in (n, *n.all_input_nodes)}:
            readers.setdefault(x, []).append(n)
        if bases := gp.written_bases(root, [n]):  # (also inside a region: torch.autocast, a block's cond)
            writes.append((n, bases))
    prefix, pulled = set(prefix), []
    changed = True
    while changed:
        changed = False
        for w, bases in writes:
            if w in prefix or not any(r in prefix and order[r] > order[w] for b in bases for r in readers[b]):
                continue
            before = [r for b in bases for r in readers[b] if order[r] < order[w] and r not in prefix]
            prefix |= _ancestors([w, *before])
            pulled.append(w)
            changed = True
    return prefix, pulled


def _always_computes(gm: fx.GraphModule, decide: fx.Node) -> bool:
    """A guard whose decision is constant False: no decider and no step verdict yet (the blocks
    before First-Block-Cache's anchor)."""
    guard = getattr(gm, str(decide.target))
    return guard.decider is None and gp.decide_args(decide).step_pred is None


def split_at_decisions(gm: fx.GraphModule, policy: str = "?") -> DecisionSplit:
    """Cut ``gm`` (a FastCache-rewritten graph) into a deciding prefix and a computing suffix."""
    graph = quiet_deepcopy(gm.graph)
    unpin(graph)  # no cond will be compiled: layout pins would only cost copies
    span_of = guard_spans(gm)
    n_blocks = sum(len(v) for v in span_of.values())
    if n_blocks == 0:
        raise RuntimeError("the graph has no guarded blocks (torch.cond); nothing to split")
    # blocks that always compute (before a step policy's anchor) become plain calls first
    fixed = {n: False for n in graph.nodes if is_decide(n) and _always_computes(gm, n)}
    resolve_conds(graph, fixed)
    decides = sorted((n for n in graph.nodes if is_decide(n)), key=guard_index)
    if not decides:
        raise RuntimeError("the graph has no guard decisions; nothing to split")

    prefix_nodes, writes = _with_writes(gm, graph, _ancestors(decides))
    for n in list(prefix_nodes):  # tuple outputs: their getitems are free, keep them beside the tuple
        prefix_nodes.update(u for u in n.users if u.op == "call_function" and u.target is operator.getitem
                            and u.args[0] is n)
    late = [n.name for n in prefix_nodes if is_cond(n)]
    if late and writes:
        raise ValueError(f"the model writes in place into a tensor that the step's decisions read "
                         f"({', '.join(f'{w.name}: {w.target}' for w in writes)}), after a guarded block ran: the "
                         f"graph cannot be split into decisions before the blocks. Keep the in-graph guards "
                         f"(step_dispatch=None, or execution='in_graph')")
    if late:
        raise ValueError(f"policy={policy!r} decides each block from that block's input, which exists only after "
                         f"the previous blocks ran ({len(late)} guarded block(s) precede a decision); one decision "
                         f"per step cannot be read before the blocks. Use a step-level policy (step_forecast, "
                         f"teacache, first_block_cache) or a schedule, or keep the in-graph guards (no step "
                         f"dispatch)")

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    in_prefix = [n for n in body if n in prefix_nodes]
    in_suffix = [n for n in body if n not in prefix_nodes]
    decide_set = set(decides)
    live = [n for n in in_prefix if n.op != "get_attr" and n not in decide_set  # in graph order
            and any(u not in prefix_nodes for u in n.users)]

    # -- prefix: flat inputs -> (stacked decisions, *live)
    pre = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for p in placeholders:
        env[p] = pre.placeholder(p.name)
        env[p].meta = dict(p.meta)
    for n in in_prefix:
        env[n] = pre.node_copy(n, env.__getitem__)
    stacked = pre.call_function(torch.stack, ([env[d] for d in decides],))
    pre.output((stacked, *[env[n] for n in live]))
    prefix = fx.GraphModule(gm, pre)
    prefix.graph.lint()
    prefix.recompile()

    # -- suffix template: flat inputs + live values (+ one placeholder per decision) -> outputs
    suf = fx.Graph()
    env = {}
    for p in placeholders:
        env[p] = suf.placeholder(p.name)
        env[p].meta = dict(p.meta)
    for n in live:
        env[n] = suf.placeholder(f"live_{n.name}")
        env[n].meta = dict(n.meta)
    for d in decides:
        env[d] = suf.placeholder(gp.pred_placeholder_name(guard_index(d)))
    for n in in_prefix:  # parameters / buffers the suffix reads: fetch again, do not pass
        if n.op == "get_attr" and any(u not in prefix_nodes for u in n.users):
            env[n] = suf.node_copy(n, env.__getitem__)
    for n in in_suffix:
        env[n] = suf.node_copy(n, env.__getitem__)
    out = next(n for n in graph.nodes if n.op == "output")
    suf.output(pytree.tree_map_only(fx.Node, env.__getitem__, out.args[0]))

    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        raise RuntimeError("split_at_decisions needs a graph from torch.export (its pytree input spec)")
    return DecisionSplit(root=gm, prefix=prefix, suffix_template=suf,
                         decided_blocks=[guard_index(d) for d in decides], n_blocks=n_blocks,
                         in_spec=info.in_spec, out_spec=info.out_spec, span_of=span_of)


def guard_spans(gm: fx.GraphModule) -> dict[int, tuple[int, ...]]:
    """Guard index (its first block) → block indices it covers, for every guarded ``cond`` of ``gm``.

    A per-block guard covers its own block; a guarded span (``passes/group_spans.py``) covers
    consecutive blocks, so skip patterns stay one entry per block."""
    out: dict[int, tuple[int, ...]] = {}
    for n in gp.conds(gm.graph):
        name = gp.guard_of_cond(n)
        i = gp.index_of(name)
        guard = getattr(gm, name, None)
        out[i] = tuple(range(i, i + len(getattr(guard, "blocks", (None,)))))
    return out
