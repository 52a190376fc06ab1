"""The graph protocol: how FastCache's nodes in a rewritten graph are named, built and read.

Why this module exists: the passes write these nodes (``guard_blocks``, ``route_tokens``) and
several readers take them apart again (step dispatch, the decision split, ONNX export, the graph
diff).  Writers and readers meet here only: node names are built and parsed by the functions
below, the guard's and the router's calls are built from and read back into ``NamedTuple``\\ s
(never by position), and the FX helpers every pass needs (``COND``, metadata, contiguous copies)
are defined once.  Nothing here imports the rest of the package.

The calls, as they appear in a rewritten graph::

    tick  = fastcache_clock(timestep, latents)           # Tick(step, new_gen, ok, threshold, t, max_skip)
    pred  = fastcache_guard_i("decide", *DecideArgs)
    outs  = cond(pred, fastcache_fallback_i, fastcache_block_i, operands)
    _     = fastcache_guard_i("update", *UpdateArgs)      # state updates after the cond
    sel   = fastcache_guard_i.router("select", ...)       # token routing (RouterSelect)
    _     = fastcache_guard_i.router("update", ...)
"""
from __future__ import annotations

import operator
import re
from typing import Any, NamedTuple

import torch
import torch.fx as fx

__all__ = [
    "COND", "CLONE", "CLOCK", "STEP_DECIDER", "DRIFT", "NOISE", "RULE", "OUTPUT_STAGES", "DECIDE", "UPDATE", "SELECT", "Tick", "DecideArgs", "UpdateArgs",
    "RouterSelect", "guard_name", "block_branch_name", "fallback_branch_name", "compute_branch_name",
    "pred_placeholder_name", "state_update_name", "router_name", "is_state_module", "is_fastcache_module", "index_of", "val", "is_tensor", "is_contiguous",
    "contiguous_copy", "is_cond", "conds", "emit_clock", "emit_decide", "emit_update", "is_decide", "is_update",
    "decide_args", "update_args", "emit_router_select", "emit_router_update", "find_cond", "find_update",
    "tick_field", "guard_of_cond", "strip_identity", "is_view_op", "view_base", "written_by", "written_bases",
    "drop_dead_nodes", "first_output_leaves",
]

COND = torch.ops.higher_order.cond
CLONE = torch.ops.aten.clone.default

# -- names ---------------------------------------------------------------------------------
CLOCK = "fastcache_clock"
STEP_DECIDER = "fastcache_step"
DRIFT = "fastcache_drift"
NOISE = "fastcache_noise"
RULE = "fastcache_output_rule"
#: The modules on the model's output, in graph order: the noise forecast, the drift correction, the output rule.
OUTPUT_STAGES = (NOISE, DRIFT, RULE)
_GUARD, _BLOCK, _FALLBACK, _COMPUTE, _PRED, _STATE = (
    "fastcache_guard_", "fastcache_block_", "fastcache_fallback_", "fastcache_compute_", "fastcache_pred_",
    "fastcache_state_update_")
_INDEXED = re.compile(r"^fastcache_(guard|block|fallback|compute|pred|state_update)_(\d+)$")


def _indexed_name(prefix: str):
    def name(i: int) -> str:
        return f"{prefix}{i}"

    name.__name__ = f"{prefix}<i>"
    return name


#: ``fastcache_<kind>_<i>``: the guard module, the two cond branches, the routing branch, a
#: suffix's decision placeholder and an export state update of block (or span) ``i``.
guard_name = _indexed_name(_GUARD)
block_branch_name = _indexed_name(_BLOCK)
fallback_branch_name = _indexed_name(_FALLBACK)
compute_branch_name = _indexed_name(_COMPUTE)
pred_placeholder_name = _indexed_name(_PRED)
state_update_name = _indexed_name(_STATE)


def is_state_module(name: str) -> bool:
    """Whether a submodule path of a rewritten graph holds run-time state (clock, step decider, guards,
    drift correction, noise forecast, output rule)."""
    top = name.split(".", 1)[0]
    return top in (CLOCK, STEP_DECIDER, *OUTPUT_STAGES) or (top.startswith(_GUARD) and index_of(top) is not None)


def is_fastcache_module(name: str) -> bool:
    """Whether a submodule of a rewritten graph was inserted by the passes (``fastcache_*``)."""
    return name.startswith("fastcache_")


def router_name(guard: str) -> str:
    return f"{guard}.router"


def index_of(name: Any) -> int | None:
    """The block index of any indexed FastCache name (``fastcache_guard_3`` → 3), else ``None``."""
    m = _INDEXED.match(str(name))
    return int(m.group(2)) if m else None


# -- FX helpers ------------------------------------------------------------------------------
def val(n: Any) -> Any:
    """The example value (``meta["val"]``) of a node, ``None`` for non-nodes."""
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def is_tensor(n: Any) -> bool:
    return isinstance(val(n), torch.Tensor)


def _dense_strides(shape: Any) -> tuple[int, ...]:
    """The strides ``torch.empty(shape)`` has (row-major; a size-0/1 dim counts as 1)."""
    strides, acc = [], 1
    for d in reversed(tuple(shape)):
        strides.append(acc)
        acc *= max(int(d), 1)
    return tuple(reversed(strides))


def is_contiguous(n: fx.Node) -> bool:
    """Whether the node's value has exactly the row-major strides and no storage offset.  Stricter than
    ``Tensor.is_contiguous()``, which ignores the stride of a size-1 dim: a batch-1 slice such as
    ``cat([img, txt], 1)[:, :n]`` has stride ``(L_total*C, C, 1)`` and is "contiguous", but a
    ``torch.cond`` merging it with a ``(n*C, C, 1)`` branch output fails in fake-tensor
    propagation (``_bound_stride``: ``KeyError(L_total*C)``, torch 2.13)."""
    v = val(n)
    return (isinstance(v, torch.Tensor) and tuple(v.stride()) == _dense_strides(v.shape)
            and v.storage_offset() == 0)  # a batch-1 slice x[:, n:] (Flux): "expected same storage_offset"


def contiguous_copy(g: fx.Graph, n: fx.Node) -> fx.Node:
    """``clone(n, memory_format=contiguous)`` with its metadata (later passes read operand shapes)."""
    c = g.call_function(CLONE, (n,), {"memory_format": torch.contiguous_format})
    v = val(n)
    if isinstance(v, torch.Tensor):
        c.meta["val"] = v.clone(memory_format=torch.contiguous_format)  # .contiguous() keeps size-1 strides
    return c


def is_cond(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is COND


def conds(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if is_cond(n)]


def strip_identity(n: fx.Node, op: Any) -> fx.Node:
    """Follow ``n`` back through chained calls of the identity op ``op`` (capture markers)."""
    while n.op == "call_function" and n.target is op:
        n = n.args[0]
    return n



# -- in-place writes: the edges a data-flow walk misses ---------------------------------------
def is_view_op(op: Any) -> bool:
    """Whether ``op``'s output is a view of its first argument (``slice``, ``view``; ``chunk``'s list)."""
    return isinstance(op, torch._ops.OpOverload) and bool(op._schema.returns) and \
        (alias := op._schema.returns[0].alias_info) is not None and not alias.is_write


def view_base(n: fx.Node) -> fx.Node:
    """The tensor ``n`` is a view of (itself if no view op made it): an in-place write to a view is a write
    to its base.  Steps through ``getitem`` of a list of views (``chunk``, ``split``, ``unbind``)."""
    while n.op == "call_function" and n.args and isinstance(n.args[0], fx.Node):
        src = n.args[0]
        if n.target is operator.getitem and src.op == "call_function" and is_view_op(src.target) and src.args and \
                isinstance(src.args[0], fx.Node):
            n = src.args[0]
        elif is_view_op(n.target):
            n = src
        else:
            break
    return n


def written_by(n: fx.Node) -> list[fx.Node]:
    """The nodes an in-place op ``n`` writes to (``aten.copy_(slice, src)`` writes ``slice``)."""
    if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
        return []
    out = []
    for i, a in enumerate(n.target._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
            if isinstance(v, fx.Node):
                out.append(v)
    return out


def written_bases(root: torch.nn.Module, nodes: Any) -> set[fx.Node]:
    """The tensors ``nodes`` (of ``root``'s graph) write into in place, views counting as their base; also
    from inside the subgraphs a node calls: a region torch.export keeps as a call of a submodule
    (``torch.autocast``, grad mode; its operands follow the submodule) and a ``cond``'s branches (its
    operand list).  A write has no users, so a walk along data edges misses it."""
    out: set[fx.Node] = set()
    for n in nodes:
        out |= {view_base(w) for w in written_by(n)}
        if n.op != "call_function":
            continue
        for i, a in enumerate(n.args):
            sub = operator.attrgetter(a.target)(root) if isinstance(a, fx.Node) and a.op == "get_attr" else None
            if not isinstance(sub, fx.GraphModule):
                continue
            operands = n.args[3] if is_cond(n) else n.args[i + 1:]
            inner = [p for p in sub.graph.nodes if p.op == "placeholder"]
            for p in written_bases(sub, sub.graph.nodes) & set(inner):
                j = inner.index(p)
                if j < len(operands) and isinstance(operands[j], fx.Node):
                    out.add(view_base(operands[j]))
    return out


def drop_dead_nodes(gm: fx.GraphModule) -> None:
    """``eliminate_dead_code`` keeping every node that writes in place, also inside a region it calls: FX
    counts a call of a region torch.export keeps as a submodule (``torch.autocast``, grad mode) as pure, and
    one whose outputs nobody read was dropped with its writes (``temb[:, :8].mul_(0.5)`` under
    ``torch.autocast``: 0.04 off with approximation off)."""
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or bool(written_bases(gm, [n])))


# -- the clock -------------------------------------------------------------------------------
class Tick(NamedTuple):
    """What the clock returns at the top of every graph (all 0-d tensors)."""

    step: Any
    new_gen: Any
    ok: Any
    threshold: Any
    t: Any
    max_skip: Any


def emit_clock(g: fx.Graph, timestep: fx.Node | None, stream: fx.Node | None = None) -> Tick:
    """Insert the clock call at the current insertion point; returns its outputs as ``getitem`` nodes."""
    tick = g.call_module(CLOCK, (timestep, stream))
    return Tick(*(g.call_function(operator.getitem, (tick, i)) for i in range(len(Tick._fields))))


def tick_field(node: fx.Node) -> str | None:
    """For a ``getitem`` of the clock's output, the :class:`Tick` field it reads."""
    if node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "call_module" and src.target == CLOCK:
            return Tick._fields[node.args[1]]
    return None


# -- the guard -------------------------------------------------------------------------------
DECIDE = "decide"
UPDATE = "update"
SELECT = "select"


class DecideArgs(NamedTuple):
    """The guard's ``decide`` inputs: the clock's outputs, the per-block signal (the block's probe for
    per-block policies, else ``None``) and the step decider's verdict (``None``: no step policy yet)."""

    step: Any
    new_gen: Any
    ok: Any
    threshold: Any
    t: Any
    max_skip: Any
    signal: Any
    step_pred: Any


class UpdateArgs(NamedTuple):
    """The guard's ``update`` inputs: the cond's predicate (or a plain bool in a specialised copy),
    the generation flag, the timestep and each stream's input and output."""

    pred: Any
    new_gen: Any
    t: Any
    ins: tuple
    outs: tuple


def emit_decide(g: fx.Graph, guard: str, args: DecideArgs) -> fx.Node:
    return g.call_module(guard, (DECIDE, *args))


def emit_update(g: fx.Graph, guard: str, args: UpdateArgs) -> fx.Node:
    return g.call_module(guard, (UPDATE, args.pred, args.new_gen, args.t, len(args.ins), *args.ins, *args.outs))


def _is_call(n: fx.Node, op: str, guard: str | None) -> bool:
    if n.op != "call_module" or not n.args or n.args[0] != op:
        return False
    target = str(n.target)
    return target == guard if guard is not None else index_of(target) is not None and target.startswith(_GUARD)


def is_decide(n: fx.Node, guard: str | None = None) -> bool:
    """A guard's ``decide`` call (of ``guard`` if given)."""
    return _is_call(n, DECIDE, guard)


def is_update(n: fx.Node, guard: str | None = None) -> bool:
    """A guard's ``update`` call (of ``guard`` if given; routers' updates are not guard updates)."""
    return _is_call(n, UPDATE, guard)


def decide_args(n: fx.Node) -> DecideArgs:
    if not is_decide(n):
        raise RuntimeError(f"{n.name} is not a guard decision")
    return DecideArgs(*n.args[1:])


def update_args(n: fx.Node) -> UpdateArgs:
    if not is_update(n):
        raise RuntimeError(f"{n.name} is not a guard update")
    pred, new_gen, t, n_streams, *rest = n.args[1:]
    return UpdateArgs(pred, new_gen, t, tuple(rest[:n_streams]), tuple(rest[n_streams:]))


def find_cond(graph: fx.Graph, guard: str) -> fx.Node:
    """The ``cond`` whose predicate is ``guard``'s decision."""
    for n in conds(graph):
        p = n.args[0]
        if isinstance(p, fx.Node) and is_decide(p, guard):
            return n
    raise RuntimeError(f"no torch.cond guarded by {guard}; run guard_blocks first")


def find_update(graph: fx.Graph, guard: str) -> fx.Node:
    for n in graph.nodes:
        if is_update(n, guard):
            return n
    raise RuntimeError(f"no update call of {guard}")


def guard_of_cond(cond: fx.Node) -> str:
    """The guard module name of a ``cond`` (from its cheap branch's name)."""
    i = index_of(getattr(cond.args[1], "target", ""))
    if i is None:
        raise RuntimeError(f"{cond.name} is not a FastCache guarded block")
    return guard_name(i)


# -- the token router ------------------------------------------------------------------------
class RouterSelect(NamedTuple):
    """The router's ``select`` outputs: route this step, and the routed token indices (B, k)."""

    active: Any
    idx: Any


def emit_router_select(g: fx.Graph, guard: str, step: Any, new_gen: Any, force: Any, warmup: Any,
                       x: Any) -> RouterSelect:
    sel = g.call_module(router_name(guard), (SELECT, step, new_gen, force, warmup, x))
    return RouterSelect(*(g.call_function(operator.getitem, (sel, i)) for i in range(len(RouterSelect._fields))))


def emit_router_update(g: fx.Graph, guard: str, pred: Any, new_gen: Any, active: Any, idx: Any, x: Any,
                       y: Any) -> fx.Node:
    return g.call_module(router_name(guard), (UPDATE, pred, new_gen, active, idx, x, y))


def first_output_leaves(gm: fx.GraphModule) -> int:
    """How many tensors the model's first output is: one, or a list's length (Z-Image's per-sample list)."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    spec = info.out_spec if info is not None else None
    if spec is None or spec.is_leaf():
        return 1
    return spec.child(0).num_leaves if spec.num_children else 1
