"""Graph diff inspection: what the FX passes did to a model, block by block and pass by pass.

Captures the model once (eager, no compile) with ``record_passes`` on, then reports

* per block: the original region (node count, histogram of ops, nodes hoisted out for the
  probe) and the rewritten form (guard module, policy decider, fallback and its state,
  the ``cond`` with its branches and operand count, where the outputs go);
* per pass: node counts before/after, nodes added and removed, the pass's notes;
* for one pass on request: the graph code before and after it (unified diff or in full).

``format_text`` gives a readable report, ``format_html`` a self-contained page (inline CSS,
no scripts) with the same content and collapsible per-block code.
"""
from __future__ import annotations

import difflib
import html
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from . import graph_protocol as gp
from .api import optimize

logger = logging.getLogger(__name__)

_SKIP_OPS = {"_assert_tensor_metadata"}


def op_name(n: fx.Node) -> str:
    """Short name of a node's operation (``linear``, ``scaled_dot_product_attention``, ...)."""
    if n.op == "call_function":
        t = n.target
        name = getattr(t, "__name__", None) or str(t)
        if hasattr(t, "_schema") or hasattr(t, "_overloadname"):
            name = str(t).split(".")[1] if str(t).startswith("aten.") else str(t)
        return name.split(".")[0] if name.startswith("aten") else name
    if n.op == "call_module":
        return f"module:{n.target}"
    return n.op


def ops_histogram(nodes) -> Counter:
    return Counter(op_name(n) for n in nodes if n.op in ("call_function", "call_module") and op_name(n) not in _SKIP_OPS)


@dataclass
class BlockReport:
    index: int
    name: str
    original_nodes: int
    ops: Counter
    hoisted: int
    rewritten: bool
    guard: str
    decider: str
    fallback: str
    state: list[str]
    cond: str
    operands: int
    outputs: list[str]
    routing: list[str]
    block_code: str
    fallback_code: str
    #: The guarded span this block belongs to (``passes/group_spans.py``; its own name if alone).
    span: str = ""


@dataclass
class SpanReport:
    """One guarded span: one ``cond`` over consecutive blocks (a single block with ``span="block"``)."""

    index: int
    name: str
    blocks: list[str]
    guard: str
    cond: str
    operands: int
    state: list[str]
    outputs: list[str]


@dataclass
class GraphReport:
    model: str
    model_class: str
    policy: str
    fallback_name: str
    blocks: list[BlockReport]
    passes: list[Any]  # PassResult
    notes: dict[str, list[str]]
    graph_code: str
    extra: dict[str, Any] = field(default_factory=dict)
    spans: list[SpanReport] = field(default_factory=list)

    def pass_names(self) -> list[str]:
        return [p.name for p in self.passes]

    def get_pass(self, name: str):
        for p in self.passes:
            if p.name == name:
                return p
        raise ValueError(f"no pass named {name!r}; the pipeline ran {self.pass_names()}")


def _users_desc(n: fx.Node) -> list[str]:
    return [u.name if u.op != "call_module" else f"{u.target}({u.args[0]!r})" if u.args else u.name
            for u in n.users]


def build_report(model: nn.Module, example_inputs: dict[str, Any], config=None, name: str = "",
                 **overrides: Any) -> GraphReport:
    """Capture ``model`` on ``example_inputs`` (eager) and describe the rewrite."""
    opt = optimize(model, backend="eager", config=config, **overrides)
    opt.record_passes = True
    entry = opt.capture(**example_inputs)
    gm, ctx = entry.gm, entry.ctx
    conds = gp.conds(gm.graph)
    by_branch = {}
    for c in conds:
        true_b, false_b = c.args[1], c.args[2]
        by_branch[getattr(false_b, "target", None)] = (c, getattr(true_b, "target", None))
    blocks = []
    spans = []
    originals = {b.index: b for b in ctx.extras.get("block_regions", ctx.blocks)}
    for i, blk in enumerate(ctx.blocks):  # guarded spans (one per block with span="block")
        gname = ctx.guards[i] if i < len(ctx.guards) else ""
        guard = getattr(gm, gname, None) if gname else None
        full_name = gp.block_branch_name(blk.index)
        full = getattr(gm, full_name, None)
        # routing / merging: the cond's computed branch is the routed wrapper around the block
        cond, cheap_name = by_branch.get(full_name) or by_branch.get(gp.compute_branch_name(blk.index), (None, None))
        cheap = getattr(gm, cheap_name, None) if cheap_name else None
        region = [n for n in full.graph.nodes if n.op == "call_function"] if full is not None else []
        region = [n for n in region if not (n.target is torch.ops.aten.clone.default and
                                            n.kwargs.get("memory_format") is torch.contiguous_format and
                                            all(u.op == "output" for u in n.users))]
        fb = guard.fallback if guard is not None else None
        state = [f"{k}{tuple(v.shape)}" for k, v in fb.named_buffers(recurse=False)] if fb is not None else []
        routing = []
        if cond is not None:
            streams = [name for _, name, _ in blk.outputs]
            for u in sorted(cond.users, key=lambda n: n.args[1] if len(n.args) > 1 else 0):
                j = u.args[1] if len(u.args) > 1 and isinstance(u.args[1], int) else None
                label = streams[j] if j is not None and j < len(streams) else "?"
                routing.append(f"{label} = {u.name} -> {', '.join(_users_desc(u)) or '(unused)'}")
        router = getattr(guard, "router", None) if guard is not None else None
        if router is not None:
            routing.append(f"token router: {type(router).__name__}")
        spans.append(SpanReport(index=blk.index, name=blk.name, blocks=list(blk.block_names), guard=gname,
                                cond=cond.name if cond is not None else "",
                                operands=len(cond.args[3]) if cond is not None else 0, state=state,
                                outputs=[name for _, name, _ in blk.outputs]))
        for bi, bname in (blk.members or [(blk.index, blk.name)]):
            own = originals.get(bi, blk) if len(blk.block_names) > 1 else blk
            nodes = region if own is blk else [n for n in own.nodes if n.op == "call_function"]
            blocks.append(BlockReport(
                index=bi, name=bname, original_nodes=len(nodes) + len(own.hoisted),
                ops=ops_histogram(nodes) + ops_histogram(own.hoisted), hoisted=len(own.hoisted),
                rewritten=cond is not None and cheap is not None,
                guard=gname, decider=type(guard.decider).__name__ if guard is not None and guard.decider is not None
                else (f"step decider {ctx.step_decider}" if ctx.step_decider else "none"),
                fallback=type(fb).__name__ if fb is not None else "none", state=state,
                cond=cond.name if cond is not None else "", operands=len(cond.args[3]) if cond is not None else 0,
                outputs=[name for _, name, _ in own.outputs], routing=routing,
                block_code=full.code.strip() if full is not None else "",
                fallback_code=cheap.code.strip() if cheap else "", span=blk.name))
    cfg = opt.fastcache_config
    return GraphReport(model=name or type(model).__name__, model_class=type(model).__name__, policy=cfg.policy,
                       fallback_name=cfg.fallback, blocks=blocks, passes=list(entry.passes), notes=dict(ctx.notes),
                       graph_code=gm.code.strip(),
                       extra={"nodes_final": len(gm.graph.nodes), "conds": len(conds)}, spans=spans)


def _hist(c: Counter, top: int = 8) -> str:
    items = c.most_common(top)
    more = sum(c.values()) - sum(v for _, v in items)
    return ", ".join(f"{k}×{v}" for k, v in items) + (f", … ({more} more)" if more else "")


def _names(xs: list[str], limit: int = 12) -> str:
    if not xs:
        return "-"
    return ", ".join(xs[:limit]) + (f", … (+{len(xs) - limit})" if len(xs) > limit else "")


def format_text(r: GraphReport) -> str:
    lines = [f"fx-fastcache graph diff: {r.model} ({r.model_class}), policy={r.policy}, fallback={r.fallback_name}",
             f"{len(r.blocks)} blocks, {sum(b.rewritten for b in r.blocks)} rewritten into cond; "
             f"final graph {r.extra['nodes_final']} nodes", "", "Passes:"]
    for p in r.passes:
        lines.append(f"  {p.name:<16} {p.nodes_before:5d} -> {p.nodes_after:5d} nodes  "
                     f"(+{len(p.added)} added, -{len(p.removed)} removed)")
        for note in r.notes.get(p.name, [])[:3]:
            lines.append(f"      {note}")
        if len(r.notes.get(p.name, [])) > 3:
            lines.append(f"      … {len(r.notes[p.name]) - 3} more notes")
    if r.spans:
        lines += ["", f"Guarded spans ({len(r.spans)} cond for {len(r.blocks)} blocks):"]
        for sp in r.spans:
            lines.append(f"  span {sp.guard or sp.name}: {len(sp.blocks)} block(s) {_names(sp.blocks, 6)} -> "
                         f"cond {sp.cond or '-'} ({sp.operands} operands); streams {', '.join(sp.outputs)}; "
                         f"state {_names(sp.state, 6)}")
    lines += ["", "Blocks:"]
    for b in r.blocks:
        status = "REWRITTEN" if b.rewritten else "NOT rewritten"
        lines.append(f"  [{b.index}] {b.name}: {status}" + (f" (in span {b.span})" if b.span and b.span != b.name else ""))
        lines.append(f"      original : {b.original_nodes} nodes ({b.hoisted} hoisted for the probe); ops: {_hist(b.ops)}")
        if b.rewritten:
            lines.append(f"      guard    : {b.guard}  decider: {b.decider}")
            k = gp.index_of(b.guard) if b.guard else b.index
            lines.append(f"      cond     : {b.cond} = cond(pred, {gp.fallback_branch_name(k)}, {gp.block_branch_name(k)}, "
                         f"{b.operands} operands)")
            lines.append(f"      fallback : {b.fallback}  state: {_names(b.state, 8)}")
            lines.append(f"      streams  : {', '.join(b.outputs)}")
            for rt in b.routing:
                lines.append(f"      routing  : {rt}")
    return "\n".join(lines) + "\n"


def format_pass(r: GraphReport, name: str, full: bool = False) -> str:
    p = r.get_pass(name)
    if not p.code_before and not p.code_after:
        raise RuntimeError("the pass code was not recorded (set opt.record_passes = True before capture)")
    head = [f"pass {p.name}: {p.nodes_before} -> {p.nodes_after} nodes", f"added   ({len(p.added)}): {_names(p.added, 40)}",
            f"removed ({len(p.removed)}): {_names(p.removed, 40)}"]
    head += [f"note: {n}" for n in r.notes.get(p.name, [])]
    if full:
        return "\n".join(head + ["", f"==== graph before {p.name} ====", p.code_before.strip(), "",
                                 f"==== graph after {p.name} ====", p.code_after.strip()]) + "\n"
    diff = difflib.unified_diff(p.code_before.splitlines(), p.code_after.splitlines(),
                                fromfile=f"before {p.name}", tofile=f"after {p.name}", lineterm="", n=1)
    body = list(diff) or ["(the pass changed no code)"]
    return "\n".join(head + [""] + body) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:90%}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:80%}.ok{color:#060}.bad{color:#a00}
details{margin:4px 0}summary{cursor:pointer}.add{color:#060}.del{color:#a00}"""


def _diff_html(before: str, after: str, name: str) -> str:
    out = []
    for line in difflib.unified_diff(before.splitlines(), after.splitlines(), f"before {name}", f"after {name}",
                                     lineterm="", n=1):
        cls = "add" if line.startswith("+") else "del" if line.startswith("-") else ""
        out.append(f'<span class="{cls}">{html.escape(line)}</span>' if cls else html.escape(line))
    return "\n".join(out) or "(no change)"


def format_html(r: GraphReport) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fx-fastcache diff: {e(r.model)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>fx-fastcache graph diff: {e(r.model)}</h1>",
             f"<p>{e(r.model_class)}, policy <b>{e(r.policy)}</b>, fallback <b>{e(r.fallback_name)}</b>; "
             f"{len(r.blocks)} blocks, {sum(b.rewritten for b in r.blocks)} rewritten; final graph "
             f"{r.extra['nodes_final']} nodes.</p>", "<h2>Passes</h2><table><tr><th>pass</th><th>nodes before</th>"
             "<th>after</th><th>added</th><th>removed</th><th>notes</th></tr>"]
    for p in r.passes:
        parts.append(f"<tr><td>{e(p.name)}</td><td>{p.nodes_before}</td><td>{p.nodes_after}</td><td>{len(p.added)}</td>"
                     f"<td>{len(p.removed)}</td><td>{'<br>'.join(e(n) for n in r.notes.get(p.name, []))}</td></tr>")
    parts.append("</table><h2>Blocks</h2><table><tr><th>#</th><th>block</th><th>status</th><th>original nodes</th>"
                 "<th>top ops</th><th>guard / decider</th><th>fallback</th><th>cond operands</th></tr>")
    for b in r.blocks:
        st = "<span class='ok'>rewritten</span>" if b.rewritten else "<span class='bad'>not rewritten</span>"
        parts.append(f"<tr><td>{b.index}</td><td>{e(b.name)}</td><td>{st}</td><td>{b.original_nodes}</td>"
                     f"<td>{e(_hist(b.ops, 5))}</td><td>{e(b.guard)} / {e(b.decider)}</td><td>{e(b.fallback)}</td>"
                     f"<td>{b.operands}</td></tr>")
    parts.append("</table><h2>Guarded spans</h2><table><tr><th>guard</th><th>blocks</th><th>cond</th>"
                 "<th>operands</th><th>streams</th><th>state</th></tr>")
    for sp in r.spans:
        parts.append(f"<tr><td>{e(sp.guard)}</td><td>{e(_names(sp.blocks, 60))}</td><td>{e(sp.cond)}</td>"
                     f"<td>{sp.operands}</td><td>{e(', '.join(sp.outputs))}</td><td>{e(_names(sp.state, 20))}</td></tr>")
    parts.append("</table><h2>Per-block code</h2>")
    for b in r.blocks:
        parts.append(f"<details><summary>[{b.index}] {e(b.name)}: {b.original_nodes} nodes → "
                     f"{'cond(' + e(b.cond) + ')' if b.rewritten else 'unchanged'}</summary>"
                     f"<p>ops: {e(_hist(b.ops, 20))}</p><p>state: {e(_names(b.state, 20))}</p>"
                     f"<p>routing: {'<br>'.join(e(x) for x in b.routing) or '-'}</p>"
                     f"<details><summary>block branch {gp.block_branch_name(gp.index_of(b.guard) if b.guard else b.index)}</summary>"
                     f"<pre>{e(b.block_code)}</pre></details>"
                     f"<details><summary>fallback branch {gp.fallback_branch_name(gp.index_of(b.guard) if b.guard else b.index)}</summary>"
                     f"<pre>{e(b.fallback_code)}</pre>"
                     f"</details></details>")
    parts.append("<h2>Graph before / after each pass</h2>")
    for p in r.passes:
        parts.append(f"<details><summary>{e(p.name)}: {p.nodes_before} → {p.nodes_after} nodes</summary>"
                     f"<p>added: {e(_names(p.added, 60))}</p><p>removed: {e(_names(p.removed, 60))}</p>"
                     f"<details><summary>diff</summary><pre>{_diff_html(p.code_before, p.code_after, p.name)}</pre></details>"
                     f"<details><summary>before</summary><pre>{e(p.code_before.strip())}</pre></details>"
                     f"<details><summary>after</summary><pre>{e(p.code_after.strip())}</pre></details></details>")
    parts.append(f"<details><summary>final graph</summary><pre>{e(r.graph_code)}</pre></details></body></html>")
    return "\n".join(parts)
