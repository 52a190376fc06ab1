"""ONNX export of the rewritten model driven by a skip schedule, with explicit state.

Why not ``torch.onnx.export(opt)``: the optimized model keeps its state (cached residuals,
step counter) in buffers it updates in place; ONNX would freeze them into constants and drop
the updates without a word.  Here the graph is captured with ``policy="schedule"``, turned
stateless by :func:`fx_fastcache.passes.explicit_state.explicit_state` (skip mask and every
fallback state tensor become inputs, the new state becomes outputs) and exported with the
dynamo exporter.  Each guarded span (one block, or consecutive blocks with equal schedule
columns: ``passes/group_spans.py``) is one ONNX ``If`` on ``skip[i]``, ``i`` its first block (a
0-d bool, as TensorRT's conditional layer requires; both branches return the same shapes and
dtypes).

The ONNX file carries, in ``metadata_props``, the input/output/state layout
(``fx_fastcache.spec``) and the schedule (``fx_fastcache.schedule``), so
:class:`fx_fastcache.export.runner.OnnxRunner` needs nothing else.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from fx_fastcache.passes.explicit_state import ExplicitStateSpec, explicit_state

from fx_fastcache.module import FastCacheModule
from fx_fastcache.policies import POLICIES
from fx_fastcache.quiet import library_noise_silenced

from .onnx_fixes import drop_noop_squeezes, rewrite_bool_masked_fills
from .schedule import Schedule, apply_schedule, optimize_with_schedule

logger = logging.getLogger(__name__)

MIN_OPSET = 18
SPEC_KEY = "fx_fastcache.spec"
SCHEDULE_KEY = "fx_fastcache.schedule"


@dataclass
class OnnxExport:
    path: Path
    spec: ExplicitStateSpec
    schedule: Schedule
    opset: int
    n_if: int


def stateless_module(model: nn.Module, schedule: Schedule, example_inputs: dict[str, Any]):
    """The stateless graph (and its spec) that :func:`export_onnx` exports; also usable in PyTorch.

    ``model`` is the original model, or one returned by ``optimize``: one that already replays
    ``schedule`` reuses its captured graph for these input shapes (its own graphs are not modified).
    """
    if isinstance(model, FastCacheModule) and POLICIES[model.fastcache_config.policy].exportable:
        apply_schedule(model, schedule)  # checks model and blocks, installs the table
        cfg = model.fastcache_config
        if cfg.enable_token_routing or cfg.enable_token_merge:
            raise ValueError("export supports block skipping only; optimize with enable_token_routing=False and "
                             "enable_token_merge=False")
        opt = model
    else:
        base = model.model if isinstance(model, FastCacheModule) else model
        opt = optimize_with_schedule(base, schedule, backend="eager", enable_token_routing=False,
                                     enable_token_merge=False)
    entry = opt.capture(**example_inputs)
    gm, spec = explicit_state(entry.gm, entry.ctx)
    spec.dropped_squeezes = drop_noop_squeezes(gm)
    spec.rewritten_bool_fills = rewrite_bool_masked_fills(gm)
    return gm, spec


def export_onnx(model: nn.Module, schedule: Schedule, example_inputs: dict[str, Any], path: str | Path,
                opset: int = MIN_OPSET) -> OnnxExport:
    """Export ``model`` with ``schedule`` to ``path`` (shapes fixed by ``example_inputs``)."""
    import onnx

    if opset < MIN_OPSET:
        raise ValueError(f"opset={opset} is too old: the export needs opset >= {MIN_OPSET}")
    gm, spec = stateless_module(model, schedule, example_inputs)
    gm.eval()
    missing = [n for n in spec.inputs if n not in example_inputs]
    if missing:
        raise ValueError(f"example_inputs lack {missing}")
    args = tuple([example_inputs[n] for n in spec.inputs] + [schedule.row(0)] +
                 spec.initial_state(example_inputs[spec.inputs[0]].device))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    with library_noise_silenced():  # the exporter's "torchvision is not installed. Skipping ..." notices
        prog = torch.onnx.export(gm, args, dynamo=True, input_names=spec.input_names,
                                 output_names=spec.output_names, opset_version=opset, verbose=False)
    if prog is None:
        raise RuntimeError("torch.onnx.export returned nothing; the dynamo exporter (onnxscript) is required: "
                           "pip install onnxscript")
    for k, v in ((SPEC_KEY, json.dumps(spec.to_dict())), (SCHEDULE_KEY, schedule.to_json())):
        prog.model.metadata_props[k] = v
    prog.save(str(path))
    onnx.checker.check_model(str(path))
    m = onnx.load(str(path))
    n_if = sum(1 for n in m.graph.node if n.op_type == "If")
    got = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if n_if != len(spec.guarded):
        raise RuntimeError(f"exported graph has {n_if} If nodes for {len(spec.guarded)} guarded spans "
                           f"({len(spec.blocks)} blocks)")
    logger.info("exported %s: %d blocks in %d If, %d state tensors, opset %d", path, len(spec.blocks), n_if,
                len(spec.state), got)
    return OnnxExport(path, spec, schedule, got, n_if)


def read_metadata(path: str | Path) -> tuple[ExplicitStateSpec, Schedule]:
    """The spec and schedule stored in an ONNX file written by :func:`export_onnx`."""
    import onnx

    if not Path(path).is_file():
        raise FileNotFoundError(f"ONNX file {str(path)!r} does not exist; write one with `fx-fastcache export-onnx`")
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises protobuf's DecodeError and others for a damaged file
        raise ValueError(f"{str(path)!r} is not a readable ONNX file ({type(e).__name__}: {e})") from None
    props = {p.key: p.value for p in m.metadata_props}
    missing = [k for k in (SPEC_KEY, SCHEDULE_KEY) if k not in props]
    if missing:
        raise ValueError(f"{str(path)!r} has no {missing} metadata: it was not written by "
                         f"`fx-fastcache export-onnx`")
    try:
        spec = ExplicitStateSpec.from_dict(json.loads(props[SPEC_KEY]))
        schedule_dict = json.loads(props[SCHEDULE_KEY])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{str(path)!r}: its fx-fastcache metadata is damaged ({type(e).__name__}: {e}); "
                         f"export the model again") from None
    return spec, Schedule.from_dict(schedule_dict, source=f"{path} metadata")


__all__ = ["export_onnx", "stateless_module", "read_metadata", "OnnxExport", "apply_schedule"]
