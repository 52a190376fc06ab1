"""explicit_state: a stateless copy of a rewritten graph, for export (not in the default PIPELINE).

Why it exists: the rewritten graph keeps its run-time state (step clock, per-block counters,
the fallbacks' cached residuals) in module buffers that it updates in place.  ONNX and
TensorRT have no mutable state: exporting that graph as it is freezes every buffer into a
constant and silently drops the updates.  This pass builds a copy in which

* the clock disappears: the scalar timestep is read from the timestep input, and a new
  generation is the caller's business (it starts from zero state);
* every guard's decision becomes ``skip[i]``, the ``i``-th element of a new bool input
  (the current step's row of a skip schedule; a 0-d bool, as TensorRT's ``If`` requires);
* every fallback state buffer that the guard updates (cached residuals, cached inputs,
  timesteps of the last computations, computed counts) becomes an explicit input
  ``state_in.<block>.<name>`` and its updated value an explicit output
  ``state_out.<block>.<name>``; calibration constants (``A``, ``b``) stay constants;

Runtime-specific node rewrites (what onnxruntime cannot run) are not done here: see
:mod:`fx_fastcache.export.onnx_fixes`.

The signature is flat: the model's tensor inputs (in call order), then ``skip``, then the
state inputs; outputs are the model's tensor outputs, then the new state.  The result is
returned with an :class:`ExplicitStateSpec` that names every input and output.
"""
from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from fx_fastcache import graph_protocol as gp
from fx_fastcache.quiet import library_noise_silenced
from fx_fastcache.runtime.pin import unpin

from .context import PassContext

logger = logging.getLogger(__name__)


@dataclass
class StateTensor:
    """One carried state tensor: its block, buffer name, shape and dtype (as strings for JSON)."""

    block: str
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def input_name(self) -> str:
        return f"state_in.{self.block}.{self.name}"

    @property
    def output_name(self) -> str:
        return f"state_out.{self.block}.{self.name}"

    def zeros(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.zeros(self.shape, dtype=getattr(torch, self.dtype.replace("torch.", "")), device=device)


@dataclass
class ExplicitStateSpec:
    """Names and metadata of the stateless graph's inputs and outputs."""

    inputs: list[str]  # the model's tensor inputs, in order
    input_shapes: dict[str, tuple[int, ...]]
    input_dtypes: dict[str, str]
    outputs: list[str]  # the model's tensor outputs
    blocks: list[str]
    state: list[StateTensor] = field(default_factory=list)
    #: Block indices of each guarded ``If`` (a span: several consecutive blocks, which must share
    #: their schedule column); empty: one ``If`` per block.  ``skip`` has one entry per block.
    spans: list[list[int]] = field(default_factory=list)
    dropped_squeezes: int = 0
    rewritten_bool_fills: int = 0

    @property
    def input_names(self) -> list[str]:
        return [*self.inputs, "skip", *(s.input_name for s in self.state)]

    @property
    def output_names(self) -> list[str]:
        return [*self.outputs, *(s.output_name for s in self.state)]

    def initial_state(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        return [s.zeros(device) for s in self.state]

    def to_dict(self) -> dict:
        return {"inputs": self.inputs, "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
                "input_dtypes": self.input_dtypes, "outputs": self.outputs, "blocks": self.blocks,
                "state": [{"block": s.block, "name": s.name, "shape": list(s.shape), "dtype": s.dtype}
                          for s in self.state], "spans": self.spans}

    @classmethod
    def from_dict(cls, d: dict) -> "ExplicitStateSpec":
        return cls(inputs=list(d["inputs"]), input_shapes={k: tuple(v) for k, v in d["input_shapes"].items()},
                   input_dtypes=dict(d["input_dtypes"]), outputs=list(d["outputs"]), blocks=list(d["blocks"]),
                   state=[StateTensor(s["block"], s["name"], tuple(s["shape"]), s["dtype"]) for s in d["state"]],
                   spans=[list(x) for x in d.get("spans", [])])

    @property
    def guarded(self) -> list[list[int]]:
        """Block indices per ``If``: the spans, or one per block."""
        return self.spans or [[i] for i in range(len(self.blocks))]


class StateUpdate(nn.Module):
    """The functional form of ``fallback.update``: old state in, new state out.

    It runs the fallback's own update rule on a shallow copy of the fallback whose state
    buffers are clones of the inputs, so the rule is written once (in ``fallbacks/``) and
    the export sees only tensor operations on its inputs.  The fallback is referenced, not
    registered, so its buffers are not lifted a second time.
    """

    def __init__(self, fallback: nn.Module, names: list[str]) -> None:
        super().__init__()
        object.__setattr__(self, "_fallback", fallback)
        self.names = list(names)

    def forward(self, pred, new_gen, t, n_streams: int, *rest):
        k = len(self.names)
        ins_outs, state = rest[: len(rest) - k], rest[len(rest) - k:]
        ins, outs = ins_outs[:n_streams], ins_outs[n_streams:]
        fb = self._fallback
        shadow = copy.copy(fb)
        shadow.__dict__["_buffers"] = dict(fb._buffers)
        for name, s in zip(self.names, state):
            shadow._buffers[name] = s.clone()
        type(fb).update(shadow, ~pred, new_gen, t, ins, outs)
        return tuple(shadow._buffers[name] for name in self.names)


def mutable_state_names(fallback: nn.Module, store) -> list[str]:
    """Buffers of ``fallback`` that its update writes: all but the shared calibration constants."""
    constants = {id(v) for v in store.tensors.values()}
    return [n for n, b in fallback.named_buffers(recurse=False) if id(b) not in constants]


def _dedupe_cond_operands(g: fx.Graph) -> None:
    """Pass a repeated cond operand (Flux's shared ``t_c`` for both streams) as a copy.

    ``torch.export`` names a branch's placeholders after the outer operands; the same node
    twice gives a branch signature with a duplicate argument (``SyntaxError``).
    """
    for n in gp.conds(g):
        ops = list(n.args[3])
        seen: set[fx.Node] = set()
        for j, a in enumerate(ops):
            if isinstance(a, fx.Node) and a in seen:
                with g.inserting_before(n):
                    c = g.call_function(gp.CLONE, (a,))
                c.meta["val"] = a.meta.get("val")
                ops[j] = c
            elif isinstance(a, fx.Node):
                seen.add(a)
        n.args = (n.args[0], n.args[1], n.args[2], ops, *n.args[4:])


def _is_tensor(n: fx.Node) -> bool:
    return isinstance(n.meta.get("val"), torch.Tensor)


def explicit_state(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, ExplicitStateSpec]:
    """Return a stateless copy of the rewritten ``gm`` (see the module docstring); ``gm`` is unchanged."""
    if ctx.clock is None or not ctx.guards:
        raise ValueError("explicit_state needs a graph rewritten by guard_blocks (no clock/guards found)")
    if ctx.timestep is None:
        raise ValueError(f"{type(ctx.model).__name__} has no timestep input: export with explicit state needs the "
                         f"timestep to drive the fallbacks")
    if ctx.spec.timestep_rises:
        raise ValueError(f"{type(ctx.model).__name__}'s timestep rises (1 − σ): the ONNX runner's generation rule "
                         f"reads falling timesteps by name, so its export is not supported; run it with "
                         f"fastcache.optimize")
    if hasattr(gm, gp.NOISE):
        raise ValueError(f"noise_forecast={ctx.config.noise_forecast!r} is not supported by export (its state is "
                         f"not carried as explicit inputs); optimize with noise_forecast='none' to export")
    if hasattr(gm, gp.DRIFT):
        raise ValueError(f"drift_correction={ctx.config.drift_correction!r} is not supported by export (its state is "
                         f"not carried as explicit inputs); optimize with drift_correction='none' to export")

    if hasattr(gm, gp.RULE):
        raise ValueError(f"output_rule={ctx.config.output_rule!r} is not supported by export (its state is not "
                         f"carried as explicit inputs); optimize with output_rule='none' to export")

    with library_noise_silenced():  # deepcopy of the pytree specs: torch's LeafSpec FutureWarning
        new = copy.deepcopy(gm)
    g = new.graph
    unpin(g)  # inductor-only layout barriers: not an ONNX op, and eager/onnxruntime do not need them
    g._codegen = fx.graph.CodeGen()  # flat positional signature (no pytree in/out specs)
    nodes = list(g.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    for n in nodes:  # torch.export's input guard: it checks the pytree inputs we replace
        if n.op == "call_module" and n.target == "_guards_fn":
            g.erase_node(n)
    inputs = []
    for p in placeholders:
        if _is_tensor(p):
            inputs.append(p)
        elif p.users:
            raise ValueError(f"input {p.name!r} is not a tensor but the graph uses it; it cannot be an export input")
        else:
            g.erase_node(p)
    out_node = next(n for n in reversed(list(g.nodes)) if n.op == "output")
    flat_out = out_node.args[0]
    flat_out = list(flat_out) if isinstance(flat_out, (tuple, list)) else [flat_out]
    if not all(isinstance(o, fx.Node) and _is_tensor(o) for o in flat_out):
        raise ValueError("the model's outputs must all be tensors to export (pass return_dict=False)")

    last_ph = inputs[-1]
    with g.inserting_after(last_ph):
        skip = g.placeholder("skip")
    n_blocks = sum(len(getattr(gm, gname).blocks) for gname in ctx.guards)
    skip.meta["val"] = torch.zeros(n_blocks, dtype=torch.bool)  # one per block; a span reads its first

    clock = next(n for n in g.nodes if n.op == "call_module" and n.target == ctx.clock)
    ts = clock.args[0]  # the clock's only input: the model's timestep
    with g.inserting_before(clock):
        # the largest entry, as the clock reads it (runtime.generation.scalar_timestep)
        t0 = g.call_function(torch.ops.aten.amax.default,
                             (g.call_function(torch.ops.aten.reshape.default, (ts, [-1])), [0]))
        t_eff = g.call_function(torch.ops.aten._to_copy.default, (t0,), {"dtype": torch.float32})
        new_gen = g.call_function(torch.ops.aten.full.default, ([], False), {"dtype": torch.bool})
    for u in list(clock.users):
        field_name = gp.tick_field(u)
        if field_name == "t":
            u.replace_all_uses_with(t_eff)
        elif field_name == "new_gen":
            u.replace_all_uses_with(new_gen)

    spec = ExplicitStateSpec(inputs=[p.name for p in inputs],
                             input_shapes={p.name: tuple(p.meta["val"].shape) for p in inputs},
                             input_dtypes={p.name: str(p.meta["val"].dtype) for p in inputs},
                             outputs=[f"out_{i}" for i in range(len(flat_out))], blocks=[], state=[])
    state_in: list[fx.Node] = []
    state_out: list[fx.Node] = []
    prev = skip
    for i, gname in enumerate(ctx.guards):
        guard = getattr(new, gname)
        spec.blocks.extend(guard.blocks)
        spec.spans.append(list(range(guard.index, guard.index + len(guard.blocks))))
        names = mutable_state_names(getattr(gm, gname).fallback, ctx.store)  # the copy's buffers are not the store's
        phs = {}
        for name in names:
            st = StateTensor(guard.block_name, name, tuple(getattr(guard.fallback, name).shape),
                             str(getattr(guard.fallback, name).dtype))
            spec.state.append(st)
            with g.inserting_after(prev):
                ph = g.placeholder(st.input_name.replace(".", "_"))
            ph.meta["val"] = getattr(guard.fallback, name).detach().clone()
            phs[name] = ph
            state_in.append(ph)
            prev = ph
        for n in list(g.nodes):
            if n.op == "get_attr" and isinstance(n.target, str) and n.target.startswith(f"{gname}.fallback."):
                leaf = n.target[len(f"{gname}.fallback."):]
                if leaf in phs:
                    n.replace_all_uses_with(phs[leaf])
                    g.erase_node(n)
        decide = [n for n in g.nodes if gp.is_decide(n, gname)]
        update = [n for n in g.nodes if gp.is_update(n, gname)]
        if len(decide) != 1 or len(update) != 1:
            raise RuntimeError(f"{gname}: expected one decide and one update call, found {len(decide)}/{len(update)}")
        with g.inserting_before(decide[0]):
            pred = g.call_function(torch.ops.aten.select.int, (skip, 0, guard.index))
        pred.meta["val"] = torch.zeros((), dtype=torch.bool)
        decide[0].replace_all_uses_with(pred)
        g.erase_node(decide[0])
        upd_name = gp.state_update_name(i)
        new.add_module(upd_name, StateUpdate(guard.fallback, names))
        u = update[0]
        ua = gp.update_args(u)
        upred = ua.pred
        with g.inserting_before(u):
            call = g.call_module(upd_name, (ua.pred, ua.new_gen, ua.t, len(ua.ins), *ua.ins, *ua.outs,
                                            *(phs[n] for n in names)))
            for j, name in enumerate(names):
                r = g.call_function(operator.getitem, (call, j))
                r.meta["val"] = phs[name].meta["val"]
                state_out.append(r)
        if u.users:
            u.replace_all_uses_with(upred)
        g.erase_node(u)
    if ctx.step_decider is not None:
        for n in list(g.nodes):
            if n.op == "call_module" and n.target == ctx.step_decider:
                for user in list(n.users):
                    raise RuntimeError(f"step decider output still used by {user.name} after the guards were replaced")
                g.erase_node(n)
    for u in list(clock.users):
        if u.users:
            raise RuntimeError(f"clock output {gp.tick_field(u)!r} still used by {[x.name for x in u.users]}")
        g.erase_node(u)
    g.erase_node(clock)
    out_node.args = (tuple(flat_out) + tuple(state_out),)
    _dedupe_cond_operands(g)
    gp.drop_dead_nodes(new)
    g.lint()
    new.recompile()
    for name in (ctx.clock, ctx.step_decider, *ctx.guards):
        if name and hasattr(new, name):
            used = any(n.op in ("get_attr", "call_module") and isinstance(n.target, str)
                       and (n.target == name or n.target.startswith(name + ".")) for n in g.nodes)
            if not used:
                delattr(new, name)
    new.recompile()
    logger.info("explicit_state: %d blocks, %d state tensors", len(spec.blocks), len(spec.state))
    return new, spec
